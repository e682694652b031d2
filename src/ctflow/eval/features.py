"""Small CT feature extractors trained on phantoms and shipped with ctflow (no downloads).

* :class:`SliceEncoder` - a 2D CNN for slices of any plane: ``(B, 1, 64, 64)``
  slices (HU normalised to ``[0, 1]``) -> ``(B, 128)`` features. It backs FID on
  axial, coronal and sagittal planes.
* :class:`VolumeEncoder` - a 3D CNN: ``(B, 1, 32, 64, 64)`` volumes -> ``(B, 128)``
  features. It backs FVD and the memorisation audit.
* :class:`CTClipModel` - the volume encoder plus linear projections of the volume
  features and of the frozen MiniLM pooled report embedding (384-d) into a shared
  64-d space, trained contrastively on phantom (volume, report) pairs.

Both encoders are trained jointly by ``python -m ctflow.eval.train_features`` to
predict phantom findings, contrast, slice position and plane, and the strength of
random corruptions added during training (Gaussian noise, HU offset, blur), so
the features respond to anatomy and to offsets and blur, though little to noise
(``benchmarks/metric_sensitivity.py``); their penultimate activations are the
features. Weights load from safetensors only
(``ctflow/eval/weights/features.safetensors``).

Input preparation is shared by training and evaluation: :func:`volume_tensor`
and :func:`plane_slices` turn a :class:`~ctflow.data.volume.Volume` (or an
``(S, H, W)`` HU array) into network inputs.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ctflow.data.hu import normalize_hu
from ctflow.errors import CTFlowError, one_of

WEIGHTS_DIR = Path(__file__).parent / "weights"
FEATURES_FILE = "features.safetensors"
SLICE_SIZE = 64
VOLUME_SHAPE = (32, 64, 64)
FEATURE_DIM = 128
CLIP_DIM = 64
TEXT_DIM = 384
PLANES: tuple[str, ...] = ("axial", "coronal", "sagittal")
# supervised heads (training only): names and output sizes
VOLUME_HEADS: dict[str, int] = {
    "effusion": 4,  # none / left / right / bilateral
    "cardiomegaly": 1,
    "nodule": 1,
    "emphysema": 1,
    "consolidation": 1,
    "contrast": 1,
    "extent": 1,  # log(slices * spacing / 300 mm)
    "noise": 1,  # added Gaussian noise (augmentation), HU / 100
    "offset": 1,  # added HU offset (augmentation), HU / 100
}
SLICE_HEADS: dict[str, int] = {
    "plane": 3,
    "position": 1,
    "contrast": 1,
    "emphysema": 1,
    "lung_fraction": 1,
    "noise": 1,  # image-quality targets: FID/FVD then see offsets and blur, though noise barely
    # (benchmarks/metric_sensitivity.py: 300 HU of noise moves FVD by 0.1, +100 HU by 3.5)
    "offset": 1,
    "blur": 1,  # Gaussian blur sigma in pixels
}


# ----------------------------------------------------------------------------- inputs


def _hu_array(volume) -> np.ndarray:
    arr = volume.hu() if hasattr(volume, "hu") else np.asarray(volume, dtype=np.float32)
    if arr.ndim != 3:
        raise CTFlowError(f"expected a 3D (S, H, W) HU volume; got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise CTFlowError("the volume holds NaN or infinite values")
    return arr


def _unit(hu: torch.Tensor) -> torch.Tensor:
    """HU -> [0, 1] over the (-1000, 1000) window."""
    return (normalize_hu(hu) + 1.0) * 0.5


def volume_tensor(volume) -> torch.Tensor:
    """A Volume / (S, H, W) HU array -> ``(1, 32, 64, 64)`` float32 in [0, 1] (trilinear resize)."""
    x = torch.from_numpy(np.ascontiguousarray(_hu_array(volume)))[None, None]
    x = F.interpolate(x, size=VOLUME_SHAPE, mode="trilinear", align_corners=False)
    return _unit(x[0])


def plane_indices(length: int, n: int = 16, margin: float = 0.1) -> np.ndarray:
    """The distinct indices of :func:`plane_slices` along an axis of ``length`` (fewer than ``n`` on a
    short axis)."""
    return np.unique(np.rint(np.linspace(margin * (length - 1), (1 - margin) * (length - 1), n)).astype(int))


def plane_slices(volume, plane: str, n: int = 16, margin: float = 0.1) -> torch.Tensor:
    """``n`` evenly spaced slices of ``plane`` (central ``1 - 2 * margin`` of the axis): ``(n, 1, 64, 64)`` in [0, 1].

    Coronal and sagittal slices are ``(S, W)`` / ``(S, H)`` images stretched to 64 x 64.
    """
    if plane not in PLANES:
        raise CTFlowError(f"plane must be {one_of(PLANES)}; got {plane!r}")
    arr = _hu_array(volume)
    axis = PLANES.index(plane)
    idx = np.resize(plane_indices(arr.shape[axis], n, margin), n)  # short axes repeat slices: n from each
    sl = np.take(arr, idx, axis=axis)  # e.g. (n, H, W) axial
    sl = np.moveaxis(sl, axis, 0)
    x = torch.from_numpy(np.ascontiguousarray(sl))[:, None]
    x = F.interpolate(x, size=(SLICE_SIZE, SLICE_SIZE), mode="bilinear", align_corners=False, antialias=True)
    return _unit(x)


# ----------------------------------------------------------------------------- networks


def _block2d(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
        nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
    )  # fmt: skip


def _block3d(cin: int, cout: int, stride, norm: bool = True) -> nn.Sequential:
    layers = [nn.Conv3d(cin, cout, 3, stride=stride, padding=1)]
    return nn.Sequential(*layers, *([nn.GroupNorm(8, cout)] if norm else []), nn.SiLU())


class SliceEncoder(nn.Module):
    """``(B, 1, 64, 64)`` slices in [0, 1] -> ``(B, 128)`` features (torchmetrics FID feature module)."""

    num_features = FEATURE_DIM

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(_block2d(1, 16), _block2d(16, 32), _block2d(32, 64), _block2d(64, 96))
        self.proj = nn.Linear(96, FEATURE_DIM)
        self.heads = nn.ModuleDict({k: nn.Linear(FEATURE_DIM, n) for k, n in SLICE_HEADS.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:  # torchmetrics' convention for images
            x = x.float() / 255.0
        h = self.net(x * 2.0 - 1.0).mean((2, 3))  # (B, 96)
        return torch.tanh(self.proj(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class VolumeEncoder(nn.Module):
    """``(B, 1, 32, 64, 64)`` volumes in [0, 1] -> ``(B, 128)`` features."""

    num_features = FEATURE_DIM

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            _block3d(1, 8, (1, 2, 2), norm=False),  # (8, 32, 32, 32)
            _block3d(8, 24, 2),  # 16^3
            _block3d(24, 48, 2),  # 8^3
            _block3d(48, 96, 2),  # 4^3
        )
        self.proj = nn.Linear(96, FEATURE_DIM)
        self.heads = nn.ModuleDict({k: nn.Linear(FEATURE_DIM, n) for k, n in VOLUME_HEADS.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.net(x * 2.0 - 1.0).mean((2, 3, 4))
        return torch.tanh(self.proj(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class CTClipModel(nn.Module):
    """Volume and report embeddings in a shared space (CLIP style)."""

    def __init__(self, volume_encoder: VolumeEncoder):
        super().__init__()
        self.volume_encoder = volume_encoder
        self.image_proj = nn.Linear(FEATURE_DIM, CLIP_DIM, bias=False)
        self.text_proj = nn.Linear(TEXT_DIM, CLIP_DIM, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(np.log(10.0), dtype=torch.float32))
        # MiniLM embeddings of templated reports are close together: standardise them first
        # (statistics of the training reports, saved with the weights)
        self.register_buffer("text_mean", torch.zeros(TEXT_DIM))
        self.register_buffer("text_std", torch.ones(TEXT_DIM))

    def embed_volumes(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.volume_encoder.features(x)), dim=-1)

    def embed_text(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj((pooled - self.text_mean) / self.text_std), dim=-1)


class Features(nn.Module):
    """All shipped networks together (the unit that is saved and loaded)."""

    def __init__(self):
        super().__init__()
        self.slice = SliceEncoder()
        self.volume = VolumeEncoder()
        self.clip = CTClipModel(self.volume)

    def state_for_saving(self) -> dict[str, torch.Tensor]:
        # the CLIP model shares the volume encoder: store it once
        return {
            k: v.detach().contiguous()
            for k, v in self.state_dict().items()
            if not k.startswith("clip.volume_encoder.")
        }


# ----------------------------------------------------------------------------- loading


def save_features(model: Features, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    from ctflow.files import atomic_path

    path = Path(path)
    with atomic_path(path, overwrite=True) as tmp:
        save_file(model.state_for_saving(), str(tmp), metadata=metadata or {})
    return path


@lru_cache(maxsize=2)
def _load(path: str) -> Features:
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise CTFlowError(f"feature weights {p} not found; run `python -m ctflow.eval.train_features`")
    state = load_file(str(p))
    model = Features()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("clip.volume_encoder.")]
    if missing or unexpected:
        raise CTFlowError(
            f"{p} does not match the feature networks (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model.eval().requires_grad_(False)


def load_features(path: str | Path | None = None) -> Features:
    """The trained networks (eval mode, frozen); cached per path."""
    return _load(str(Path(path) if path is not None else WEIGHTS_DIR / FEATURES_FILE))


# ----------------------------------------------------------------------------- helpers


@lru_cache(maxsize=1)
def _text_encoder():
    from ctflow.models.text import ReportEncoder

    return ReportEncoder.from_pretrained()


@torch.no_grad()
def text_pooled(reports: list[str]) -> torch.Tensor:
    """Frozen MiniLM pooled embeddings of reports: ``(N, 384)``."""
    enc = _text_encoder()
    out = [enc(list(reports[i : i + 16])).pooled.float() for i in range(0, len(reports), 16)]
    return torch.cat(out) if out else torch.zeros(0, TEXT_DIM)


@torch.no_grad()
def clip_embeddings(
    volumes, reports: list[str], model: Features | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm volume and report embeddings ``(N, 64)`` each."""
    model = model or load_features()
    x = torch.stack([volume_tensor(v) for v in volumes])
    return model.clip.embed_volumes(x), model.clip.embed_text(text_pooled(list(reports)))


def clip_score(volumes, reports: list[str], model: Features | None = None) -> float:
    """Mean ``max(100 * cos(volume, report), 0)`` (see :func:`ctflow.eval.metrics.clip_score`)."""
    from ctflow.eval.metrics import clip_score as _clip_score

    return _clip_score(volumes, reports, model)
