"""The ``ctflow`` command line.

Every command turns bad input into a one-line ``error: ...`` message naming the
problem and the fix, exits non-zero, and leaves no partial output behind.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ctflow.errors import CTFlowError, CTFlowWarning, warn

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Generate 3D chest CT volumes from radiology reports.",
)
convert_app = typer.Typer(
    no_args_is_help=True, help="Convert third-party weights to ctflow/transformers folders."
)
app.add_typer(convert_app, name="convert")
console = Console(stderr=True, soft_wrap=True)

Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs.")]
Device = Annotated[
    str,
    typer.Option("--device", help="cpu, cuda, cuda:N or mps (plain cuda under torchrun: LOCAL_RANK's GPU)."),
]
Dtype = Annotated[
    str, typer.Option("--dtype", help="Model weights: float32, bfloat16 or float16 (the ODE stays float32).")
]


def _progress(transient: bool = False):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from ctflow.generate import process_rank
    from ctflow.progress import PlainProgress, show_bar

    # one process's progress under torchrun (each process's bar overwrote the others' on one line)
    quiet = process_rank()[0] != 0
    if not show_bar() and not quiet:
        return PlainProgress()  # a job's log: a line every 30 s, not a bar shown only at the end
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
        disable=quiet,
    )


@app.command()
def phantoms(
    out: Annotated[Path, typer.Option("--out", help="Output folder (CT-RATE layout).")],
    n: Annotated[int, typer.Option("--n", help="Number of volumes.")] = 100,
    size: Annotated[int, typer.Option(help="In-plane size in pixels.")] = 128,
    seed: Annotated[int, typer.Option(help="Seed of the first volume; volume i uses seed+i.")] = 0,
    split: Annotated[str, typer.Option(help="Split name used in file names.")] = "train",
    min_slices: Annotated[int, typer.Option(help="Fewest slices per volume.")] = 64,
    max_slices: Annotated[int, typer.Option(help="Most slices per volume.")] = 160,
    side_twins: Annotated[
        bool,
        typer.Option(
            "--side-twins",
            help="Also write, after the N volumes, a twin of each one with a one-sided pleural effusion:"
            " the same phantom and report wording with the fluid on the other side.",
        ),
    ] = False,
    clear_twins: Annotated[
        bool,
        typer.Option(
            "--clear-twins",
            help="Also write, after those, a twin of each of the N volumes with a pleural effusion: the"
            " same phantom and report without the fluid.",
        ),
    ] = False,
    nodule_twins: Annotated[
        bool,
        typer.Option(
            "--nodule-twins",
            help="Also write, after those, a twin of each of the N volumes with a lung nodule: the same"
            " phantom and report without the nodule.",
        ),
    ] = False,
    overwrite: Overwrite = False,
):
    """Write a procedural chest-CT phantom data set with reports and ground truth."""
    from ctflow.data.ctrate import CTRateWriter
    from ctflow.data.phantom import clear_twin, make_phantom, sample_spec, side_twin
    from ctflow.data.reports import phantom_report
    from ctflow.files import atomic_dir

    if n < 1:
        raise CTFlowError(f"--n must be at least 1, got {n}")
    if not 16 <= size <= 1024:
        raise CTFlowError(f"--size must be between 16 and 1024 pixels, got {size}")
    if not 1 <= min_slices <= max_slices <= 2048:
        raise CTFlowError(
            f"need 1 <= --min-slices <= --max-slices <= 2048, got {min_slices} and {max_slices}"
        )
    if not split.isalpha() or not split.islower():
        raise CTFlowError(f"--split must be lower-case letters like 'train' or 'valid', got {split!r}")
    from ctflow.data.phantom import FULL_COVERAGE_SLICES, MAX_SLICE_SPACING

    if min_slices < FULL_COVERAGE_SLICES:
        warn(
            f"phantoms of fewer than {FULL_COVERAGE_SLICES} slices may stop well short of the upper abdomen (the"
            f" spacing is capped at {MAX_SLICE_SPACING:g} mm), while their reports describe the whole chest;"
            f" --min-slices {FULL_COVERAGE_SLICES} or more avoids it"
        )
    if seed < 0:
        raise CTFlowError(f"--seed must be 0 or more, got {seed}")
    specs = [sample_spec(seed + i, size=size, slice_range=(min_slices, max_slices)) for i in range(n)]
    originals = list(specs)  # a twin keeps its original's seed, so the report is worded the same
    twin_kinds = (
        ("side", side_twins, side_twin),
        ("clear", clear_twins, clear_twin),
        ("nodule", nodule_twins, lambda spec: clear_twin(spec, "nodule")),
    )
    for _, wanted, twin in twin_kinds:
        if wanted:
            specs += [t for t in map(twin, originals) if t is not None]
    with atomic_dir(out, overwrite) as tmp, _progress() as bar:
        writer = CTRateWriter(tmp, split)
        task = bar.add_task("phantoms", total=len(specs))
        for i, spec in enumerate(specs):
            volume, truth = make_phantom(spec)
            writer.add(i, volume, phantom_report(truth, seed=spec.seed), truth["labels"], extra=truth)
            bar.advance(task)
        writer.close()
    kinds = [k for k, on, _ in twin_kinds if on]
    kinds = ", ".join(kinds[:-1]) + " and " * (len(kinds) > 1) + "".join(kinds[-1:])
    twins = f" ({len(specs) - n} of them {kinds} twins)" if kinds else ""
    console.print(f"wrote {len(specs)} phantom{'s' * (len(specs) != 1)} to {out}{twins}")


@app.command()
def preview(
    volume: Annotated[Path, typer.Argument(help="NIfTI file or DICOM series folder.")],
    out: Annotated[Path, typer.Option("--out", help="A .png (tri-planar) or .gif (axial scroll) path.")],
    gif: Annotated[
        bool, typer.Option("--gif", help="Write an axial scroll GIF (as a .gif --out does).")
    ] = False,
    overwrite: Overwrite = False,
):
    """Write a tri-planar preview (lung and mediastinal windows) or an axial scroll GIF."""
    from ctflow.data.io import read_volume
    from ctflow.data.preview import write_gif, write_preview

    suffix = out.suffix.lower()
    if gif and suffix != ".gif":
        raise CTFlowError(f"--gif writes a GIF: --out must end in .gif, got {out.name}")
    if suffix not in (".png", ".gif"):
        raise CTFlowError(f"--out must end in .png (tri-planar) or .gif (axial scroll), got {out.name}")
    gif = suffix == ".gif"
    vol = read_volume(volume)
    (write_gif if gif else write_preview)(vol, out, overwrite=overwrite)
    console.print(f"wrote {out}")


@app.command()
def info(volume: Annotated[Path, typer.Argument(help="NIfTI file or DICOM series folder.")]):
    """Print shape, spacing, orientation, HU range and whether a volume is synthetic."""
    import nibabel as nib
    import numpy as np

    from ctflow.data.io import read_volume

    vol = read_volume(volume)
    hu = vol.hu()
    facts = {
        "path": str(volume),
        "shape": list(vol.shape),
        "spacing_mm": [round(v, 4) for v in vol.spacing],
        # as read (ctflow reorients every volume to one layout); the file's own where it has one
        "orientation": "".join(vol.metadata.get("original_axcodes") or nib.aff2axcodes(vol.affine)),
        "hu_min": float(hu.min()),
        "hu_max": float(hu.max()),
        "hu_mean": round(float(hu.mean(dtype=np.float64)), 2),  # a float32 sum overflows past ~1e34
        "synthetic": vol.synthetic,
    }
    # a chest CT's air and lungs put many voxels near -1000 HU; values with almost none there are
    # likely stored values still to be rescaled (CT-RATE's files: HU + 1024 until its metadata's
    # RescaleIntercept is applied, as ctflow does when it reads the data set)
    if float(np.mean((hu > -1100) & (hu < -850))) < 0.01:
        facts["note"] = (
            "under 1% of voxels lie near air's -1000 HU: these may be stored values, not HU (a CT-RATE"
            " file needs its metadata CSV's RescaleSlope/Intercept, which ctflow applies when it reads"
            " the data set)"
        )
    typer.echo(json.dumps(facts, indent=1))


@app.command()
def encode(
    data: Annotated[Path, typer.Option("--data", help="Data set folder in the CT-RATE layout.")],
    vae: Annotated[Path, typer.Option("--vae", help="Trained slice VAE (diffusers folder).")],
    out: Annotated[Path, typer.Option("--out", help="Latent cache folder (resumable).")],
    split: Annotated[str, typer.Option(help="Split to encode.")] = "train",
    text_encoder: Annotated[
        Path | None, typer.Option(help="Report encoder folder (default: packaged MiniLM).")
    ] = None,
    shard_size: Annotated[int, typer.Option(help="Volumes per shard.")] = 32,
    report_variants: Annotated[
        int,
        typer.Option(
            help="Shortened versions of each report to encode too (training's short_reports reads them)."
        ),
    ] = 0,
    finding_masks: Annotated[
        bool,
        typer.Option(
            help="Also store where each volume's findings lie (phantom data sets; training's finding_weight"
            " reads them)."
        ),
    ] = False,
    device: Device = "cpu",
    overwrite: Overwrite = False,
):
    """Encode a data set into the latent cache that `ctflow train` reads."""
    from ctflow.generate import process_rank

    if process_rank()[1] > 1:  # every process would encode every volume into the same folder
        raise CTFlowError("ctflow encode runs in one process; start it without torchrun or accelerate launch")
    if report_variants < 0:
        raise CTFlowError(f"--report-variants must be 0 or more, got {report_variants}")
    if shard_size < 1:
        raise CTFlowError(f"--shard-size must be 1 or more volumes, got {shard_size}")
    from ctflow.data.ctrate import CTRateDataset
    from ctflow.device import resolve_device
    from ctflow.models.text import ReportEncoder
    from ctflow.models.vae import SliceVAE
    from ctflow.train.latents import encode_dataset

    device = resolve_device(device)
    ds = CTRateDataset.open(data, split)
    model = SliceVAE.load(vae).eval()
    model.vae.to(device)
    text = ReportEncoder.from_pretrained(text_encoder)
    text.model.to(device)
    size = int(model.vae.config.sample_size)
    # said, not silent: a VAE straight from FLUX's files has sample_size 1024, and would upsample CT-RATE
    console.print(
        f"slices are resized to {size}x{size} px, the VAE's sample_size (train-vae sets it to image_size)",
        soft_wrap=True,
    )
    with _progress() as bar:
        task = bar.add_task("encode", total=len(ds))
        cache = encode_dataset(
            ds,
            model,
            text,
            out,
            image_size=size,
            shard_size=shard_size,
            overwrite=overwrite,
            progress=lambda k: bar.advance(task, k),
            report_variants=report_variants,
            finding_masks=finding_masks,
        )
    for problem in ds.problems:
        console.print(f"skipped {problem}", markup=False)
    encoded = json.loads((cache / "index.json").read_text())["num_volumes"]
    console.print(f"encoded {encoded} volumes into {out}")


@app.command("train-vae")
def train_vae_cmd(
    data: Annotated[Path, typer.Option("--data", help="Data set folder in the CT-RATE layout.")],
    out: Annotated[Path, typer.Option("--out", help="Run folder: vae/, checkpoints/, log.jsonl.")],
    config: Annotated[Path | None, typer.Option(help="YAML config (VAETrainConfig).")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the last checkpoint in --out.")
    ] = False,
    init: Annotated[
        Path | None,
        typer.Option(
            "--init", help="Start from these weights: a diffusers VAE folder or FLUX's ae.safetensors."
        ),
    ] = None,
    device: Device = "cpu",
):
    """Train the slice autoencoder with the A-VAE objective."""
    from ctflow.device import resolve_device
    from ctflow.train.config import VAETrainConfig, load_config
    from ctflow.train.vae_trainer import train_vae

    device = resolve_device(device)
    cfg = load_config(config, VAETrainConfig) if config else VAETrainConfig()
    if init is not None:
        if not init.exists():
            raise CTFlowError(
                f"--init {init} not found; pass a diffusers VAE folder or an ae.safetensors file"
            )
        cfg.init = str(init)
    # problems quote file names and CSV cells: text, not rich markup
    written = train_vae(
        data,
        cfg,
        out,
        resume=resume,
        progress=True,
        device=device,
        log=lambda t: console.print(t, markup=False),
    )
    if written is not None:
        console.print(f"wrote {written}")
    else:
        console.print(f"{out} had finished its {cfg.steps} steps; {out / 'vae'} is as it was")


@app.command()
def train(
    latents: Annotated[Path, typer.Option("--latents", help="Latent cache from `ctflow encode`.")],
    config: Annotated[Path, typer.Option("--config", help="YAML config, e.g. configs/tiny-phantom.yaml.")],
    out: Annotated[Path, typer.Option("--out", help="Run folder: transformer/, checkpoints/, log.jsonl.")],
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the last checkpoint in --out.")
    ] = False,
):
    """Train the chunk flow transformer (runs under accelerate launch / torchrun too)."""
    from ctflow.generate import process_rank
    from ctflow.train.config import FlowTrainConfig, load_config
    from ctflow.train.flow_trainer import train_flow

    cfg = load_config(config, FlowTrainConfig)
    written = train_flow(latents, cfg, out, resume=resume, progress=True)
    if written is not None:  # the main process, when it wrote the weights
        console.print(f"wrote {written}")
    elif resume and process_rank()[0] == 0:
        console.print(f"{out} had finished its {cfg.steps} steps; {out / 'transformer'} is as it was")


@app.command()
def assemble(
    vae: Annotated[Path, typer.Option("--vae", help="Trained slice VAE (diffusers folder).")],
    transformer: Annotated[Path, typer.Option("--transformer", help="Trained flow transformer folder.")],
    latents: Annotated[
        Path, typer.Option("--latents", help="The latent cache the transformer was trained on.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Model folder to write (for generate --model).")],
    text_encoder: Annotated[
        Path | None,
        typer.Option(help="Report encoder the cache was encoded with (default: packaged MiniLM)."),
    ] = None,
    name: Annotated[str, typer.Option(help="Model name recorded in every sidecar.")] = "ctflow",
    overwrite: Overwrite = False,
):
    """Assemble a model folder from trained parts, with the settings their latent cache implies."""
    from ctflow.pipeline import check_model_output
    from ctflow.train.assemble import assemble_pipeline

    check_model_output(out, overwrite)  # before the parts load, not after
    pipe = assemble_pipeline(vae, transformer, latents, text_encoder=text_encoder, name=name)
    pipe.save_pretrained(out, overwrite=overwrite)
    console.print(f"wrote {out}")


@app.command()
def generate(
    report: Annotated[str | None, typer.Argument(help="Report text (Findings/Impressions).")] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Output .nii.gz (or a folder with --prompts).")
    ] = None,
    report_file: Annotated[
        Path | None, typer.Option("--report-file", help="Read the report from a file.")
    ] = None,
    prompts: Annotated[
        Path | None,
        typer.Option(
            "--prompts",
            help="CSV with a 'report' column (optional: name, slices, seed; a row without a seed gets --seed"
            " + its row index). Resumable: finished rows are skipped, rows a stopped run left half-written"
            " are redone; other existing files need --overwrite.",
        ),
    ] = None,
    dicom: Annotated[
        Path | None,
        typer.Option(
            "--dicom", help="Also write a DICOM series folder (with --prompts: one per row inside it)."
        ),
    ] = None,
    slices: Annotated[
        int | None,
        typer.Option(
            "--slices",
            help="Number of slices (default: the model ends the scan); without a spacing in the report,"
            " the slice spacing follows it. The most the volume gets: a model that ends its scan sooner"
            " ends it there (the sidecar's end_reason says which). Best within the model's training"
            " counts (40 to 120 for the embedded model; others are warned about).",
        ),
    ] = None,
    max_slices: Annotated[
        int | None, typer.Option("--max-slices", help="Upper limit when the model decides.")
    ] = None,
    steps: Annotated[int, typer.Option("--steps", help="ODE steps per chunk.")] = 20,
    guidance: Annotated[
        float,
        typer.Option(
            "--guidance",
            help="Classifier-free guidance scale: 1 none, above 1 stronger, 0 ignores the report.",
        ),
    ] = 2.0,
    finding_guidance: Annotated[
        float | None,
        typer.Option(
            "--finding-guidance",
            help="Guidance of the finding flags parsed from the report, apart from the text (default: --guidance).",
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed (recorded in the sidecar).")] = None,
    batch_size: Annotated[
        int,
        typer.Option("--batch-size", help="With --prompts: rows generated together, in one pipeline call."),
    ] = 1,
    model: Annotated[
        Path | None, typer.Option("--model", help="Model folder (default: embedded model).")
    ] = None,
    device: Device = "cpu",
    dtype: Dtype = "float32",
    overwrite: Overwrite = False,
):
    """Generate a synthetic CT volume from a radiology report."""
    from ctflow.device import resolve_device, resolve_dtype
    from ctflow.generate import GenerationSettings, generate_one, generate_prompts, read_report_file
    from ctflow.pipeline import CTFlowPipeline

    sources = [x is not None for x in (report, report_file, prompts)]
    if sum(sources) != 1:
        raise CTFlowError("give exactly one of: a REPORT argument, --report-file or --prompts")
    if out is None:
        raise CTFlowError("--out is required (a .nii.gz path, or a folder with --prompts)")
    if batch_size < 1:
        raise CTFlowError(f"--batch-size must be at least 1, got {batch_size}")
    if slices is not None and max_slices is not None:
        raise CTFlowError(
            "--slices sets the count and --max-slices only stops a scan the model has not ended; pass one"
        )
    settings = GenerationSettings(
        slices,
        max_slices,
        steps,
        guidance,
        seed,
        dicom,
        overwrite,
        finding_guidance=finding_guidance,
        dicom_is_series=prompts is None,
    )
    settings.check()
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    if report_file is not None:
        report = read_report_file(report_file)
    if report is not None and not report.strip():
        raise CTFlowError("the report is empty; pass the Findings/Impressions text to generate from")
    if prompts is not None:
        from ctflow.generate import read_prompts

        read_prompts(prompts)  # validate before loading the model
        pipe = CTFlowPipeline.from_pretrained(model).to(device, dtype)
        with _progress() as bar:
            task = bar.add_task("prompts", total=None)
            generate_prompts(
                pipe,
                prompts,
                out,
                settings,
                log=console.print,
                batch_size=batch_size,
                progress=lambda done, todo: bar.update(task, completed=done, total=todo),
            )
        return
    from ctflow.files import check_output
    from ctflow.generate import every_output

    for p in every_output(out, dicom):  # before the model loads
        check_output(p, overwrite)
    pipe = CTFlowPipeline.from_pretrained(model).to(device, dtype)
    with _progress() as bar:
        task = bar.add_task("generate", total=None)
        expected = pipe.expected_chunks(report, slices)

        def on_step(chunk, step, steps):  # the bar and its ETA cover the whole volume, not one chunk
            chunks = max(expected, chunk + 1)
            bar.update(
                task,
                description=f"chunk {chunk + 1}/{chunks}",
                completed=chunk * steps + step + 1,
                total=chunks * steps,
            )

        sidecar = generate_one(pipe, report, out, settings, progress=on_step)
        bar.update(task, completed=bar.tasks[0].total)  # the model may end the scan before the expected chunk
    console.print(
        f"wrote {out} ({sidecar['num_slices']} slices, ended by {sidecar['end_reason']}, {sidecar['seconds']:.1f} s)"
    )


@app.command()
def evaluate(
    real: Annotated[
        Path,
        typer.Option(
            "--real",
            help="Reference data set in the CT-RATE layout; every split in it is pooled (give one holding"
            " only held-out volumes).",
        ),
    ],
    fake: Annotated[
        Path, typer.Option("--fake", help="Folder of generated .nii.gz files with JSON sidecars.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder for results.json and report.md.")],
    train: Annotated[
        Path | None,
        typer.Option(
            "--train",
            help="The model's training set (CT-RATE layout), for the memorisation audit; without it the"
            " audit compares against --real.",
        ),
    ] = None,
    overwrite: Overwrite = False,
):
    """Score generated volumes: FID (3 planes), FVD, CLIP score, attributes, continuity, memorization."""
    from ctflow.eval.evaluate import evaluate_command

    # paths and volume names are text, not rich markup ("runs/[v2]" lost its "[v2]")
    evaluate_command(
        real,
        fake,
        out,
        overwrite=overwrite,
        log=lambda text: console.print(text, markup=False),
        train=train,
        show=typer.echo,  # the table on stdout, for `> table.md`
    )


@convert_app.command("ctclip")
def convert_ctclip(
    checkpoint: Annotated[
        Path, typer.Argument(help="CT-CLIP checkpoint (.pt), read with weights_only=True.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Output transformers folder.")],
    tokenizer: Annotated[Path | None, typer.Option(help="Tokenizer folder to copy in (CXR-BERT).")] = None,
    num_attention_heads: Annotated[
        int | None,
        typer.Option("--num-attention-heads", help="Attention heads (default: width / 64, BERT's)."),
    ] = None,
    overwrite: Overwrite = False,
):
    """Extract CT-CLIP's text tower into a transformers folder (safetensors)."""
    from ctflow.models.ctclip import convert_ctclip as convert

    convert(
        checkpoint, out, tokenizer=tokenizer, num_attention_heads=num_attention_heads, overwrite=overwrite
    )
    console.print(f"wrote {out}")
    if tokenizer is None:
        console.print(
            f"note: no tokenizer copied; put the text tower's tokenizer files (CXR-BERT's vocab.txt,"
            f" tokenizer_config.json) into {out} before using it"
        )


