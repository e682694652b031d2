"""The `Volume` type: a CT volume in Hounsfield units with its geometry.

Canonical orientation
---------------------
Inside ctflow every volume array has shape ``(S, H, W)``:

* axis 0 (``S``, slices) runs from the most **superior** slice (index 0, the
  lung apices) to the most **inferior** one;
* axis 1 (``H``, rows) runs from **anterior** to **posterior**;
* axis 2 (``W``, columns) runs from the patient's **right** to **left**.

In nibabel's axis codes this is ``("I", "P", "L")``: each axis increases
towards inferior, posterior and left. An axial slice ``array[k]`` therefore
displays the usual radiological way (patient's right on the image's left,
anterior at the top), exactly like a DICOM image.

``spacing`` is ``(slice, row, column)`` in millimetres and ``affine`` maps
``(s, h, w, 1)`` voxel indices to RAS+ world millimetres (nibabel convention).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

CANONICAL_AXCODES = ("I", "P", "L")


def canonical_affine(spacing, origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    """The RAS+ affine of a canonical ``(S, H, W)`` array with the given spacing.

    ``origin`` is the RAS world position of voxel ``(0, 0, 0)``.
    """
    ds, dh, dw = (float(v) for v in spacing)
    affine = np.zeros((4, 4))
    affine[2, 0] = -ds  # slices go inferior: -S in RAS
    affine[1, 1] = -dh  # rows go posterior: -A
    affine[0, 2] = -dw  # columns go left: -R
    affine[:3, 3] = origin
    affine[3, 3] = 1.0
    return affine


@dataclass
class Volume:
    """A CT volume in canonical orientation (see module docstring)."""

    array: np.ndarray  # (S, H, W) float32 or int16, Hounsfield units
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)  # mm: (slice, row, column)
    affine: np.ndarray | None = None  # 4x4 voxel -> RAS+ mm; derived from spacing when None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.array = np.asarray(self.array)
        if self.array.ndim != 3:
            raise ValueError(f"a Volume is 3D (S, H, W); got shape {self.array.shape}")
        self.spacing = tuple(float(v) for v in self.spacing)
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"spacing must be three positive numbers in mm; got {self.spacing}")
        if self.affine is None:
            self.affine = canonical_affine(self.spacing)
        self.affine = np.asarray(self.affine, dtype=np.float64)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)

    @property
    def num_slices(self) -> int:
        return self.array.shape[0]

    @property
    def synthetic(self) -> bool:
        return bool(self.metadata.get("synthetic", False))

    def hu(self) -> np.ndarray:
        """The voxels as float32 Hounsfield units."""
        return self.array.astype(np.float32, copy=False)

    def __repr__(self) -> str:
        sp = ", ".join(f"{v:g}" for v in self.spacing)
        return f"Volume(shape={self.shape}, spacing=({sp}) mm, dtype={self.array.dtype})"
