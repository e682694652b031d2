"""Hounsfield-unit windowing and geometric resampling of volumes.

* :func:`normalize_hu` clips HU to a window and maps it to ``[-1, 1]``;
  :func:`denormalize_hu` maps back (numpy in -> numpy out, torch in -> torch out).
* :func:`rescale_stored` turns a file's stored values into HU (NIfTI scl_slope/inter, DICOM
  RescaleSlope/Intercept), exactly as int16 when it can.
* :func:`resample_volume` changes the voxel spacing and/or the in-plane matrix
  size of a :class:`~ctflow.data.volume.Volume` while keeping its world geometry:
  the centre of the field of view stays put and the affine is updated so every
  output voxel's world position is exactly where it was sampled from.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from numbers import Real
from typing import Any

import numpy as np
from scipy import ndimage

from ctflow.data.volume import Volume
from ctflow.errors import CTFlowError

HU_WINDOW = (-1000.0, 1000.0)
AIR_HU = -1024.0


def check_window(window) -> tuple[float, ...]:
    """``window`` as a tuple of >= 2 strictly increasing finite HU knots."""
    try:
        knots = tuple(float(v) for v in window)
    except (TypeError, ValueError):
        raise CTFlowError(
            f"the HU window must be two or more numbers (low, ..., high); got {window!r}"
        ) from None
    if (
        len(knots) < 2
        or not np.isfinite(knots).all()
        or any(b <= a for a, b in zip(knots[:-1], knots[1:], strict=True))
    ):
        raise CTFlowError(
            f"the HU window must be two or more finite numbers in increasing order (low < ... < high); "
            f"got {window!r}"
        )
    return knots


_INT16 = np.iinfo(np.int16)


def rescale_stored(stored: np.ndarray, slope, intercept) -> np.ndarray:
    """``stored * slope + intercept``: int16 when ``stored`` holds integers, every slope and intercept is
    a whole number and the result fits int16 (exact, half the memory of float32), else float32.

    ``slope`` and ``intercept`` are numbers, or arrays over the leading axes (DICOM's per-slice rescale).
    Float results are computed in float64 when the stored values or the data need it (32-bit integers,
    float64 data), else in float32."""
    slope, intercept = np.asarray(slope, np.float64), np.asarray(intercept, np.float64)
    shape = slope.shape + (1,) * (stored.ndim - slope.ndim)
    whole = np.all(slope == np.round(slope)) and np.all(intercept == np.round(intercept))
    small = np.all(np.abs(slope) < 2**31) and np.all(np.abs(intercept) < 2**31)  # (int64 holds the ends)
    if stored.dtype.kind in "iu" and stored.dtype != np.uint64 and whole and small:
        s, b = slope.astype(np.int64).reshape(shape), intercept.astype(np.int64).reshape(shape)
        if stored.size:
            axes = tuple(range(slope.ndim, stored.ndim))
            lo = stored.min(axis=axes, keepdims=True).astype(np.int64)
            hi = stored.max(axis=axes, keepdims=True).astype(np.int64)
        else:
            lo = hi = np.zeros(shape, np.int64)
        ends = np.concatenate([(lo * s + b).ravel(), (hi * s + b).ravel()])
        if _INT16.min <= ends.min() and ends.max() <= _INT16.max:
            bound = int(np.maximum(abs(lo), abs(hi)).max() * abs(s).max() + abs(b).max())
            out = stored.astype(np.int32 if bound < 2**31 else np.int64)
            if np.any(s != 1):
                out *= s.astype(out.dtype)
            if np.any(b != 0):
                out += b.astype(out.dtype)
            return out.astype(np.int16)
    wide = stored.dtype == np.float64 or (stored.dtype.kind in "iu" and stored.dtype.itemsize >= 4)
    work = np.float64 if wide else np.float32
    out = stored.astype(work, copy=False)  # float64 data as it is: no copy when nothing is scaled
    for factor, scale, neutral in ((slope, np.multiply, 1), (intercept, np.add, 0)):
        if np.any(factor != neutral):  # in place on our own copy, never on the caller's array
            out = scale(out, factor.astype(work).reshape(shape), out=None if out is stored else out)
    return out.astype(np.float32, copy=False)


def _as_float(x):
    """Float view of x (numpy, torch or a number); ints become float32, floats keep their precision."""
    if isinstance(x, Real) and not isinstance(x, bool):
        return float(x), "number"
    torch = sys.modules.get("torch")  # a tensor can only exist if torch is imported; don't import it
    if torch is not None and isinstance(x, torch.Tensor):
        return (x if x.is_floating_point() else x.float()), "torch"
    arr = np.asarray(x)
    if arr.dtype.kind != "f":
        arr = arr.astype(np.float32)
    return arr, "numpy"


def normalize_hu(x, window=HU_WINDOW):
    """Clip HU values to ``window`` and map them to ``[-1, 1]`` (``window[0]`` -> -1).

    ``window`` is ``(low, high)`` for a linear map, or more increasing knots
    ``(low, k1, ..., high)`` for a piecewise-linear one whose knots land on evenly
    spaced values: ``(-1000, -150, 150, 1000)`` gives the 300 HU of soft tissue a
    third of the range (2.2x the resolution of the linear ``(-1000, 1000)``).
    Accepts a numpy array, a torch tensor or a number and returns the same kind;
    integer input gives float32, float input keeps its dtype (and device).
    """
    knots = check_window(window)
    x, kind = _as_float(x)
    if kind == "number":
        return float(normalize_hu(np.array([x]), knots)[0])
    step = 2.0 / (len(knots) - 1)
    # same kind, dtype and device as x (x * 0.0 would be NaN at +-inf, which clip to the window's ends)
    y = (sys.modules["torch"].zeros_like(x) if kind == "torch" else np.zeros_like(x)) - 1.0
    for a, b in zip(knots[:-1], knots[1:], strict=True):
        y = y + ((x - a) * (step / (b - a))).clip(0.0, step)
    return y


def denormalize_hu(x, window=HU_WINDOW, clip: bool = True):
    """Inverse of :func:`normalize_hu`: ``[-1, 1]`` -> HU in ``window``.

    Values outside ``[-1, 1]`` (e.g. model overshoot) are clipped first unless
    ``clip=False`` (then the first and last segments extend linearly). Same
    input/output types as :func:`normalize_hu`.
    """
    knots = check_window(window)
    x, kind = _as_float(x)
    if kind == "number":
        return float(denormalize_hu(np.array([x]), knots, clip)[0])
    n = len(knots) - 1
    step = 2.0 / n
    if clip:
        x = x.clip(-1.0, 1.0)
    if n == 1:
        lo, hi = knots
        return (x + 1.0) * (0.5 * (hi - lo)) + lo
    u = (x + 1.0) * (1.0 / step)  # position along the segments
    y = x * 0.0 + knots[0]
    for i, (a, b) in enumerate(zip(knots[:-1], knots[1:], strict=True)):
        lo, hi = (None if i == 0 else 0.0), (None if i == n - 1 else 1.0)
        y = y + (b - a) * (u - i).clip(lo, hi)
    return y


class NormalizeHU:
    """MONAI-style transform: :func:`normalize_hu` on an array, or on ``keys`` of a dict sample."""

    def __init__(self, window=HU_WINDOW, keys: Sequence[str] | None = None):
        self.window = check_window(window)
        self.keys = tuple(keys) if keys is not None else None

    def _apply(self, x):
        return normalize_hu(x, self.window)

    def __call__(self, data):
        if self.keys is None:
            return self._apply(data)
        if not isinstance(data, Mapping):
            raise CTFlowError(
                f"{type(self).__name__}(keys=...) expects a dict sample, got {type(data).__name__}"
            )
        out = dict(data)
        for key in self.keys:
            if key not in out:
                raise CTFlowError(f"{type(self).__name__}: key {key!r} not in the sample (has {sorted(out)})")
            out[key] = self._apply(out[key])
        return out

    def inverse(self, data):
        return DenormalizeHU(self.window, self.keys)(data)


class DenormalizeHU(NormalizeHU):
    """MONAI-style inverse of :class:`NormalizeHU`."""

    def _apply(self, x):
        return denormalize_hu(x, self.window)

    def inverse(self, data):
        return NormalizeHU(self.window, self.keys)(data)


def _triple(value, name: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise CTFlowError(f"{name} must be three numbers (slice, row, column) in mm; got {value!r}") from None
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise CTFlowError(f"{name} must be three positive numbers (slice, row, column) in mm; got {value!r}")
    return values


def _gaussian_along(x: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    """Gaussian blur along one axis with edge padding (same as scipy's ``mode="nearest"``).

    scipy's 1D filters are slow along the outer axes of a C-ordered volume (cache
    misses); a weighted sum of shifted slabs is several times faster there.
    """
    if axis == x.ndim - 1:
        return ndimage.gaussian_filter1d(x, sigma, axis=axis, mode="nearest")
    radius = int(4.0 * sigma + 0.5)
    taps = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (taps / sigma) ** 2)
    weights /= weights.sum()
    n = x.shape[axis]
    padding = [(0, 0)] * x.ndim
    padding[axis] = (radius, radius)
    padded = np.pad(x, padding, mode="edge")
    out = np.zeros_like(x)
    index = [slice(None)] * x.ndim
    for i, weight in enumerate(weights):
        index[axis] = slice(i, i + n)
        out += x.dtype.type(weight) * padded[tuple(index)]
    return out


def resample_volume(
    volume: Volume,
    spacing: Sequence[float] | None = None,
    size: Sequence[int] | None = None,
    order: int = 1,
    antialias: bool = True,
    fill: float = AIR_HU,
) -> Volume:
    """Resample ``volume`` to a new voxel ``spacing`` and/or in-plane matrix ``size``.

    * ``spacing`` only: the grid gets the requested ``(slice, row, column)`` mm;
      each axis keeps its physical extent (rounded to whole voxels).
    * ``size`` only (``(H, W)``): each slice is resampled to ``H x W`` covering the
      same field of view; the in-plane spacing follows from it.
    * both: the requested spacing, with the in-plane field of view cropped or
      padded (with ``fill`` HU, air by default) to ``H x W`` voxels.

    The centre of the field of view stays at the same world position, the affine
    and spacing are updated accordingly, and a structure keeps its world
    position. ``order`` is the spline order (0 nearest, 1 linear, 3 cubic).
    When downsampling, ``antialias`` blurs first (Gaussian, sigma = (factor-1)/2
    voxels) to avoid aliasing. The dtype is kept (int volumes are rounded).
    """
    if spacing is None and size is None:
        return Volume(volume.array.copy(), volume.spacing, volume.affine.copy(), dict(volume.metadata))
    if order not in range(6):
        raise CTFlowError(f"order must be a spline order from 0 to 5; got {order!r}")
    old_shape = np.array(volume.shape, dtype=np.int64)
    old_spacing = np.array(volume.spacing, dtype=np.float64)
    new_spacing = np.array(_triple(spacing, "spacing") if spacing is not None else old_spacing)
    new_shape = np.maximum(1, np.rint(old_shape * old_spacing / new_spacing)).astype(np.int64)
    if size is not None:
        try:
            hw = tuple(int(v) for v in size)
        except (TypeError, ValueError):
            raise CTFlowError(f"size must be two positive integers (H, W); got {size!r}") from None
        if len(hw) != 2 or min(hw) < 1 or any(float(v) != int(v) for v in size):
            raise CTFlowError(f"size must be two positive integers (H, W); got {size!r}")
        new_shape[1:] = hw
        if spacing is None:
            new_spacing[1:] = old_shape[1:] * old_spacing[1:] / new_shape[1:]

    # new index i samples old index scale * i + offset; centres coincide.
    scale = new_spacing / old_spacing
    offset = (old_shape - 1) / 2.0 - scale * (new_shape - 1) / 2.0

    source = volume.array
    work = source.astype(np.float32, copy=False) if source.dtype != np.float64 else source
    if antialias and np.any(scale > 1):
        for axis, sigma in enumerate((scale - 1.0) / 2.0):
            if sigma > 0:
                work = _gaussian_along(work, float(sigma), axis)
    out = ndimage.affine_transform(
        work,
        scale,
        offset=offset,
        output_shape=tuple(int(v) for v in new_shape),
        order=order,
        mode="nearest",
        output=work.dtype,
    )
    # Outside the original field of view (only when padding) gets ``fill``.
    inside = None
    for axis in range(3):
        coords = scale[axis] * np.arange(new_shape[axis]) + offset[axis]
        ok = (coords >= -0.5 - 1e-6) & (coords <= old_shape[axis] - 0.5 + 1e-6)
        shaped = ok.reshape([-1 if a == axis else 1 for a in range(3)])
        inside = shaped if inside is None else inside & shaped
    if not inside.all():
        out[~np.broadcast_to(inside, out.shape)] = fill

    if source.dtype.kind in "iu":
        info = np.iinfo(source.dtype)
        out = np.clip(np.rint(out), info.min, info.max).astype(source.dtype)
    elif out.dtype != source.dtype:
        out = out.astype(source.dtype)

    index_map = np.eye(4)
    index_map[:3, :3] = np.diag(scale)
    index_map[:3, 3] = offset
    affine = np.asarray(volume.affine, dtype=np.float64) @ index_map
    metadata: dict[str, Any] = dict(volume.metadata)
    metadata["resampled_from"] = {"shape": tuple(volume.shape), "spacing": tuple(volume.spacing)}
    return Volume(array=out, spacing=tuple(float(v) for v in new_spacing), affine=affine, metadata=metadata)
