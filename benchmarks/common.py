"""Shared helpers for benchmark scripts: timing, environment facts, JSON results."""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def best_of(fn, repeat: int = 3) -> float:
    """Smallest wall time of ``repeat`` runs (the least disturbed by other load)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def peak_rss_mb(pid: int | str = "self", key: str = "VmHWM") -> float | None:
    """A process's peak resident memory (``VmHWM``; or another /proc status field, e.g. ``VmRSS``)
    in MB, or None once it has exited.

    Not ``ru_maxrss``: on Linux a child's ru_maxrss starts from its parent's RSS at fork (exec keeps
    the maximum), so a child of a large benchmark process reports the parent's size.
    """
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def refuse_unnamed_variant(parser, args, exempt=()) -> None:
    """Stop a run whose options are off their defaults but that names no ``--result``: it would write
    over the stored figures the docs quote."""
    skip = {"help", "result", *exempt}
    changed = [
        f"--{a.dest.replace('_', '-')}"
        for a in parser._actions
        if a.dest not in skip and a.help != "==SUPPRESS==" and getattr(args, a.dest) != a.default
    ]
    if changed and not args.result:
        raise SystemExit(
            f"{parser.prog}: {', '.join(changed)} given: pass --result NAME too, so the stored figures"
            " stay as they are"
        )


def generation_setup(n: int, description: str, add_arguments=None, first_seed: int | None = None):
    """The options every generation benchmark takes (--model, --n, --steps, --guidance, --result) and
    those ``add_arguments(parser)`` adds, parsed, and the pipeline they name on 2 threads: (args, pipe).

    ``first_seed`` (the benchmark's held-out seeds start there) adds ``--first-seed`` for another set
    of held-out cases; it needs ``--result``, so the benchmark's own figures stay as they are."""
    import argparse

    import torch

    from ctflow.pipeline import CTFlowPipeline

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default=None, help="pipeline folder (default: the embedded model)")
    p.add_argument("--n", type=int, default=n)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument(
        "--finding-guidance",
        type=float,
        default=None,
        help="guidance of the finding flags apart from the text (default: --guidance)",
    )
    p.add_argument(
        "--shift",
        type=float,
        default=None,
        help="the sampler's time shift (default: the model's scheduler config, 1 for the embedded model);"
        " above 1 spends more of the steps at high noise",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        help="the models' weights: float32, bfloat16 or float16 (CTFlowPipeline.to; the ODE stays float32)",
    )
    p.add_argument(
        "--result", default=None, help="name of the JSON/PNG written to benchmarks/results (experiments)"
    )
    if first_seed is not None:
        p.add_argument("--first-seed", type=int, default=first_seed, help="phantom seed of the first case")
    if add_arguments:
        add_arguments(p)
    args = p.parse_args()
    if first_seed is not None and args.first_seed != first_seed and not args.result:
        raise SystemExit(
            f"{p.prog}: --first-seed needs --result NAME, so the held-out figures stay as they are"
        )
    # --guidance names its own file (result_name); any other option off its default needs a name
    refuse_unnamed_variant(p, args, exempt=("guidance", "first_seed"))
    torch.set_num_threads(2)
    pipe = CTFlowPipeline.from_pretrained(args.model)
    if args.dtype != "float32":
        from ctflow.device import resolve_dtype

        pipe.to(dtype=resolve_dtype(args.dtype))
    if args.shift is not None:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, shift=args.shift)
    return args, pipe


def generate(pipe, args, report: str, seed: int, **kwargs):
    """``pipe(report)`` with the benchmark options ``generation_setup`` parsed (steps, guidance,
    finding guidance) and a generator seeded with ``seed``; ``kwargs`` go to the pipeline."""
    import torch

    return pipe(
        report,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        finding_guidance=args.finding_guidance,
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )


def generation_settings(args) -> dict:
    """The generation options a result records: steps, guidance, finding guidance and the model."""
    return {
        "steps": args.steps,
        "guidance": args.guidance,
        "finding_guidance": args.finding_guidance,
        "shift": args.shift,
        **({"dtype": args.dtype} if args.dtype != "float32" else {}),
        "model": args.model or "embedded",
    }


