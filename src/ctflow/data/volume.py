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

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ctflow.errors import CTFlowError

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
    # mm: (slice, row, column); None: the affine's voxel sizes (1 mm each without an affine)
    spacing: tuple[float, float, float] | None = None
    affine: np.ndarray | None = None  # 4x4 voxel -> RAS+ mm; derived from spacing when None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.array = np.asarray(self.array)
        if self.array.ndim != 3 or 0 in self.array.shape:
            raise CTFlowError(f"a Volume is 3D (S, H, W), none of them 0; got shape {self.array.shape}")
        if self.affine is not None:
            self.affine = np.asarray(self.affine, dtype=np.float64)
            if self.affine.shape != (4, 4) or not np.all(np.isfinite(self.affine)):
                raise CTFlowError(f"affine must be a finite 4x4 matrix; got {self.affine.tolist()}")
            from ctflow.data.orientation import axcodes

            if (codes := axcodes(self.affine)) != CANONICAL_AXCODES:
                raise CTFlowError(
                    f"the affine orders the axes {codes}, not the canonical {CANONICAL_AXCODES} of a"
                    " Volume's (S, H, W) array; read files with ctflow.data.io.read_volume, or reorient"
                    " with ctflow.data.orientation.reorient_to_canonical"
                )
            sizes = tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))
            if self.spacing is None:
                self.spacing = sizes
            elif not np.allclose(sizes, [float(v) for v in self.spacing], rtol=1e-4, atol=1e-6):
                raise CTFlowError(
                    f"spacing {tuple(self.spacing)} disagrees with the affine's voxel sizes"
                    f" {tuple(round(v, 6) for v in sizes)}; give one, or both alike"
                )
        self.spacing = tuple(
            float(v) for v in (self.spacing if self.spacing is not None else (1.0, 1.0, 1.0))
        )
        if len(self.spacing) != 3 or not all(math.isfinite(v) and v > 0 for v in self.spacing):
            raise CTFlowError(f"spacing must be three positive numbers in mm; got {self.spacing}")
        if self.affine is None:
            self.affine = canonical_affine(self.spacing)

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
