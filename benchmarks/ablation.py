"""The paper's comparisons in miniature: one script, the same data and the same training budget.

    python benchmarks/ablation.py [--work runs/default] [--out runs/ablation] [--steps 600] [--n 10]
    make ablation

Needs a finished ``make train-default`` run in ``--work``: its latent cache (``latents/``) is the
training data of every variant and its model folder (``model/``) provides the slice VAE, the
report encoder and the EOS threshold.

* Trained variants: the tiny transformer trained from scratch for ``--steps`` steps on the same
  latents, one design choice changed at a time (AR chunks with context, independent chunks, the
  whole volume as one fixed-depth chunk, concat vs tokens context, full vs factorized attention,
  StartBoost, context noise, the absolute-depth embedding, the slice count read as a number,
  x- vs v-prediction, the output conv). The trained rows keep the output conv off
  (``ABLATION_BASE``: they predate it, and turning it on in the base would retrain them all);
  ``final-conv`` adds it. Every step sees the same number of
  latent slices (the whole-volume variant trains on one volume per step where the others take 16
  chunks of 8 slices).
* Sampler variants: the ``--work`` model (the one ``make train-default`` ships) sampled with 200
  Euler steps (as published), 50, 25 and 10, and Heun at 25 and 10.

Each variant generates ``--n`` volumes from held-out phantom reports (seeds 60000+, never trained
on) with ``ctflow generate --prompts`` in a subprocess, whose peak RSS is the memory column; then
the ``ctflow evaluate`` measures score them against the matching real phantoms. Finished variants
are skipped on rerun. Writes ``benchmarks/results/ablation.json`` and ``ablation.md``. Not part of
``make test``; about 70 minutes on 2 CPU cores with the defaults (plus 10 for
``no-target-depth-2000``).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, heldout_reports, run_measured, write_result  # noqa: E402

from ctflow.models.text import parse_meta  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SEED0 = 60000
CONFIG = REPO / "configs" / "tiny-phantom.yaml"
WHOLE_DEPTH = 128  # fixed depth of the whole-volume variant: every training volume (<= 120 slices) fits

# every trained row: configs/tiny-phantom.yaml with these overrides, then its own
ABLATION_BASE: dict = {"transformer": {"final_conv": False}}
# name -> (what it tests, overrides of configs/tiny-phantom.yaml; "steps" fixes the variant's budget)
TRAINED: dict[str, tuple[str, dict]] = {
    "baseline": (
        "configs/tiny-phantom.yaml without the output conv: AR chunks, concat context, full attention",
        {},
    ),
    "no-context": ("independent chunks (no previous chunk)", {"transformer": {"context": "none"}}),
    "whole-volume": (
        f"the whole volume as one {WHOLE_DEPTH}-slice chunk",
        {"transformer": {"chunk_slices": WHOLE_DEPTH, "max_chunks": 1}, "start_boost": 1.0, "batch_size": 1},
    ),
    "tokens-context": ("context as tokens with a KV cache", {"transformer": {"context": "tokens"}}),
    "factorized": ("factorized (spatial + temporal) attention", {"transformer": {"attention": "factorized"}}),
    "no-startboost": ("StartBoost off (chunks drawn uniformly)", {"start_boost": 0.0}),
    "no-context-noise": ("no noise on the training context", {"context_noise": 0.0}),
    "no-depth-embedding": ("no absolute-depth embedding", {"transformer": {"depth_embedding": False}}),
    "no-target-depth": ("slice count read only as text", {"transformer": {"target_depth": False}}),
    "no-target-depth-2000": (
        "slice count read only as text, at 2000 steps",
        {"transformer": {"target_depth": False}, "steps": 2000},
    ),
    "v-prediction": (
        "network predicts the velocity (published)",
        {"transformer": {"prediction": "velocity"}},
    ),
    "final-conv": ("3x3x3 output conv (smooths patch seams)", {"transformer": {"final_conv": True}}),
}
# name -> (scheduler, steps); run on the --work model
SAMPLERS: dict[str, tuple[str, int]] = {
    "euler-200": ("euler", 200),
    "euler-50": ("euler", 50),
    "euler-25": ("euler", 25),
    "euler-10": ("euler", 10),
    "heun-25": ("heun", 25),
    "heun-10": ("heun", 10),
}
TRAIN_STEPS_FOR_EVAL = 25  # sampling steps used to evaluate the trained variants


def real_set(out: Path, n: int) -> tuple[Path, list[dict]]:
    """Held-out phantoms (CT-RATE layout) and their prompts (report + meta line)."""
    from ctflow.cli import main as cli

    real = out / "real"
    args = ["--n", str(n), "--size", "64", "--seed", str(SEED0), "--min-slices", "40", "--max-slices", "120"]
    if not real.exists() and cli(["phantoms", "--out", str(real), "--split", "valid", *args]) != 0:
        raise SystemExit("could not write the held-out phantoms")
    prompts = [
        {"name": f"heldout_{i:03d}", "report": text, "seed": i}
        for i, (_, _, _, text) in enumerate(heldout_reports(SEED0, n))
    ]
    return real, prompts


def train_variant(name: str, overrides: dict, latents: Path, run: Path, steps: int) -> dict:
    import yaml

    from ctflow.train.config import FlowTrainConfig, config_from_dict, merged
    from ctflow.train.flow_trainer import train_flow

    steps = overrides.get("steps", steps)  # a variant may fix its own budget
    base = merged(yaml.safe_load(CONFIG.read_text()), ABLATION_BASE)
    data = merged(base, {k: v for k, v in overrides.items() if k != "steps"})
    data.update(steps=steps, checkpoint_every=max(50, steps // 4), log_every=max(1, steps // 20))
    data["optim"] = {**data["optim"], "warmup_steps": min(data["optim"]["warmup_steps"], steps // 5)}
    config = config_from_dict(data, FlowTrainConfig)
    if not (run / "transformer").exists():
        print(f"== train {name}: {steps} steps", flush=True)
        t0 = time.perf_counter()
        train_flow(latents, config, run, resume=run.exists())
        (run / "train_seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}")
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    timed = [r["sec_per_step"] for r in log if "sec_per_step" in r]
    return {"train_steps": steps, "train_sec_per_step": round(float(np.median(timed)), 3)}


def model_folder(base: Path, folder: Path, transformer: Path | None, scheduler: str) -> Path:
    """A model folder: the --work model with another transformer and/or sampler."""
    if folder.exists():
        return folder
    from ctflow.flow import make_scheduler
    from ctflow.models.transformer import CTFlowTransformer
    from ctflow.pipeline import CTFlowPipeline

    pipe = CTFlowPipeline.from_pretrained(base)
    if transformer is not None:
        pipe.transformer = CTFlowTransformer.from_pretrained(transformer).eval()
    pipe.scheduler = make_scheduler(scheduler)
    pipe.save_pretrained(folder)
    return folder


def generate_cmd(model: Path, prompts_csv: Path, fake: Path, steps: int, max_slices: int) -> list[str]:
    cmd = [sys.executable, "-m", "ctflow.cli", "generate", "--prompts", str(prompts_csv), "--out", str(fake)]
    return cmd + [
        "--model",
        str(model),
        "--steps",
        str(steps),
        "--max-slices",
        str(max_slices),
        "--guidance",
        "2",
    ]


def generate(model: Path, prompts_csv: Path, fake: Path, steps: int, max_slices: int) -> dict:
    """``ctflow generate --prompts`` in a subprocess: time per slice and how generation ended."""
    t0 = time.perf_counter()
    cmd = generate_cmd(model, prompts_csv, fake, steps, max_slices)
    code, _ = run_measured(cmd, fake.parent / "generate.log", REPO)
    if code != 0:
        raise SystemExit(f"generation failed; see {fake.parent / 'generate.log'}")
    sidecars = [json.loads(p.read_text()) for p in sorted(fake.glob("*.json"))]
    slices = sum(s["num_slices"] for s in sidecars)
    return {
        "gen_seconds_per_slice": round(sum(s["seconds"] for s in sidecars) / max(1, slices), 4),
        "ended_by_eos": round(float(np.mean([s["end_reason"] == "eos" for s in sidecars])), 3),
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }


def peak_memory(model: Path, prompts: list[dict], folder: Path, steps: int, max_slices: int) -> dict:
    """Peak RSS (VmHWM) of a fresh ``ctflow generate`` process making the deepest held-out volume."""
    deepest = max(prompts, key=lambda p: parse_meta(p["report"])[0] or 0)
    work = folder / "memory"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    with open(work / "prompt.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["name", "report", "seed"])
        w.writeheader()
        w.writerow(deepest)
    cmd = generate_cmd(model, work / "prompt.csv", work / "fake", steps, max_slices)
    code, peak = run_measured(cmd, work / "generate.log", REPO)
    if code != 0:
        raise SystemExit(f"generation failed; see {work / 'generate.log'}")
    return {"peak_rss_mb": round(peak, 1), "memory_method": "VmHWM, one volume"}


def model_evaluations(scheduler: str, steps: int) -> int:
    from ctflow.flow import make_scheduler

    sched = make_scheduler(scheduler)
    sched.set_timesteps(steps)
    return len(sched.timesteps)


def score_variant(real_items, fake: Path) -> dict:
    from ctflow.eval.evaluate import load_fake, score

    r = score(real_items, load_fake(fake))
    return {
        "fid_axial": r["fid"]["axial"],
        "fid_coronal": r["fid"]["coronal"],
        "fid_sagittal": r["fid"]["sagittal"],
        "fvd": r["fvd"],
        "clip_score": r["clip_score"]["generated"],
        "clip_score_real": r["clip_score"]["real"],
        "attribute_accuracy": r["attribute_accuracy"]["generated_mean"],
        # 8 slices for every variant: a whole-volume variant's "chunk" is the whole volume
        "slice_count_within_chunk": r["slice_count"]["within_8_slices"],
        "continuity": r["continuity"]["generated"],
        "continuity_real": r["continuity"]["real"],
    }


COLUMNS = [
    ("variant", "Variant", None),
    ("fid_axial", "FID ax", 1),
    ("fid_coronal", "FID cor", 1),
    ("fid_sagittal", "FID sag", 1),
    ("fvd", "FVD", 1),
    ("clip_score", "CLIP", 1),
    ("attribute_accuracy", "Attr. acc.", 2),
    ("slice_count_within_chunk", "Depth ok", 2),
    ("continuity", "Continuity", 2),
    ("nfe", "NFE/chunk", None),
    ("gen_seconds_per_slice", "s/slice", 3),
    ("peak_rss_mb", "Peak RSS MB", 0),
]


def markdown(rows: list[dict]) -> str:
    def cell(v, digits):
        if v is None:
            return "n/a"
        return f"{v:.{digits}f}" if digits is not None and isinstance(v, float | int) else str(v)

    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r.get(k), d) for k, _, d in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=REPO / "runs" / "default")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "ablation")
    p.add_argument("--steps", type=int, default=600, help="training steps per trained variant")
    p.add_argument("--n", type=int, default=10, help="held-out reports generated per variant")
    p.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    latents, base = args.work / "latents", args.work / "model"
    if not (latents / "index.json").exists() or not (base / "model_index.json").exists():
        raise SystemExit(f"{args.work} has no finished latents/ and model/; run `make train-default` first")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    real, prompts = real_set(out, args.n)
    prompts_csv = out / "prompts.csv"
    with open(prompts_csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["name", "report", "seed"])
        w.writeheader()
        w.writerows(prompts)
    from ctflow.eval.evaluate import load_real

    real_items = None
    only = set(filter(None, args.only.split(",")))
    rows = []
    plan = [(n, "trained", o) for n, (_, o) in TRAINED.items()] + [
        (n, "sampler", s) for n, s in SAMPLERS.items()
    ]
    for name, kind, spec in plan:
        folder = out / name
        done = folder / "row.json"
        if only and name not in only:  # not rerun, but its finished row stays in the results
            if done.exists():
                rows.append(json.loads(done.read_text()))
            continue
        if done.exists():
            row = json.loads(done.read_text())
            if row.get("memory_method") != "VmHWM, one volume":  # rows from before the VmHWM fix
                steps = TRAIN_STEPS_FOR_EVAL if kind == "trained" else spec[1]
                max_slices = WHOLE_DEPTH if name == "whole-volume" else 136
                row.update(peak_memory(folder / "model", prompts, folder, steps, max_slices))
                done.write_text(json.dumps(row, indent=1))
            rows.append(row)
            print(f"== {name}: finished earlier", flush=True)
            continue
        row: dict = {"variant": name, "kind": kind}
        if kind == "trained":
            row["what"] = TRAINED[name][0]
            row.update(train_variant(name, spec, latents, folder / "train", args.steps))
            scheduler, steps = "euler", TRAIN_STEPS_FOR_EVAL
            model = model_folder(base, folder / "model", folder / "train" / "transformer", scheduler)
        else:
            scheduler, steps = spec
            row["what"] = f"shipped model, {scheduler} sampler, {steps} steps"
            model = model_folder(base, folder / "model", None, scheduler)
        row["nfe"] = model_evaluations(scheduler, steps)
        max_slices = WHOLE_DEPTH if name == "whole-volume" else 136
        print(f"== generate {name}: {args.n} volumes, {scheduler} {steps} steps", flush=True)
        fake = folder / "fake"
        fake.mkdir(parents=True, exist_ok=True)
        row.update(generate(model, prompts_csv, fake, steps, max_slices))
        row.update(peak_memory(model, prompts, folder, steps, max_slices))
        if real_items is None:
            real_items = load_real(real)
        row.update(score_variant(real_items, fake))
        done.write_text(json.dumps(row, indent=1))
        rows.append(row)
        print(markdown([row]), flush=True)
    table = markdown(rows)
    result = {"n_heldout": args.n, "train_steps": args.steps, "rows": rows}
    write_result("ablation", result)
    (RESULTS / "ablation.md").write_text(table)
    print(table)
    return result


if __name__ == "__main__":
    main()