def rendered_case(spec):
    """A phantom and its report: (``PhantomRender``, report with its meta line), the report drawn with
    the spec's seed."""
    from ctflow.data.phantom import render_phantom
    from ctflow.data.reports import phantom_report
    from ctflow.models.text import format_report

    r = render_phantom(spec)
    rep = phantom_report(r.ground_truth, seed=spec.seed)
    return r, format_report(rep["Findings_EN"], rep["Impressions_EN"], spec.num_slices, spec.slice_spacing)


def heldout_reports(seed0: int, n: int, size: int = 64):
    """Phantoms never trained on (seeds ``seed0``...): (spec, volume, truth, report with its meta line)."""
    from ctflow.data.phantom import sample_spec

    for i in range(n):
        spec = sample_spec(seed0 + i, size=size, slice_range=(40, 120))
        r, text = rendered_case(spec)
        yield spec, r.volume, r.ground_truth, text


def decoded_hu(pipe, z):
    """Latents [C,S,h,w] decoded by the pipeline's slice VAE: HU array [S,H,W]."""
    return pipe.vae.denormalize(pipe.vae.decode_volume(z).numpy())


def through_vae(pipe, volume):
    """A HU volume through the pipeline's slice VAE: (latents [C,S,h,w], reconstructed HU volume)."""
    from ctflow.data.volume import Volume

    z = pipe.vae.encode_volume(volume)
    return z, Volume(decoded_hu(pipe, z), volume.spacing)


RULE_CACHE = Path(__file__).resolve().parent / ".cache"  # git-ignored


def vae_nodule_rule(pipe, n: int = 200, cache: Path | None = RULE_CACHE) -> dict:
    """The attribute reader's nodule rule fitted on ``n`` calibration phantoms (the seeds the shipped
    reader was calibrated on) through the pipeline's slice VAE, for ``attribute_scores(nodule_rules=)``.

    The shipped rule was fitted on the phantoms themselves; on their reconstructions it calls a
    nodule in about one in five volumes without one (the VAE's blur makes vessels look like
    nodules), as many as a generator draws, so a count of nodules in generated volumes tells little.
    The refitted rule reads generated volumes in the domain they are decoded into. About 80 s on 2
    cores for 200; the rule is kept in ``cache`` (None: not kept) under a key of the VAE's weights,
    ``n`` and the source of the reader and the phantoms, so a rerun on the same VAE reads it back."""
    from ctflow.data.phantom import render_phantom, sample_spec
    from ctflow.eval.attributes import calibrate_nodule_rule
    from ctflow.eval.train_features import CALIBRATION_SEEDS

    seeds = list(CALIBRATION_SEEDS)[:n]
    path = None if cache is None else Path(cache) / f"vae_nodule_rule_{_rule_key(pipe.vae, seeds)}.json"
    if path is not None and path.exists():
        print(f"nodule rule fitted through the VAE read from {path}")
        return {k: np.asarray(v, np.float32) for k, v in json.loads(path.read_text()).items()}

    def cases():
        for seed in seeds:
            r = render_phantom(sample_spec(seed, size=64, slice_range=(40, 120)))
            yield through_vae(pipe, r.volume)[1], r.ground_truth

    start = time.perf_counter()
    rule = calibrate_nodule_rule(cases())
    print(f"nodule rule fitted through the VAE on {n} phantoms in {time.perf_counter() - start:.0f} s")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({k: np.asarray(v).tolist() for k, v in rule.items()}))
        os.replace(tmp, path)
    return rule


def _rule_key(vae, seeds) -> str:
    # what the fitted rule depends on: the VAE's weights, the seeds, the reader's code and weights and
    # the phantoms' code
    import hashlib

    import ctflow.data.phantom
    import ctflow.data.reports
    import ctflow.eval.attributes as attributes

    h = hashlib.sha256(str(list(seeds)).encode())
    for module in (attributes, ctflow.data.phantom, ctflow.data.reports):
        h.update(Path(module.__file__).read_bytes())
    h.update(attributes.WEIGHTS_PATH.read_bytes())
    for name, tensor in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def nodule_calls(rows: list[dict], key: str) -> dict:
    """Nodules called by ``row[key]`` (a result row's call, e.g. ``nodule_vae_rule``) under reports
    naming one (found of reported) and under the others (false of clear)."""
    named = [bool(r[key]) for r in rows if r["truth"]["nodule"]]
    clear = [bool(r[key]) for r in rows if not r["truth"]["nodule"]]
    return {"found": [sum(named), len(named)], "false": [sum(clear), len(clear)]}


