"""A generation pipeline from trained parts (``ctflow assemble``).

The slice VAE, the flow transformer and the report encoder are trained apart; the pipeline also
needs settings that only the latent cache they were trained on knows: the slice size, the pixel
and slice spacing, the typical slice count (where a report without one ends its scan) and the
latent end-of-scan threshold. :func:`assemble_pipeline` reads them from the cache and checks that
the parts fit together, so a mismatch is a one-line error here and not a shape error at generation.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from ctflow.errors import CTFlowError

EOS_FRACTION = 0.35  # the latent EOS threshold: this share of the 1st percentile of slice-to-EOS distances


def eos_threshold(latents: str | Path, fraction: float = EOS_FRACTION) -> float:
    """A latent-space EOS threshold: ``fraction`` of the 1st percentile of real-slice-to-EOS distances."""
    from ctflow.train.latents import LatentCache

    cache = LatentCache(latents)
    d = torch.cat(
        [
            ((cache.tensor(i, "latents") - cache.eos[:, None]) ** 2).mean(dim=(0, 2, 3))
            for i in range(len(cache))
        ]
    )
    return round(float(fraction * d.quantile(0.01)), 4)


def cache_settings(latents: str | Path) -> dict:
    """The pipeline settings a latent cache implies: slice size, mean in-plane pixel spacing of the
    slices as encoded (after the resize to the slice size), median slice spacing, median and
    range of slice counts and of slice spacings, median length covered (slices x spacing),
    a default limit a third above the longest scan, the latent EOS threshold and how many volumes the
    cache holds (recorded as ``training_volumes``)."""
    index_path = Path(latents) / "index.json"
    if not index_path.is_file():
        raise CTFlowError(f"{latents} is not a finished latent cache (no index.json); run ctflow encode")
    index = json.loads(index_path.read_text())
    volumes = index["volumes"]
    if not volumes:
        raise CTFlowError(f"the latent cache {latents} holds no volumes")
    # caches written before 2026-12-04 store the volume's own spacing only (right when not resized)
    pixel = [v["pixel_spacing"][1] if "pixel_spacing" in v else v["spacing"][1] for v in volumes]
    counts = [v["num_slices"] for v in volumes]
    return {
        "image_size": int(index["image_size"]),
        "pixel_spacing": float(sum(pixel) / len(pixel)),
        "slice_spacing": float(statistics.median(v["spacing"][0] for v in volumes)),
        "default_max_slices": int(max(counts) * 4 / 3),
        "typical_slices": int(statistics.median(counts)),
        "training_slices": [min(counts), max(counts)],  # counts outside are warned about
        # the spacings they had: a spacing derived from the length is kept within them (see
        # CTFlowPipeline.slice_spacing_for)
        "training_spacing_mm": [min(v["spacing"][0] for v in volumes), max(v["spacing"][0] for v in volumes)],
        # the length a scan covers: the spacing of a volume whose report gives no spacing follows it
        "typical_extent_mm": round(
            float(statistics.median(v["num_slices"] * v["spacing"][0] for v in volumes)), 2
        ),
        "eos_latent_mse": eos_threshold(latents),
        "training_volumes": len(volumes),
        "latent_shape": list(index["latent_shape"]),
        "text_dim": int(index["text_dim"]),
    }


def _training_record(transformer: Path) -> dict:
    """What a transformer folder records of its training (the trainer's training.json; an exported
    checkpoint's trained_steps.txt for the step), or {} for a folder from before either."""
    from ctflow.train.flow_trainer import TRAINING_RECORD

    damaged = CTFlowError(f"{transformer}'s training record is damaged; export the run's transformer again")
    try:
        record = json.loads((transformer / TRAINING_RECORD).read_text())
    except FileNotFoundError:
        record = {}
    except ValueError:
        raise damaged from None
    if not isinstance(record, dict):
        raise damaged
    if "step" not in record and (transformer / "trained_steps.txt").is_file():
        try:
            record["step"] = int((transformer / "trained_steps.txt").read_text().strip())
        except ValueError:
            raise damaged from None
    return record


def _check_transformer_run(transformer: Path, latents) -> None:
    """Name the usual slips with a ``ctflow train`` run: its folder given for its transformer/, a run
    not yet finished, and a cache other than the one it trained on (its checkpoints record that)."""
    from ctflow.train.checkpoint import list_checkpoints
    from ctflow.train.latents import LatentCache

    if not (transformer / "config.json").is_file() and (
        (transformer / "transformer").is_dir() or (transformer / "checkpoints").is_dir()
    ):
        raise CTFlowError(
            f"{transformer} is a training run or model folder; pass its transformer folder,"
            f" {transformer / 'transformer'}"
        )
    given = LatentCache(latents).fingerprint

    def same_cache(trained_on: str | None, trained: str, own: str) -> None:
        if trained_on and trained_on != given:
            raise CTFlowError(
                f"these parts were not trained together: {trained} on another latent cache (fingerprint"
                f" {trained_on}; {latents}: {given}); pass {own} --latents"
            )

    record = _training_record(transformer)
    same_cache(record.get("latents"), f"{transformer} was trained", "its own")  # wherever it was copied
    checkpoints = list_checkpoints(transformer.parent / "checkpoints")
    if not checkpoints:
        return
    try:
        info = json.loads((checkpoints[-1] / "state.json").read_text())
    except ValueError:
        raise CTFlowError(
            f"{checkpoints[-1] / 'state.json'} is not valid JSON; the checkpoint is damaged"
        ) from None
    newest, steps = info.get("step"), info.get("config", {}).get("steps")
    if not (transformer / "config.json").is_file():
        raise CTFlowError(
            f"{transformer} is not written yet: the run is at step {newest} of {steps or '?'}; finish it"
            " with ctflow train --resume"
        )
    # a run resumed past its transformer/ (a fine-tune) and stopped: transformer/ holds older weights
    written_at = record.get("step")
    if isinstance(newest, int) and (
        (written_at is not None and newest > written_at)
        or (written_at is None and isinstance(steps, int) and newest < steps)
    ):
        raise CTFlowError(
            f"{transformer} is older than its run: the run is at step {newest} of {steps}"
            f"{f', its transformer from step {written_at}' if written_at is not None else ''}; finish it with"
            " ctflow train --resume"
        )
    same_cache(info.get("latents"), f"{transformer.parent} trained", "the run's own")


def assemble_pipeline(
    vae: str | Path,
    transformer: str | Path,
    latents: str | Path,
    text_encoder: str | Path | None = None,
    name: str = "ctflow",
    **config,
):
    """A :class:`~ctflow.pipeline.CTFlowPipeline` from a VAE folder, a transformer folder, the latent
    cache the transformer was trained on and the report encoder that encoded it (None: the packaged
    MiniLM, which the saved pipeline then names instead of copying). ``config`` overrides or adds to
    the settings read from the cache (e.g. ``slice_spacing``, ``default_max_slices``)."""
    from ctflow.flow import make_scheduler
    from ctflow.models.text import DEFAULT_TEXT_ENCODER, load_text_encoder
    from ctflow.models.transformer import CTFlowTransformer
    from ctflow.models.vae import SliceVAE
    from ctflow.pipeline import CTFlowPipeline

    settings = cache_settings(latents)
    latent_shape, text_dim = settings.pop("latent_shape"), settings.pop("text_dim")
    for part, path in (("VAE", vae), ("transformer", transformer)):
        if Path(path).is_file():
            raise CTFlowError(f"{part} {path} is a file; pass the folder that holds it with its config.json")
    _check_transformer_run(Path(transformer), latents)
    for part, path in (("VAE", vae), ("transformer", transformer)):
        if not Path(path, "config.json").is_file():
            raise CTFlowError(f"{part} folder {path} not found or has no config.json")
    slice_vae = SliceVAE.load(vae)
    try:
        flow = CTFlowTransformer.from_pretrained(transformer, use_safetensors=True, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise CTFlowError(f"cannot load {transformer}: {str(e).splitlines()[0]}") from None
    encoder, tokenizer = load_text_encoder(text_encoder)
    c, h, _ = latent_shape
    size = settings["image_size"]
    problems = [
        f"the VAE makes {slice_vae.latent_channels} latent channels, the cache holds {c}"
        if slice_vae.latent_channels != c
        else None,
        f"the VAE maps {size} px slices to {size // slice_vae.downsample_factor} px latents, the cache holds {h}"
        if size // slice_vae.downsample_factor != h
        else None,
        f"the transformer reads {flow.config.in_channels} x {flow.config.sample_size} px latents, the cache holds {c} x {h}"
        if (flow.config.in_channels, flow.config.sample_size) != (c, h)
        else None,
        f"the transformer reads {flow.config.text_dim}-wide report features, the encoder gives"
        f" {encoder.config.hidden_size} (the cache {text_dim})"
        if not flow.config.text_dim == encoder.config.hidden_size == text_dim
        else None,
    ]
    stamp = Path(latents) / "encoding.json"  # caches since 2026-12-04 record their encoders
    if stamp.is_file():
        from ctflow.train.latents import module_fingerprint, tokenizer_fingerprint, vae_fingerprint

        encoded_by = json.loads(stamp.read_text())
        report = text_encoder or "the default report encoder"
        for key, part, fingerprint in (
            ("VAE (weights sha256)", vae, lambda: vae_fingerprint(slice_vae)),
            ("report encoder (weights sha256)", report, lambda: module_fingerprint(encoder)[:16]),
            ("report tokenizer (sha256)", f"{report}'s tokenizer", lambda: tokenizer_fingerprint(tokenizer)),
        ):  # the cache's latents and report features are what the transformer learned to read
            if (recorded := encoded_by.get(key)) and recorded != (given := fingerprint()):
                what = key.split(" (")[0]
                problems.append(
                    f"the cache was encoded by another {what} ({key} {recorded}; {part}: {given})"
                )
    if any(problems):
        raise CTFlowError("these parts were not trained together: " + "; ".join(p for p in problems if p))
    settings.update(
        name=name, text_encoder_source=DEFAULT_TEXT_ENCODER if text_encoder is None else None, **config
    )
    return CTFlowPipeline(slice_vae, encoder, tokenizer, flow, make_scheduler("euler"), settings)
