"""The latent cache that flow training reads (``ctflow encode``).

Each CT volume of a data set is normalised (HU window -> [-1, 1]), resized
in-plane to the VAE's input size, encoded slice by slice, and stored with its
report embeddings in safetensors shards::

    LATENTS/shard_00000.safetensors   <name>.latents [C,S,h,w] fp16,
                                      <name>.tokens [L,D] / <name>.pooled [D] (report with meta line),
                                      <name>.tokens_nometa / <name>.pooled_nometa (without it),
                                      <name>.tokens_short{j}[_nometa] / <name>.pooled_short{j}[_nometa]:
                                      the shortened report variants (``report_variants``),
                                      <name>.finding_mask [S,h,w] fp16 (``finding_masks``): the share
                                      of each latent pixel that a finding covers
    LATENTS/shard_00000.json          per volume: name, report, num_slices, spacing, labels and, where
                                      the data set has them, finding_slices (``CTRateSample``)
    LATENTS/eos.safetensors           the EOS slice latent (a white slice) [C,h,w]
    LATENTS/encoding.json             written first: what the shards are encoded with (VAE and report
                                      encoder weights, slice size, shard size, data set, variants)
    LATENTS/index.json                written last: settings and all volumes

Shards are written atomically; a rerun with the same settings skips finished shards (resumable), a
rerun with other settings is refused, and ``--overwrite`` removes the old cache before starting again.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ctflow.data.ctrate import sidecar_path
from ctflow.errors import CTFlowError, CTFlowWarning, warn
from ctflow.files import atomic_path, remove_temporaries, write_text_atomic
from ctflow.models.text import META_PATTERN, ReportEncoder, strip_meta


def prepare_slices(hu: np.ndarray, size: int, window=None) -> torch.Tensor:
    """HU [S,H,W] -> normalised [-1,1] float tensor [S,size,size] (bilinear in-plane resize).

    ``window``: the VAE's HU window (``SliceVAE.hu_window``); default ``HU_WINDOW``.
    """
    from ctflow.data.hu import HU_WINDOW, normalize_hu

    x = torch.from_numpy(normalize_hu(np.asarray(hu, dtype=np.float32), window or HU_WINDOW))
    if x.shape[-2:] != (size, size):
        x = torch.nn.functional.interpolate(
            x[:, None], size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )[:, 0]
    return x.clamp(-1, 1)


def latent_mask(mask: np.ndarray, image_size: int, latent_size: int) -> torch.Tensor:
    """Boolean voxel map [S,H,W] -> [S,latent_size,latent_size]: the share of each latent pixel it covers
    (area-resized to the VAE's input size, as :func:`prepare_slices` resizes the volume, then averaged
    over each latent pixel's footprint)."""
    x = torch.from_numpy(np.asarray(mask, dtype=np.float32))[:, None]
    if x.shape[-2:] != (image_size, image_size):
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="area")
    return torch.nn.functional.adaptive_avg_pool2d(x, latent_size)[:, 0]


SENTENCE_BREAK = re.compile(r"(?<=[.;])\s+(?=[A-Z0-9])")
SECTIONS = re.compile(r"^(?:Findings:\s*(?P<findings>.*?))?\s*(?:Impressions:\s*(?P<impressions>.*))?$", re.S)


def shortened_reports(report: str, n: int, seed: int = 0) -> list[str]:
    """``n`` shorter versions of a conditioning text (``format_report``'s layout) to train on.

    Training reports are long and complete; people type a few lines. Each version keeps the meta
    line and, in order, a random subset of the Findings sentences (each kept with a probability drawn
    per version from [0.15, 0.85], at least one) with all of the Impressions; one version in five
    instead keeps all of the Findings and drops the Impressions. A report without both sections comes
    back whole. The phantom reports repeat every positive finding in the Impressions, so no version
    loses one; a CT-RATE finding named only in the Findings can be dropped from a version. The same
    report and seed give the same versions.
    """
    text = " ".join(report.split())
    m = META_PATTERN.match(text)
    meta, body = (text[: m.end()] + " ", text[m.end() :].strip()) if m else ("", text)
    parts = SECTIONS.match(body)
    if not (parts and parts["findings"] and parts["impressions"]):
        return [text] * n
    findings = SENTENCE_BREAK.split(parts["findings"].strip())
    impressions = " Impressions: " + parts["impressions"].strip()
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x5407])
    out = []
    for _ in range(n):
        if rng.random() < 0.2:  # all of the Findings, no Impressions
            out.append(f"{meta}Findings: {' '.join(findings)}")
            continue
        mask = rng.random(len(findings)) < rng.uniform(0.15, 0.85)
        mask[int(rng.integers(len(findings)))] |= not mask.any()
        kept = [s for s, k in zip(findings, mask, strict=True) if k]
        out.append(f"{meta}Findings: {' '.join(kept)}{impressions}")
    return out


