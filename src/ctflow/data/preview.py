"""Tri-planar previews and axial scroll GIFs of a volume.

The PNG has two rows, lung window on top and mediastinal window below, and three
columns: the axial, coronal and sagittal mid-planes. Coronal and sagittal views
are stretched to the physical slice spacing so anatomy keeps its proportions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from ctflow.data.volume import Volume
from ctflow.files import atomic_path

LUNG_WINDOW = (-1350.0, 150.0)  # width 1500, level -600
MEDIASTINAL_WINDOW = (-160.0, 240.0)  # width 400, level 40


def apply_window(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """HU -> uint8 grey levels for a display window (lo, hi)."""
    lo, hi = window
    return (np.clip((hu - lo) / (hi - lo), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def mid_planes(volume: Volume) -> list[np.ndarray]:
    """Axial, coronal and sagittal mid-planes, resampled to square pixels."""
    a = volume.hu()
    s, h, w = a.shape
    ds, dh, dw = volume.spacing
    axial = a[s // 2]
    coronal = a[:, h // 2, :]  # (S, W): superior at top
    sagittal = a[:, :, w // 2]  # (S, H): anterior on the left
    # at least one row: a one-slice volume at 2.5 mm beside 5.8 mm pixels would round to none
    out = [ndimage.zoom(axial, (max(dh / dw, 1 / h), 1.0), order=1)]
    out.append(ndimage.zoom(coronal, (max(ds / dw, 1 / s), 1.0), order=1))
    out.append(ndimage.zoom(sagittal, (max(ds / dh, 1 / s), 1.0), order=1))
    return out


def _pad_to(img: np.ndarray, height: int) -> np.ndarray:
    extra = height - img.shape[0]
    return np.pad(img, ((extra // 2, extra - extra // 2), (0, 0)))


def triplanar_image(volume: Volume, gap: int = 4) -> np.ndarray:
    """The preview as a uint8 (rows, cols) image."""
    planes = mid_planes(volume)
    height = max(p.shape[0] for p in planes)
    rows = []
    for window in (LUNG_WINDOW, MEDIASTINAL_WINDOW):
        panels = []
        for p in planes:
            panels.append(_pad_to(apply_window(p, window), height))
            panels.append(np.zeros((height, gap), np.uint8))
        rows.append(np.concatenate(panels[:-1], axis=1))
        rows.append(np.zeros((gap, rows[-1].shape[1]), np.uint8))
    return np.concatenate(rows[:-1], axis=0)


def write_preview(volume: Volume, path: str | Path, overwrite: bool = False, min_height: int = 384) -> Path:
    """Write the tri-planar PNG preview, enlarged by a whole factor (nearest) to at least
    ``min_height`` rows when the volume is small (a 64 px volume's preview is 132 rows)."""
    import imageio.v3 as iio

    img = triplanar_image(volume)
    k = max(1, -(-min_height // img.shape[0]))
    with atomic_path(path, overwrite) as tmp:
        iio.imwrite(tmp, img.repeat(k, 0).repeat(k, 1), extension=".png")
    return Path(path)


def write_gif(
    volume: Volume,
    path: str | Path,
    overwrite: bool = False,
    fps: float = 12.0,
    window: tuple[float, float] = LUNG_WINDOW,
) -> Path:
    """Write a GIF scrolling through the axial slices, superior to inferior. Consecutive slices that
    look the same in the window (air above the chest, white end-of-scan slices) are stored as one
    frame shown for their summed time (Pillow's GIF writer merges them), so the scroll keeps its pace
    though the file may hold fewer frames than the volume has slices."""
    import imageio.v3 as iio

    frames = apply_window(volume.hu(), window)
    _, dh, dw = volume.spacing
    if abs(dh / dw - 1.0) > 1e-3:  # square pixels, as the PNG preview's axial panel
        frames = ndimage.zoom(frames, (1.0, max(dh / dw, 1 / frames.shape[1]), 1.0), order=1)
    with atomic_path(path, overwrite) as tmp:
        iio.imwrite(tmp, frames, extension=".gif", is_batch=True, duration=1000.0 / fps, loop=0)
    return Path(path)
