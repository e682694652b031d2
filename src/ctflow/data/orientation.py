"""Affine checks and reorientation to ctflow's canonical ``(S, H, W)`` = ``("I", "P", "L")`` layout.

Shared by the NIfTI and DICOM readers so both formats end up in exactly the
same orientation (see :mod:`ctflow.data.volume`).
"""

from __future__ import annotations

import numpy as np
from nibabel.orientations import (
    aff2axcodes,
    apply_orientation,
    axcodes2ornt,
    inv_ornt_aff,
    io_orientation,
    ornt_transform,
)

from ctflow.data.volume import CANONICAL_AXCODES
from ctflow.errors import CTFlowError

#: Largest angle (degrees) between a voxel axis and the nearest world axis that we accept.
MAX_OBLIQUE_DEGREES = 1.0


def spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size along each array axis: the norms of the affine's first three columns."""
    affine = np.asarray(affine, dtype=np.float64)
    return tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))


def obliquity_degrees(affine: np.ndarray) -> float:
    """Largest angle (degrees) between a voxel axis and its nearest world axis."""
    m = np.asarray(affine, dtype=np.float64)[:3, :3]
    norms = np.linalg.norm(m, axis=0)
    cosines = np.abs(m).max(axis=0) / np.where(norms > 0, norms, 1.0)
    return float(np.degrees(np.arccos(np.clip(cosines, -1.0, 1.0))).max())


def check_affine(affine: np.ndarray, source: str = "the image") -> np.ndarray:
    """Refuse affines we cannot turn into a canonical volume; return it as float64 4x4."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise CTFlowError(f"{source}: the affine must be 4x4, got shape {affine.shape}")
    if not np.all(np.isfinite(affine)):
        raise CTFlowError(f"{source}: the voxel-to-world affine has NaN/inf entries; fix the image header")
    spacing = spacing_from_affine(affine)
    if min(spacing) <= 1e-6:
        raise CTFlowError(
            f"{source}: voxel spacing {tuple(round(s, 6) for s in spacing)} mm has a zero entry;"
            " fix the pixel dimensions (pixdim / PixelSpacing) in the header"
        )
    det = abs(np.linalg.det(affine[:3, :3]))
    if det < 1e-6 * float(np.prod(spacing)):
        raise CTFlowError(f"{source}: the voxel axes are degenerate (parallel); fix the image header")
    angle = obliquity_degrees(affine)
    if angle > MAX_OBLIQUE_DEGREES:
        raise CTFlowError(
            f"{source}: the image is oblique (a voxel axis is {angle:.1f} degrees off the patient axes,"
            f" more than {MAX_OBLIQUE_DEGREES:g}); resample it to an axis-aligned grid first"
            " (e.g. 3D Slicer 'Resample Scalar/Vector/DWI Volume', ANTs/SimpleITK resampling, or"
            " nibabel.processing.resample_from_to)"
        )
    return affine


def reorient_to_canonical(
    array: np.ndarray, affine: np.ndarray, source: str = "the image"
) -> tuple[np.ndarray, np.ndarray]:
    """Flip/transpose a 3D ``array`` with voxel->RAS ``affine`` into ``("I", "P", "L")`` order.

    Returns the reoriented C-contiguous array and its new affine, which maps the
    new indices to the same world positions as before (no resampling: only axis
    permutations and flips). Raises :class:`CTFlowError` for oblique or broken
    affines (see :func:`check_affine`).
    """
    if np.ndim(array) != 3:
        raise CTFlowError(f"{source}: expected a 3D array, got shape {np.shape(array)}")
    affine = check_affine(affine, source)
    transform = ornt_transform(io_orientation(affine), axcodes2ornt(CANONICAL_AXCODES))
    new_array = np.ascontiguousarray(apply_orientation(array, transform))
    new_affine = affine @ inv_ornt_aff(transform, array.shape)
    return new_array, new_affine


def axcodes(affine: np.ndarray) -> tuple[str, str, str]:
    """nibabel axis codes of an affine, e.g. ``("R", "A", "S")``."""
    return tuple(aff2axcodes(np.asarray(affine, dtype=np.float64)))