def short_key(j: int) -> str:
    """The key suffix of a report's ``j``-th shortened version in the cache (``<name>.tokens_short0``)."""
    return f"_short{j}"


def report_keys(report_variants: int) -> list[str]:
    """The key suffixes of a volume's report versions in the cache, in order: the report itself (``""``),
    then its ``report_variants`` shortened versions; each is stored with and without its meta line
    (the suffix plus ``"_nometa"``)."""
    return ["", *map(short_key, range(report_variants))]


def module_fingerprint(module: torch.nn.Module, config: dict | None = None) -> str:
    """SHA-256 over a module's parameter and buffer names, shapes, dtypes and values (and ``config``,
    such as a VAE's latent scaling and HU window): two encoders with the same fingerprint encode alike.
    The config's record of where it was loaded from and by which diffusers version is left out: the
    same weights given by another path spell the same encoder."""
    config = {k: v for k, v in (config or {}).items() if k not in ("_name_or_path", "_diffusers_version")}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in module.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # (0-d too)
    return h.hexdigest()


def vae_fingerprint(vae) -> str:
    """A slice VAE's fingerprint as ``encoding.json`` records it (weights and config)."""
    return module_fingerprint(vae, dict(vae.vae.config))[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    """A tokenizer's fingerprint as ``encoding.json`` records it: its class, vocabulary and casing."""
    facts = [
        type(tokenizer).__name__,
        getattr(tokenizer, "do_lower_case", None),
        sorted(tokenizer.get_vocab().items()),
    ]
    return hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:16]


def data_set_fingerprint(dataset) -> str:
    """A short hash of what a data set's volumes are: each record's report, spacing, rescale and file
    size (not the pixels: reading every volume would double an encode)."""
    h = hashlib.sha256()
    for r in dataset.records:
        try:
            size = Path(r.path).stat().st_size
        except OSError:
            size = -1
        fields = (r.name, r.findings, r.impressions, r.xy_spacing, r.z_spacing, r.slope, r.intercept, size)
        h.update(repr(fields).encode())
    return h.hexdigest()[:16]


def encoding_settings(dataset, vae, text, image_size, shard_size, report_variants, finding_masks) -> dict:
    """What a cache's shards depend on; a resume must match it entry for entry."""
    names = "\n".join(r.name for r in dataset.records)
    return {
        "data set": f"{Path(dataset.root).resolve()} ({dataset.split}, {len(dataset)} volumes, names sha256"
        f" {hashlib.sha256(names.encode()).hexdigest()[:16]})",
        # the reports, spacings and file sizes: phantoms made again under the same names between a stop
        # and a resume gave one cache of two data sets
        "data set contents (sha256)": data_set_fingerprint(dataset),
        "VAE (weights sha256)": vae_fingerprint(vae),
        "report encoder (weights sha256)": module_fingerprint(text.model)[:16],
        "report tokenizer (sha256)": tokenizer_fingerprint(text.tokenizer),
        "slice size": image_size,
        "shard size": shard_size,
        "number of report variants": report_variants,
        "finding-mask setting": finding_masks,
    }


def _same_data_set(recorded: str, now: str) -> bool:
    """Whether two "data set" records name the same data: the same folder, however spelled (caches
    before 2026-12-05 recorded the path as given), and the same split, count and names."""
    (a, _, rest_a), (b, _, rest_b) = recorded.rpartition(" ("), now.rpartition(" (")
    return rest_a == rest_b and Path(a).resolve() == Path(b).resolve()