def axial_strip(volume, depths=(0.5, 0.6, 0.7), gap: int = 4) -> np.ndarray:
    """uint8 (64, ...) image: axial slices at the given fractions of the depth, mediastinal window."""
    from ctflow.data.preview import MEDIASTINAL_WINDOW, apply_window

    hu = volume.hu()
    panels = []
    for d in depths:
        panels += [
            apply_window(hu[int(d * (hu.shape[0] - 1))], MEDIASTINAL_WINDOW),
            np.zeros((hu.shape[1], gap), np.uint8),
        ]
    return np.concatenate(panels[:-1], axis=1)


def run_measured(cmd: list[str], log: Path, cwd: Path, poll: float = 0.1) -> tuple[int, float]:
    """Run ``cmd`` with output to ``log``; its exit code and the last peak RSS (MB) seen while polling."""
    import subprocess

    peak = 0.0
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
        while proc.poll() is None:
            peak = max(peak, peak_rss_mb(proc.pid) or 0.0)
            time.sleep(poll)
    return proc.returncode, peak


def environment() -> dict:
    import torch

    from ctflow.train.utils import machine

    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **machine(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def rms(x) -> float:
    """Root mean square of a tensor, in float32 or wider."""
    return float(x.float().pow(2).mean().sqrt())


DEFAULT_GUIDANCE = 2.0  # the pipeline's and the CLI's default


def result_name(stem: str, guidance: float) -> str:
    """``stem`` at the default guidance, ``{stem}_guidance{G}`` otherwise, so a guidance sweep leaves
    the default's result (which docs/results.md and the model card quote) alone."""
    return stem if guidance == DEFAULT_GUIDANCE else f"{stem}_guidance{guidance:g}"


def write_result(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**result, "environment": environment()}, indent=1))
    os.replace(tmp, path)
    print(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return path


def synthetic_cache(
    folder: Path,
    n: int = 64,
    channels: int = 8,
    size: int = 16,
    text_dim: int = 384,
    slices: tuple[int, int] = (40, 120),
    shard_size: int | None = None,
    report_variants: int = 0,
    finding_masks: bool = False,
) -> Path:
    """A latent cache of random volumes in the layout ``ctflow encode`` writes: ``n`` volumes of
    ``slices[0]``.. ``slices[1] - 1`` slices of ``channels`` x ``size`` x ``size`` latents, 90 text tokens
    per report, ``report_variants`` shortened reports of 45 tokens; ``finding_masks``: random finding
    shares per latent pixel, as a phantom data set's cache holds (the shipped config weights by them)."""
    import torch
    from safetensors.torch import save_file

    from ctflow.train.latents import report_keys

    g = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True)
    save_file({"eos": torch.ones(channels, size, size)}, folder / "eos.safetensors")
    rows = []
    step = shard_size or n
    for k, start in enumerate(range(0, n, step)):
        tensors, part = {}, []
        for i in range(start, min(start + step, n)):
            name, s = f"train_{i + 1}_a_1.nii.gz", slices[0] + i % (slices[1] - slices[0])
            tensors[f"{name}.latents"] = torch.randn(channels, s, size, size, generator=g).half()
            if finding_masks:
                tensors[f"{name}.finding_mask"] = torch.rand(s, size, size, generator=g).half()
            for key, length in zip(report_keys(report_variants), [90, *[45] * report_variants], strict=True):
                for suffix in (key, key + "_nometa"):
                    tensors[f"{name}.tokens{suffix}"] = torch.randn(length, text_dim, generator=g).half()
                    tensors[f"{name}.pooled{suffix}"] = torch.randn(text_dim, generator=g)
            part.append(
                {
                    "name": name,
                    "report": "",
                    **({"short_reports": [""] * report_variants} if report_variants else {}),
                    "num_slices": s,
                    "spacing": [2.5, 5.0, 5.0],
                    "labels": None,
                }
            )
        save_file(tensors, folder / f"shard_{k:05d}.safetensors")
        (folder / f"shard_{k:05d}.json").write_text(json.dumps(part))
        rows += part
    index = {
        "text_dim": text_dim,
        "report_variants": report_variants,
        "finding_masks": finding_masks,
        "volumes": rows,
    }
    (folder / "index.json").write_text(json.dumps(index))
    return folder
