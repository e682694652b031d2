"""Evaluation metrics for generated CT volumes (all offline, with ctflow's own feature networks).

* :func:`fid_planes` - FID on axial, coronal and sagittal slices, computed by
  ``torchmetrics``' :class:`FrechetInceptionDistance` with the shipped
  :class:`~ctflow.eval.features.SliceEncoder` as its feature module.
* :func:`fvd` - the same Fréchet distance on 3D features of whole volumes
  (:class:`~ctflow.eval.features.VolumeEncoder`), again through torchmetrics.
* :func:`clip_score` - ``max(100 * cos(volume, report), 0)`` averaged over pairs,
  as torchmetrics' CLIPScore does, with the phantom-trained CT-CLIP model.
* :func:`continuity` - seams between generated chunks: the mean absolute
  difference between adjacent slices across chunk boundaries divided by the same
  difference for the neighbouring within-chunk slice pairs (~1 when continuous).
* :func:`memorization` - nearest training volume of each generated one by 3D
  feature cosine and by correlation of normalised HU on a common 32 x 64 x 64
  grid. Copies are flagged on the *detail* correlation (HU minus a 5-tap binomial
  smoothing), which ignores the body layout all chest CTs share, at the best of the
  generated volume's shifts by up to 1 slice and 2 rows and columns of the grid: distinct
  phantoms reach ~0.6, a copy with 40 HU of extra noise ~0.92, a copy moved by a voxel
  or two 1 (0.5 unshifted), an exact copy 1. A mirrored copy is not found (0.66).

Volumes are :class:`~ctflow.data.volume.Volume` objects or ``(S, H, W)`` HU arrays.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.image.fid import FrechetInceptionDistance

from ctflow.errors import CTFlowError
from ctflow.eval.features import (
    PLANES,
    Features,
    clip_embeddings,
    load_features,
    plane_slices,
    volume_tensor,
)

CHUNK_SLICES = 8
FID_SLICES = 16  # slices a volume gives each plane's FID
COPY_CORRELATION = 0.8  # detail correlation at or above which a volume counts as a copy
COPY_SHIFT = (1, 2, 2)  # grid voxels (slices, rows, columns) a copy may be moved by and still be found


def _check_sets(real, fake, what: str, minimum: int = 1) -> tuple[list, list]:
    for given in (real, fake):
        if isinstance(given, np.ndarray | torch.Tensor) or hasattr(given, "hu"):  # one volume, not a set
            raise CTFlowError(f"{what} compares two sets of volumes; pass each as a list, even of one volume")
    real, fake = list(real), list(fake)
    if len(real) < minimum or len(fake) < minimum:
        raise CTFlowError(
            f"{what} needs at least {minimum} real and {minimum} generated volume(s); got {len(real)} and {len(fake)}"
        )
    return real, fake


def _frechet(module, real_batches, fake_batches) -> float:
    # normalize=False: our modules take float slices in [0, 1] as they are (with a custom feature module
    # torchmetrics >= 1.x skips its uint8 conversion either way; older ones would have applied it)
    fid = FrechetInceptionDistance(feature=module, normalize=False, reset_real_features=True)
    for x in real_batches:
        fid.update(x, real=True)
    for x in fake_batches:
        fid.update(x, real=False)
    return max(float(fid.compute()), 0.0)


@torch.no_grad()
def fid_planes(
    real_volumes, fake_volumes, slices_per_volume: int = FID_SLICES, model: Features | None = None
) -> dict[str, float]:
    """FID per plane: ``{"axial": .., "coronal": .., "sagittal": ..}`` (0 for identical sets)."""
    real, fake = _check_sets(real_volumes, fake_volumes, "FID")
    if not isinstance(slices_per_volume, int) or slices_per_volume < 1:
        raise CTFlowError(
            f"slices_per_volume must be a whole number of at least 1, got {slices_per_volume!r}"
        )
    model = model or load_features()
    out = {}
    for plane in PLANES:
        rb = [plane_slices(v, plane, slices_per_volume) for v in real]
        fb = [plane_slices(v, plane, slices_per_volume) for v in fake]
        out[plane] = _frechet(model.slice, rb, fb)
    return out


@torch.no_grad()
def fvd(real_volumes, fake_volumes, model: Features | None = None) -> float:
    """Fréchet distance between 3D features of two volume sets (at least 2 volumes each)."""
    real, fake = _check_sets(real_volumes, fake_volumes, "FVD", minimum=2)
    model = model or load_features()
    rb = [torch.stack([volume_tensor(v) for v in real[i : i + 8]]) for i in range(0, len(real), 8)]
    fb = [torch.stack([volume_tensor(v) for v in fake[i : i + 8]]) for i in range(0, len(fake), 8)]
    return _frechet(model.volume, rb, fb)


@torch.no_grad()
def clip_scores(volumes, reports, model: Features | None = None) -> torch.Tensor:
    """Per-pair ``max(100 * cos, 0)``: ``(N,)``."""
    volumes, reports = list(volumes), list(reports)
    if len(volumes) != len(reports):
        raise CTFlowError(
            f"clip_score needs one report per volume; got {len(volumes)} volumes, {len(reports)} reports"
        )
    if not volumes:
        raise CTFlowError("clip_score needs at least one (volume, report) pair")
    if not all(isinstance(r, str) and r.strip() for r in reports):
        raise CTFlowError("clip_score: every report must be non-empty text")
    img, txt = clip_embeddings(volumes, reports, model)
    return (100.0 * (img * txt).sum(-1)).clamp(min=0.0)


def clip_score(volumes, reports, model: Features | None = None) -> float:
    """Mean CLIP score of (volume, report) pairs (torchmetrics CLIPScore convention, 0..100)."""
    return float(clip_scores(volumes, reports, model).mean())


def continuity(volume, chunk: int = CHUNK_SLICES) -> dict:
    """Seam measure: adjacent-slice differences across chunk boundaries vs their within-chunk neighbours.

    For each boundary between slices ``b - 1`` and ``b`` (``b`` a multiple of
    ``chunk``), the mean absolute difference of the HU-normalised slices is divided
    by the mean of the two neighbouring within-chunk differences; ``ratio`` is the
    mean over boundaries (~1 for a continuous volume, > 1 with seams).
    """
    arr = volume.hu() if hasattr(volume, "hu") else np.asarray(volume, dtype=np.float32)
    if arr.ndim != 3:
        raise CTFlowError(f"continuity needs a 3D (S, H, W) volume; got shape {arr.shape}")
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 2:
        raise CTFlowError(f"continuity: chunk must be a whole number of at least 2 slices; got {chunk!r}")
    if not np.all(np.isfinite(arr)):
        raise CTFlowError("continuity: the volume holds NaN or infinite values")
    x = (np.clip(arr, -1000.0, 1000.0) + 1000.0) / 2000.0
    d = np.abs(np.diff(x, axis=0)).mean((1, 2))  # (S-1,): d[k] = |x[k+1] - x[k]|
    boundaries = [b for b in range(chunk, arr.shape[0] - 1, chunk)]  # needs d[b-2], d[b-1], d[b]
    if not boundaries:
        return {"ratio": float("nan"), "boundaries": 0, "chunk": chunk, "worst": float("nan")}
    eps = 1e-6  # in both terms, so a boundary in a run of identical slices reads 1, not 0
    ratios = [(d[b - 1] + eps) / (0.5 * (d[b - 2] + d[b]) + eps) for b in boundaries]
    return {
        "ratio": float(np.mean(ratios)),
        "worst": float(np.max(ratios)),
        "boundary_diff": float(np.mean([d[b - 1] for b in boundaries])),
        "within_diff": float(np.mean(np.delete(d, [b - 1 for b in boundaries]))),
        "boundaries": len(boundaries),
        "chunk": chunk,
    }


def _zscore(x: torch.Tensor) -> torch.Tensor:
    """(N, ...) -> (N, D) rows with zero mean and unit norm (float64)."""
    x = x.flatten(1).double()
    x = x - x.mean(1, keepdim=True)
    return x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)


def _detail(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, D, H, W) minus its separable [1, 4, 6, 4, 1] / 16 smoothing (edges replicated)."""
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0
    y = x
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = 5
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = 2  # F.pad lists the last axis first
        y = F.conv3d(F.pad(y, pad, mode="replicate"), k.view(shape))
    return x - y