def check_resumable(out: Path, settings: dict) -> None:
    """Refuse to add shards to an unfinished cache begun with other settings."""
    if not any(out.glob("shard_*.json")):
        return
    stamp = out / "encoding.json"
    if not stamp.is_file():
        raise CTFlowError(
            f"{out} holds shards of an unfinished cache that records no settings; pass --overwrite to"
            " start it again"
        )
    begun = json.loads(stamp.read_text())
    for key, value in settings.items():
        if key not in begun:  # a setting caches begun before it was recorded do not name
            continue
        if key == "data set" and _same_data_set(begun[key], value):
            continue
        if begun.get(key) != value:
            raise CTFlowError(
                f"{out} holds an unfinished cache encoded with a different {key} ({begun.get(key)} there,"
                f" {value} now); pass --overwrite to start it again"
            )


def encode_dataset(
    dataset,
    vae,
    text: ReportEncoder,
    out: str | Path,
    image_size: int,
    shard_size: int = 32,
    batch_size: int = 16,
    overwrite: bool = False,
    progress=None,
    report_variants: int = 0,
    finding_masks: bool = False,
) -> Path:
    """Encode a CT-RATE-layout data set into the latent cache; resumable.

    ``report_variants``: how many shortened versions of each report (:func:`shortened_reports`,
    seeded by the volume's name) to encode as well, with and without the meta line; training reads
    them with probability ``FlowTrainConfig.short_reports``. ``finding_masks``: also store where each
    volume's findings lie on the latent grid (:meth:`CTRateDataset.finding_mask`; phantom data sets), which
    ``FlowTrainConfig.finding_weight`` weights the loss with; a volume without one is an error.
    """
    if report_variants < 0:
        raise CTFlowError(f"report_variants must be 0 or more, got {report_variants}")
    if shard_size < 1:
        raise CTFlowError(f"shard size must be 1 or more volumes, got {shard_size}")
    out = Path(out)
    if (out / "index.json").exists() and not overwrite:
        raise CTFlowError(f"{out} already holds a finished latent cache; pass --overwrite to redo it")
    if finding_masks:  # refuse before writing anything, not at the first volume without ground truth
        bare = [r.name for r in dataset.records if not sidecar_path(r.path).exists()]
        if bare:
            which = f"{bare[0]} and {len(bare) - 1} more have" if len(bare) > 1 else f"{bare[0]} has"
            raise CTFlowError(
                f"{which} no phantom ground truth (the JSON `ctflow phantoms` writes), so no finding mask;"
                " encode without --finding-masks"
            )
    out.mkdir(parents=True, exist_ok=True)
    settings = encoding_settings(dataset, vae, text, image_size, shard_size, report_variants, finding_masks)
    if overwrite:  # the index first: a folder without it never reads as a finished cache
        for stale in [out / "index.json", out / "encoding.json", *out.glob("shard_*")]:
            stale.unlink(missing_ok=True)
    else:
        check_resumable(out, settings)
        if (out / "encoding.json").is_file():  # a cache begun earlier: a shard a killed run was writing
            remove_temporaries(out)
    write_text_atomic(out / "encoding.json", json.dumps(settings, indent=1), overwrite=True)
    eos = vae.eos_latent(image_size).float().cpu()  # [C,h,w]
    with atomic_path(out / "eos.safetensors", overwrite=True) as tmp:
        save_file({"eos": eos.contiguous()}, tmp)
    n = len(dataset)
    volumes = []
    upsampled = []  # volumes smaller in-plane than the VAE's input (a raw FLUX VAE: 1024 px)
    for start in range(0, n, shard_size):
        shard = out / f"shard_{start // shard_size:05d}"
        if shard.with_suffix(".json").exists() and shard.with_suffix(".safetensors").exists():
            rows = json.loads(shard.with_suffix(".json").read_text())
            encoded = {r["name"] for r in rows}
            dataset.problems += [  # keep the index's list of skipped volumes whole across a resume
                f"{r.name}: could not be read when its shard was encoded (an earlier run said why)"
                for r in dataset.records[start : start + shard_size]
                if r.name not in encoded
            ]
            volumes += rows
            if progress:
                progress(min(shard_size, n - start))
            continue
        tensors, rows, texts = {}, [], {}
        for i in range(start, min(start + shard_size, n)):
            try:
                sample = dataset.load(i)
            except CTFlowError as e:
                dataset.problems.append(f"{dataset.records[i].name}: {e}")
                continue
            if max(sample.volume.array.shape[1:]) < image_size:
                upsampled.append(f"{sample.name} ({'x'.join(map(str, sample.volume.array.shape[1:]))})")
            x = prepare_slices(sample.volume.hu(), image_size, vae.hu_window)
            z = vae.encode_volume(x, batch_size=batch_size)  # [C,S,h,w]
            name = sample.name
            tensors[f"{name}.latents"] = z.to(torch.float16).contiguous()
            if finding_masks:
                mask = dataset.finding_mask(i)
                if mask is None:
                    raise CTFlowError(
                        f"{name} has no phantom ground truth beside it, so no finding mask; encode without"
                        " --finding-masks"
                    )
                m = latent_mask(mask, image_size, int(eos.shape[-1]))
                tensors[f"{name}.finding_mask"] = m.to(torch.float16).contiguous()
            short = shortened_reports(sample.report, report_variants, zlib.crc32(name.encode()))
            for key, report in zip(report_keys(len(short)), [sample.report, *short], strict=True):
                texts[name, key] = report
                texts[name, key + "_nometa"] = strip_meta(report)
            rows.append(
                {
                    "name": name,
                    "report": sample.report,
                    **({"short_reports": short} if short else {}),
                    **({"finding_mask": True} if finding_masks else {}),
                    "num_slices": int(sample.volume.num_slices),
                    "spacing": list(sample.volume.spacing),
                    # in-plane spacing of the slices as encoded, after the resize to image_size
                    "pixel_spacing": [
                        float(sample.volume.spacing[1]) * sample.volume.array.shape[1] / image_size,
                        float(sample.volume.spacing[2]) * sample.volume.array.shape[2] / image_size,
                    ],
                    "labels": sample.labels,
                    **(
                        {"finding_slices": sample.finding_slices} if sample.finding_slices is not None else {}
                    ),
                }
            )
            if progress:
                progress(1)
        # the shard's reports, encoded together (grouped by length); a report cut at the encoder's limit
        # is named once, by its volume, not once per variant by its first words
        full = {name: report for (name, key), report in texts.items() if key == ""}
        cuts = text.truncated_tokens(list(full.values())) if full else []  # (a shard of unreadable volumes)
        for (name, report), cut in zip(full.items(), cuts, strict=True):
            if cut:
                warn(f"{name}: {text.truncation_note(report, cut)}")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "report truncated", CTFlowWarning)
            encoded = text.encode_each(list(texts.values())) if texts else []
        for (name, key), (tokens, pooled) in zip(texts, encoded, strict=True):
            tensors[f"{name}.tokens{key}"] = tokens.to("cpu", torch.float16).contiguous()
            tensors[f"{name}.pooled{key}"] = pooled.float().cpu().contiguous()
        with atomic_path(shard.with_suffix(".safetensors"), overwrite=True) as tmp:
            save_file(tensors or {"_empty": torch.zeros(1)}, tmp)
        write_text_atomic(shard.with_suffix(".json"), json.dumps(rows, indent=1), overwrite=True)
        volumes += rows
    if upsampled:
        warn(
            f"{upsampled[0]}{f' and {len(upsampled) - 1} more volumes were' if len(upsampled) > 1 else ' was'}"
            f" upsampled to {image_size}x{image_size} px, the VAE's sample_size: the latents hold no detail"
            " the slices had not, at more cost; a VAE trained at the data's size (train-vae's image_size)"
            " encodes them as they are"
        )
    if not volumes:
        raise CTFlowError(
            f"no volume of {dataset.root} could be encoded ({len(dataset.problems)} problems, e.g."
            f" {dataset.problems[0] if dataset.problems else 'none named'}); {out} holds no cache"
        )
    index = {
        "image_size": image_size,
        "latent_shape": list(eos.shape),
        "text_dim": text.hidden_size,
        "report_variants": report_variants,
        "finding_masks": finding_masks,
        "num_volumes": len(volumes),
        "problems": list(dataset.problems),
        "volumes": volumes,
    }
    write_text_atomic(out / "index.json", json.dumps(index, indent=1), overwrite=True)
    return out