@app.command("app")
def web_app(
    host: Annotated[
        str, typer.Option("--host", help="Address to serve on (0.0.0.0: every interface).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to serve on.")] = 7860,
    model: Annotated[
        Path | None, typer.Option("--model", help="Model folder (default: embedded model).")
    ] = None,
    device: Device = "cpu",
    dtype: Dtype = "float32",
):
    """Start the web app: type a report, watch the volume appear, download the NIfTI."""
    import importlib.util

    from ctflow.device import resolve_device, resolve_dtype

    if importlib.util.find_spec("gradio") is None:
        raise CTFlowError("the web app needs the 'app' extra: pip install 'ctflow[app]'")
    from ctflow.app import launch

    launch(host, port, model=model, device=resolve_device(device), dtype=resolve_dtype(dtype))


def _one_line_warnings(show_other):
    """A ``warnings.showwarning`` that prints ours as one line, ``warning: <message>``, and hands
    others to ``show_other``."""

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, CTFlowWarning):
            from rich.markup import escape

            console.print(
                f"[yellow]warning:[/yellow] {escape(str(message))}", highlight=False, soft_wrap=True
            )
        else:
            show_other(message, category, filename, lineno, file, line)

    return show


def _exception_classes() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(usage errors, aborts) as click raises them and as typer >= 0.29 does (its own copy of click's
    classes, which click's ``except`` clauses do not catch)."""
    usage, aborts = [], []
    try:
        import click

        usage.append(click.ClickException)
        aborts.append(click.exceptions.Abort)
    except ImportError:
        pass
    try:
        from typer._click.exceptions import ClickException
        from typer.exceptions import Abort

        usage.append(ClickException)
        aborts.append(Abort)
    except ImportError:
        pass
    return tuple(usage), tuple(aborts)


def _usage_error(e) -> int:
    """A command-line usage error (an unknown option, a value that is not a number) as one line, naming
    the --help to read; a bare ``ctflow`` prints the help."""
    if type(e).__name__ == "NoArgsIsHelpError":
        e.show()
        return e.exit_code
    ctx = getattr(e, "ctx", None)
    where = f"; see {ctx.command_path} --help" if ctx is not None else "; see ctflow --help"
    _print_error(" ".join(e.format_message().split()).rstrip(".") + where)
    return e.exit_code


def _print_error(message: str) -> None:
    """``error: <message>`` on one line (the message is text, not rich markup)."""
    from rich.markup import escape

    console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)


def _stop_on_sigterm(*_) -> None:
    """SIGTERM (a job scheduler, a service manager, torchrun stopping its workers) unwinds like Ctrl-C,
    so temporary files are removed instead of left beside the outputs."""
    raise SystemExit(143)


def main(argv: list[str] | None = None) -> int:
    """Run the app on ``argv`` and return the exit code, turning CTFlowError into one line and exit code 1."""
    import signal
    import threading

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    usage, aborts = _exception_classes()
    main_thread = threading.current_thread() is threading.main_thread()
    before = signal.signal(signal.SIGTERM, _stop_on_sigterm) if main_thread else None
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warnings(warnings.showwarning)
            rv = app(args=argv, standalone_mode=False, prog_name="ctflow")
    except CTFlowError as e:
        _print_error(str(e))
        return 1
    except (*aborts, KeyboardInterrupt):
        console.print("aborted")
        return 130
    except usage as e:
        return _usage_error(e)
    finally:
        if main_thread and before is not None:  # the caller's handler back (tests and Python call main)
            signal.signal(signal.SIGTERM, before)
    if rv == 130:  # typer >= 0.29 turns Ctrl-C into Exit(130), returned as the exit code
        console.print("aborted")
    return rv if isinstance(rv, int) else 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