def _shifted_correlation(fake_detail: torch.Tensor, train_rows: torch.Tensor) -> torch.Tensor:
    """(N, M) correlation of each generated volume's detail with each training volume's (rows from
    :func:`_zscore`), the best over shifts of the generated one by up to ``COPY_SHIFT`` grid voxels
    on each axis: a copy moved by one voxel keeps little detail correlation in place (0.5 against 1)."""
    best = None
    dz, dy, dx = COPY_SHIFT
    for shift in itertools.product(range(-dz, dz + 1), range(-dy, dy + 1), range(-dx, dx + 1)):
        moved = torch.roll(fake_detail, shift, dims=(2, 3, 4))
        corr = (_zscore(moved) @ train_rows.t()).float()
        best = corr if best is None else torch.maximum(best, corr)
    return best


@torch.no_grad()
def memorization(
    fake_volumes, train_volumes, threshold: float = COPY_CORRELATION, model: Features | None = None
) -> dict:
    """Nearest-training-volume audit of generated volumes.

    For each generated volume: the training volume with the highest 3D-feature
    cosine similarity and the one with the highest detail correlation (Pearson
    correlation of the high-pass normalised HU on the common 32 x 64 x 64 grid, the
    best over shifts of up to ``COPY_SHIFT`` voxels; the plain correlation, unshifted,
    is reported too). A generated volume whose best detail
    correlation is at or above ``threshold`` is flagged as a (near-)copy.
    """
    train, fake = _check_sets(train_volumes, fake_volumes, "memorization")
    if not (isinstance(threshold, int | float) and 0 < threshold <= 1):  # NaN fails too
        raise CTFlowError(
            f"memorization: threshold is a correlation above 0 and at most 1, got {threshold!r}"
        )
    model = model or load_features()
    fx = torch.stack([volume_tensor(v) for v in fake])  # (N, 1, 32, 64, 64)
    tx = torch.stack([volume_tensor(v) for v in train])  # (M, ...)
    ff = F.normalize(torch.cat([model.volume.features(fx[i : i + 8]) for i in range(0, len(fx), 8)]), dim=-1)
    tf = F.normalize(torch.cat([model.volume.features(tx[i : i + 8]) for i in range(0, len(tx), 8)]), dim=-1)
    cos = ff @ tf.t()  # (N, M)

    raw = (_zscore(fx) @ _zscore(tx).t()).float()  # (N, M) Pearson correlation of normalised HU
    corr = _shifted_correlation(_detail(fx), _zscore(_detail(tx)))  # (N, M) detail correlation
    best_cos, cos_idx = cos.max(1)
    best_corr, corr_idx = corr.max(1)
    best_raw = raw.max(1).values
    flagged = [i for i in range(len(fake)) if float(best_corr[i]) >= threshold]
    return {
        "n_generated": len(fake),
        "n_train": len(train),
        "threshold": threshold,
        "nearest_cosine": [round(float(v), 4) for v in best_cos],
        "nearest_cosine_index": [int(i) for i in cos_idx],
        "nearest_correlation": [round(float(v), 4) for v in best_corr],
        "nearest_correlation_index": [int(i) for i in corr_idx],
        "max_cosine": min(1.0, float(best_cos.max())),  # not 1.0000001 from rounding
        "nearest_raw_correlation": [round(float(v), 4) for v in best_raw],
        "max_correlation": float(best_corr.max()),
        "mean_correlation": float(best_corr.mean()),
        "flagged": flagged,
        "fraction_flagged": len(flagged) / len(fake),
    }