@dataclass
class LatentVolume:
    name: str
    latents: torch.Tensor  # [C,S,h,w] float32
    tokens: torch.Tensor  # [L,D]
    pooled: torch.Tensor  # [D]
    tokens_nometa: torch.Tensor
    pooled_nometa: torch.Tensor
    num_slices: int
    spacing: list[float]


class LatentCache:
    """The volumes of a latent cache, read from their shards on demand.

    Only the index is held in memory; ``cache[i]`` reads volume ``i``'s tensors from its
    (memory-mapped) safetensors shard, so a CT-RATE-size cache trains in the memory of one batch.
    A few shards stay open (``open_shards``, least recently used first out).
    """

    def __init__(self, folder: str | Path, open_shards: int = 8):
        folder = Path(folder)
        index_path = folder / "index.json"
        if not index_path.is_file():
            raise CTFlowError(
                f"{folder} is not a finished latent cache (no index.json); run `ctflow encode` first"
            )
        self.folder = folder
        self.index = json.loads(index_path.read_text())
        self.eos = load_file(folder / "eos.safetensors")["eos"].float()  # [C,h,w]
        self.rows: list[tuple[Path, dict]] = []  # (shard, its index row) per volume
        for shard in sorted(folder.glob("shard_*.safetensors")):
            self.rows += [(shard, row) for row in json.loads(shard.with_suffix(".json").read_text())]
        if not self.rows:
            raise CTFlowError(f"latent cache {folder} holds no volumes")
        self._open: OrderedDict[Path, object] = OrderedDict()
        self._max_open = max(1, open_shards)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def report_variants(self) -> int:
        """Shortened versions stored per report (``encode_dataset(report_variants=...)``)."""
        return int(self.index.get("report_variants", 0))

    @property
    def finding_masks(self) -> bool:
        """Whether each volume has its ``finding_mask`` (``encode_dataset(finding_masks=True)``)."""
        return bool(self.index.get("finding_masks", False))

    def num_slices(self, i: int) -> int:
        return int(self.rows[i][1]["num_slices"])

    def tensor(self, i: int, key: str) -> torch.Tensor:
        """One stored tensor of volume ``i`` (``latents``, ``tokens``, ``pooled``, ``tokens_nometa``,
        ``pooled_nometa``, ``tokens_short{j}``, ...) as float32, read alone from its shard."""
        shard, row = self.rows[i]
        return self._shard(shard).get_tensor(f"{row['name']}.{key}").float()

    def __getitem__(self, i: int) -> LatentVolume:
        row = self.rows[i][1]
        get = lambda key: self.tensor(i, key)  # noqa: E731
        return LatentVolume(
            row["name"],
            get("latents"),
            get("tokens"),
            get("pooled"),
            get("tokens_nometa"),
            get("pooled_nometa"),
            row["num_slices"],
            row["spacing"],
        )

    def __iter__(self) -> Iterator[LatentVolume]:
        return (self[i] for i in range(len(self)))

    def _shard(self, path: Path):
        if path in self._open:
            self._open.move_to_end(path)
        else:
            self._open[path] = safe_open(path, framework="pt")
            if len(self._open) > self._max_open:
                self._open.popitem(last=False)
        return self._open[path]

    @cached_property
    def fingerprint(self) -> str:
        """What the cache holds, wherever it lies: its volumes' rows (names, reports, slice counts,
        labels) and the encoders ``encoding.json`` names (or, without it, the EOS latent)."""
        stamp = self.folder / "encoding.json"
        encoders = json.loads(stamp.read_text()) if stamp.is_file() else {}
        h = hashlib.sha256(json.dumps([row for _, row in self.rows], sort_keys=True).encode())
        for key in ("VAE (weights sha256)", "report encoder (weights sha256)"):
            h.update(str(encoders.get(key)).encode())
        if not encoders:
            h.update(self.eos.numpy().tobytes())
        return h.hexdigest()[:16]

    def text_moments(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per-dimension (mean, std) of the report features with the meta line, over all real tokens
        (``"tokens"``) and over the pooled embeddings (``"pooled"``), read one volume at a time
        (its text features only, not its latents)."""
        sums: dict[str, list] = {}
        for i in range(len(self)):
            for key in ("tokens", "pooled"):
                x = self.tensor(i, key).double()
                x = x if x.ndim == 2 else x[None]  # tokens [L,D]; pooled [D] -> [1,D]
                acc = sums.setdefault(key, [0, 0.0, 0.0])
                acc[0] += x.shape[0]
                acc[1] = acc[1] + x.sum(0)
                acc[2] = acc[2] + (x * x).sum(0)
        out = {}
        for key, (n, s, sq) in sums.items():
            mean = s / n
            var = (sq - n * mean * mean) / max(n - 1, 1) if n > 1 else torch.ones_like(mean)
            out[key] = (mean.float(), var.clamp_min(0).sqrt().float())
        return out
