"""A deterministic phantom attribute reader: findings read from the HU volume alone.

:func:`read_attributes` predicts, from a chest CT in canonical orientation
(``(S, H, W)`` HU, slice 0 superior, rows anterior -> posterior, columns patient
right -> left), the five findings the procedural phantoms can carry::

    effusion       "none" | "left" | "right" | "bilateral"
    cardiomegaly   bool
    nodule         bool
    emphysema      bool
    consolidation  bool

It never sees ground truth. Every volume is first brought to a 64 x 64 in-plane
grid (the resolution ctflow generates), then read with image rules:

* **lungs**: air-like voxels (< -500 HU) not connected to the outside air, split
  from the stomach bubble by a one-voxel erosion; components that do not reach the
  upper thorax are dropped. The apex is the first slice with >= 15 cm^2 of lung.
* **emphysema**: the median lung attenuation is below -885 HU (normal -850).
* **effusion**: fluid (-15..22 HU after a 3^3 median) in the posterior half of the
  body, with lung anterior to it and none posterior (dependent), surviving a 3^3
  opening; >= 10 ml (scaled to body size) on a side calls that side.
* **cardiomegaly**: the heart's left border (first lung voxel left of the body
  midline, sub-voxel) relative to the body half-width, 75th percentile over the
  mid-heart slices (115..185 mm below the apex, scaled), at or above 0.67.
* **consolidation**: dense non-lung tissue where a lung-cavity atlas (built from
  phantom label maps, in coordinates normalised to the lung bounding box) gives
  >= 90 % cavity probability; components touching the effusion are dropped; one
  component of >= 20 ml (scaled) calls it. With cardiomegaly, an enlarged-heart
  atlas is used too.
* **nodule**: local maxima inside the (closed) lung field of the volume deblurred
  with the phantom's known in-plane/slice blur kernels are scored by a fixed linear
  rule over blob features (Hessian eigenvalues at four scales, peak HU, how much
  lung surrounds the spot, whether its half-max blob is isolated like a ball or
  continues like a vessel); a score above the calibrated threshold anywhere calls
  a nodule. 6-10 mm nodules are one or two voxels at 64 px and about half of them
  are missed (see ``benchmarks/attribute_reader.py``).

The atlases and the nodule rule's coefficients are calibrated on phantoms by
:func:`calibrate_reader` (run by ``python -m ctflow.eval.train_features``) and
shipped in ``ctflow/eval/weights/attribute_reader.safetensors``. Volumes blurred
like a slice VAE's reconstructions show vessels the shipped nodule rule takes for
nodules; :func:`calibrate_nodule_rule` fits the rule again on such volumes,
:func:`reader_params` swaps it in and :func:`attribute_scores` scores it beside the
shipped rule in one read (``benchmarks/common.vae_nodule_rule``).

:func:`attributes_from_ground_truth` and :func:`attributes_from_report` give the
same keys from a phantom's ground truth and from report text, and
:func:`attribute_accuracy` compares lists of them.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from scipy.linalg import solve_banded

# the report parser lives with the report writer; re-exported here beside the image reader
from ctflow.data.reports import ATTRIBUTE_KEYS, EFFUSION_VALUES, attributes_from_report  # noqa: F401
from ctflow.data.volume import Volume
from ctflow.errors import CTFlowError

READER_SIZE = 64  # in-plane grid the reader works on
WEIGHTS_PATH = Path(__file__).parent / "weights" / "attribute_reader.safetensors"

# decision thresholds (calibrated on phantom seeds 0-399; see benchmarks/attribute_reader.py)
EMPHYSEMA_MEDIAN_HU = -885.0
NO_LUNGS_ML = 100.0  # at most this much lung read: no recognisable lungs (ctflow evaluate: wrong)
EFFUSION_ML = 10.0
FLUID_HU = (-15.0, 22.0)  # pleural fluid, after a 3^3 median
CARDIO_RATIO = 0.67
CONSOLIDATION_ML = 20.0
CAVITY_PROB = 0.9

# the phantom renderer's blur (ctflow.data.phantom): 3-tap [w, 1-2w, w] along z, then in-plane
_Z_BLUR, _XY_BLUR = 0.2, 0.12
# lung-cavity atlas grid: (t, v, u) = (mm below apex / lung width, row, column) in lung-bbox units
ATLAS_SHAPE = (48, 36, 36)
_REF_WIDTH_MM = 250.0  # lung width of an average phantom; volumes are scaled by (width / this)^3
_NODULE_SIGMAS_MM = (3.0, 4.5, 6.0, 8.0)
_SHELL_RADII_MM = (8.0, 18.0, 26.0)
NODULE_FEATURES: tuple[str, ...] = (
    "peak",  # max deblurred HU in the 3^3 neighbourhood, (HU + 500) / 300
    *(f"l3_s{i}" for i in range(4)),  # weakest curvature (blobness) per scale, / 100
    *(f"l1_s{i}" for i in range(4)),  # strongest curvature per scale, / 100
    "shell8",  # fraction of lung on spheres of 8, 18, 26 mm around the spot
    "shell18",
    "shell26",
    "dense8",  # fraction of dense (> -400 HU) on the 8 and 18 mm spheres
    "dense18",
    "edge_dist",  # distance to the lung-field edge, / 20 mm
    "l3_best",  # blobness at the best scale
    "shell_best",  # lung fraction on a sphere just outside the best-scale blob
    "ring",  # isolation: (max on the ring around the half-max blob + 885) / (peak + 885)
    "touch",  # the half-max blob reaches the 7^3 box (a tube, not a ball)
    "blob_voxels",  # half-max blob size in voxels / 100
)
_DIRS = np.random.default_rng(0).normal(size=(64, 3))
_DIRS /= np.linalg.norm(_DIRS, axis=1, keepdims=True)


# ----------------------------------------------------------------------------- inputs


def _as_volume(volume, spacing=None) -> Volume:
    if isinstance(volume, Volume):
        return volume
    arr = np.asarray(volume)
    if arr.ndim != 3:
        raise CTFlowError(f"read_attributes needs a 3D (S, H, W) HU volume; got shape {arr.shape}")
    if spacing is None:  # the reader measures in mm and ml: a guessed spacing misreads every finding
        raise CTFlowError(
            "read_attributes of an array needs its spacing (slice, row, column mm); pass spacing= or a Volume"
        )
    return Volume(arr, spacing)


def _deblur_axis(x: np.ndarray, axis: int, w: float) -> np.ndarray:
    """Invert the 3-tap ``[w, 1-2w, w]`` smoothing (edges replicated) along ``axis`` exactly."""
    n = x.shape[axis]
    if n < 3:
        return x
    ab = np.zeros((3, n))
    ab[0, 1:] = w
    ab[1, :] = 1 - 2 * w
    ab[2, :-1] = w
    ab[1, 0] = ab[1, -1] = 1 - w
    xm = np.moveaxis(x, axis, 0)
    y = solve_banded((1, 1), ab, xm.reshape(n, -1)).reshape(xm.shape)
    return np.moveaxis(y, 0, axis).astype(np.float32)


def deblur(hu: np.ndarray) -> np.ndarray:
    """Undo the phantom renderer's slice profile and in-plane blur: (S, H, W) -> (S, H, W)."""
    y = _deblur_axis(hu, 2, _XY_BLUR)
    y = _deblur_axis(y, 1, _XY_BLUR)
    return _deblur_axis(y, 0, _Z_BLUR)


def _to_reader_grid(arr: np.ndarray, spacing) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Area-resample the slices to READER_SIZE x READER_SIZE: (S, H, W) -> (S, 64, 64)."""
    S, H, W = arr.shape
    if (H, W) == (READER_SIZE, READER_SIZE):
        return arr, tuple(spacing)
    out = np.empty((S, READER_SIZE, READER_SIZE), np.float32)
    zoom = (READER_SIZE / H, READER_SIZE / W)
    sigma = (max(0.0, (1 / zoom[0] - 1) / 2), max(0.0, (1 / zoom[1] - 1) / 2))
    for k in range(S):
        sl = ndi.gaussian_filter(arr[k], sigma, mode="nearest") if max(sigma) > 0 else arr[k]
        out[k] = ndi.zoom(sl, zoom, order=1, mode="nearest", grid_mode=True)
    return out, (spacing[0], spacing[1] * H / READER_SIZE, spacing[2] * W / READER_SIZE)


def _median3(x: np.ndarray) -> np.ndarray:
    """Separable 3-tap median along each axis (edges replicated): a fast 3^3 median stand-in."""
    for axis in range(x.ndim):
        p = np.moveaxis(
            np.pad(x, [(1, 1) if a == axis else (0, 0) for a in range(x.ndim)], mode="edge"), axis, 0
        )
        a, b, c = p[:-2], p[1:-1], p[2:]
        x = np.moveaxis(np.maximum(np.minimum(a, b), np.minimum(np.maximum(a, b), c)), 0, axis)
    return np.ascontiguousarray(x)


# ----------------------------------------------------------------------------- anatomy


class _Scan:
    """Shared intermediate results of one read (all on the reader grid)."""

    def __init__(self, volume: Volume):
        hu = volume.hu()
        if not np.isfinite(hu).all():
            raise CTFlowError("read_attributes: the volume holds NaN or infinite values")
        self.hu, self.sp = _to_reader_grid(hu, volume.spacing)  # (S, 64, 64) HU; mm
        sharp = deblur(hu) if min(hu.shape) >= 3 else hu
        self.sharp, _ = _to_reader_grid(sharp, volume.spacing)  # deblurred, for nodules
        self.S, self.H, self.W = self.hu.shape
        self.voxel_ml = float(np.prod(self.sp)) / 1000.0
        self.median = _median3(self.hu)
        self.lung = _lung_mask(self.hu, self.sp)
        area = self.lung.sum((1, 2)) * self.sp[1] * self.sp[2]
        ks = np.nonzero(area >= 1500.0)[0]
        self.has_lungs = len(ks) > 0 and self.lung.sum() * self.voxel_ml > NO_LUNGS_ML
        if not self.has_lungs:
            return
        self.apex = int(ks[0])
        lung_cols = np.nonzero(self.lung[ks[0] :].any((0, 1)))[0]
        lung_rows = np.nonzero(self.lung[ks[0] :].any((0, 2)))[0]
        self.bbox_cols = (int(lung_cols[0]), int(lung_cols[-1]))
        self.bbox_rows = (int(lung_rows[0]), int(lung_rows[-1]))
        self.width_mm = (lung_cols[-1] - lung_cols[0] + 1) * self.sp[2]
        self.scale3 = (self.width_mm / _REF_WIDTH_MM) ** 3
        body_rows = slice(self.bbox_rows[0], self.bbox_rows[1] + 1)  # rows of the lungs: no table
        body = (self.hu[:, body_rows] > -500).any(1)  # (S, W)
        self.body_cols = np.array(
            [(c[0], c[-1]) if len(c) else (0, self.W - 1) for c in (np.nonzero(b)[0] for b in body)]
        )  # (S, 2) first and last body column per slice
        self.cx = self.body_cols.mean(1)  # (S,) body midline column
        rows = np.nonzero((self.hu > -500).any((0, 2)))[0]
        self.body_row0 = int(rows[0]) if len(rows) else 0


def _lung_mask(hu: np.ndarray, sp) -> np.ndarray:
    """(S, H, W) bool: the lungs (air-like tissue inside the body, without the stomach bubble)."""
    low = hu < -500
    lab, n = ndi.label(low)
    if n == 0:
        return low
    border = np.unique(
        np.concatenate([lab[:, 0].ravel(), lab[:, -1].ravel(), lab[:, :, 0].ravel(), lab[:, :, -1].ravel()])
    )
    inside = np.ones(n + 1, bool)
    inside[border] = False
    inside[0] = False
    inner = inside[lab]
    # split thin partial-volume bridges (lung base <-> stomach air) with an in-plane erosion
    st = np.zeros((3, 3, 3), bool)
    st[1] = ndi.generate_binary_structure(2, 1)
    core = ndi.binary_erosion(inner, st)
    lab, n = ndi.label(core)
    if n == 0:
        return np.zeros_like(inner)
    sizes = np.bincount(lab.ravel(), minlength=n + 1) * float(np.prod(sp)) / 1000.0
    tops = np.array([0] + [o[0].start for o in ndi.find_objects(lab)])
    keep = sizes > 30.0
    keep[0] = False
    if not keep.any():
        return np.zeros_like(inner)
    top = tops[keep].min()
    keep &= (tops - top) * sp[0] < 80.0  # lungs reach the upper thorax; the stomach bubble does not
    return ndi.binary_dilation(keep[lab], st, mask=inner)


def _lung_field(scan: _Scan) -> np.ndarray:
    """Each lung with vessels, nodules and small bays closed in (3 x a 3^3 closing per side).

    The sides are closed separately so the mediastinum between them stays outside.
    """
    p = 3
    right = np.arange(scan.W)[None, None, :] < scan.cx[:, None, None]
    field = scan.lung.copy()
    for side in (right, ~right):
        closed = ndi.binary_closing(np.pad(scan.lung & side, p), np.ones((3, 3, 3), bool), iterations=3)
        field |= closed[p:-p, p:-p, p:-p] & side
    return field


# ----------------------------------------------------------------------------- findings


def _emphysema_hu(scan: _Scan) -> float:
    return float(np.median(scan.hu[scan.lung]))


def _posterior_half(scan: _Scan) -> np.ndarray:
    """(1, H, 1) bool: the rows in the posterior half of the body, from its first row to just past the
    lungs' posterior edge (the table lies below it), where dependent fluid lies."""
    r0, r1 = scan.body_row0, scan.bbox_rows[1] + 2
    return ((np.arange(scan.H) - r0) / max(r1 - r0, 1) > 0.5)[None, :, None]


def _right_side(scan: _Scan) -> np.ndarray:
    """(S, 1, W) bool: the columns on the patient's right of each slice's body midline."""
    return np.arange(scan.W)[None, None, :] < scan.cx[:, None, None]


def _effusion_mask(scan: _Scan) -> np.ndarray:
    """(S, H, W) bool: dependent pleural fluid."""
    fluid = (scan.median >= FLUID_HU[0]) & (scan.median <= FLUID_HU[1])
    fluid = ndi.binary_opening(fluid, np.ones((3, 3, 3), bool))
    lung = scan.lung
    anterior = np.maximum.accumulate(lung, axis=1)  # lung at or in front of the voxel
    posterior = np.maximum.accumulate(lung[:, ::-1], axis=1)[:, ::-1]
    return fluid & anterior & ~posterior & _posterior_half(scan)


def _effusion_ml(scan: _Scan, eff: np.ndarray) -> tuple[float, float]:
    """Scaled fluid volume (ml) on the patient's right and left."""
    right = _right_side(scan)
    r = float((eff & right).sum()) * scan.voxel_ml / scan.scale3
    left = float((eff & ~right).sum()) * scan.voxel_ml / scan.scale3
    return r, left


def _cardio_ratio(scan: _Scan, also_lung: np.ndarray | None = None) -> float:
    """75th percentile over mid-heart slices of (heart left border - midline) / body half-width.

    ``also_lung`` (S, H, W) marks regions counted as lung field (a consolidation).
    """
    field = scan.lung if also_lung is None else scan.lung | also_lung
    scale = scan.width_mm / _REF_WIDTH_MM
    z = (np.arange(scan.S) - scan.apex) * scan.sp[0] / scale
    area = scan.lung.sum((1, 2))
    sel = np.nonzero((z >= 115.0) & (z <= 185.0) & (area > 5))[0]
    if len(sel) == 0:
        return 0.0
    per = []
    for k in sel:
        c0, c1 = scan.body_cols[k]
        cx, half = (c0 + c1) / 2.0, (c1 - c0 + 1) / 2.0
        lung = field[k]
        best = 0.0
        h_end = int((scan.bbox_rows[0] + scan.bbox_rows[1]) / 2) + 1  # anterior half of the lungs
        for h in range(scan.bbox_rows[0], h_end):
            cols = np.nonzero(lung[h])[0]
            cols = cols[cols > cx + 1]
            if len(cols) == 0:
                continue
            c = int(cols[0])
            v0, v1 = scan.hu[k, h, c - 1], scan.hu[k, h, c]
            x = c - 1 + (v0 + 500.0) / (v0 - v1) if v0 > -500.0 > v1 and not lung[h, c - 1] else float(c)
            best = max(best, (x - cx) / half)
        per.append(best)
    return float(np.percentile(per, 75))


def _atlas_index(scan: _Scan):
    """Atlas cell indices (t (S,), v (H,), u (W,)) of every voxel."""
    nt, nv, nu = ATLAS_SHAPE
    (c0, c1), (r0, r1) = scan.bbox_cols, scan.bbox_rows
    u = (np.arange(scan.W) - c0) / max(c1 - c0, 1)
    v = (np.arange(scan.H) - r0) / max(r1 - r0, 1)
    t = (np.arange(scan.S) - scan.apex) * scan.sp[0] / scan.width_mm
    iu = np.clip(np.floor((u + 0.1) / 1.2 * nu), 0, nu - 1).astype(int)
    iv = np.clip(np.floor((v + 0.1) / 1.2 * nv), 0, nv - 1).astype(int)
    it = np.clip(np.floor((t + 0.1) / 1.5 * nt), 0, nt - 1).astype(int)
    return it, iv, iu


def _consolidation_regions(scan: _Scan, eff: np.ndarray, atlas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense tissue where the lungs should be: component labels (S, H, W) and scaled volumes (ml) per label."""
    it, iv, iu = _atlas_index(scan)
    prob = atlas[it[:, None, None], iv[None, :, None], iu[None, None, :]]
    cand = (prob > CAVITY_PROB) & ~scan.lung & (scan.median > -300.0) & (scan.median < 150.0)
    cand = ndi.binary_opening(cand, np.ones((3, 3, 3), bool))
    lab, n = ndi.label(cand)
    if n == 0:
        return lab, np.zeros(1)
    near_fluid = ndi.binary_dilation(eff, ndi.generate_binary_structure(3, 1), iterations=2)
    total = np.bincount(lab.ravel(), minlength=n + 1)
    overlap = np.bincount(lab[near_fluid].ravel(), minlength=n + 1)
    keep = overlap < 0.1 * total  # fluid belongs to the effusion reading
    keep[0] = False
    ml = np.where(keep, total * scan.voxel_ml / scan.scale3, 0.0)
    return lab, ml


def _hessian_l(x: np.ndarray, sp, sigma_mm: float, pts: np.ndarray) -> np.ndarray:
    """Scale-normalised Hessian eigenvalues (ascending) at ``pts`` (N, 3): (N, 3)."""
    s = [sigma_mm / v for v in sp]
    h = np.zeros((len(pts), 3, 3))
    for i in range(3):
        for j in range(i, 3):
            order = [0, 0, 0]
            order[i] += 1
            order[j] += 1
            d = ndi.gaussian_filter(x, s, order=order, mode="nearest")
            h[:, i, j] = h[:, j, i] = d[tuple(pts.T)] / (sp[i] * sp[j]) * sigma_mm**2
    return np.linalg.eigvalsh(h)


def _isolation(sharp: np.ndarray, pts: np.ndarray, r: int = 3) -> np.ndarray:
    """Per point: the half-max blob around it in a (2r+1)^3 box, and how isolated it is: (N, 3).

    In the deblurred phantom a nodule is a binary ball of soft tissue in lung, so
    the ring around its half-max blob is lung; a vessel continues through it.
    """
    padded = np.pad(sharp, r + 1, mode="edge")
    cube = np.ones((3, 3, 3), bool)
    out = np.zeros((len(pts), 3), np.float32)
    for n, p in enumerate(pts + r + 1):
        box = padded[p[0] - r : p[0] + r + 1, p[1] - r : p[1] + r + 1, p[2] - r : p[2] + r + 1]
        peak = box[r - 1 : r + 2, r - 1 : r + 2, r - 1 : r + 2].max()
        lab, _ = ndi.label(box >= (peak - 885.0) / 2)
        blob = lab == lab[r - 1 : r + 2, r - 1 : r + 2, r - 1 : r + 2].max()
        ring = ndi.binary_dilation(blob, cube) & ~blob
        ring_max = box[ring].max() if ring.any() else -1000.0
        edges = (blob[0], blob[-1], blob[:, 0], blob[:, -1], blob[:, :, 0], blob[:, :, -1])
        out[n] = (
            (ring_max + 885.0) / (peak + 885.0 + 1e-3),
            float(any(e.any() for e in edges)),
            blob.sum() / 100,
        )
    return out


def nodule_candidates(scan: _Scan, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Blob candidates in the lung field: voxel positions (N, 3) and features (N, len(NODULE_FEATURES))."""
    field = _lung_field(scan)
    if exclude is not None:
        field &= ~exclude
    boxes = ndi.find_objects(field.astype(np.uint8))
    if not boxes:
        return np.zeros((0, 3), int), np.zeros((0, len(NODULE_FEATURES)), np.float32)
    bb = tuple(slice(max(s.start - 2, 0), s.stop + 2) for s in boxes[0])
    sharp, lung, fld = scan.sharp[bb], scan.lung[bb], field[bb]
    x = np.clip(sharp, -1000.0, -100.0)
    g = ndi.gaussian_filter(x, [3.0 / v for v in scan.sp], mode="nearest")
    pts = np.argwhere((g == ndi.maximum_filter(g, size=3)) & fld & (g > -850.0))
    if len(pts) == 0:
        return np.zeros((0, 3), int), np.zeros((0, len(NODULE_FEATURES)), np.float32)
    ev = np.stack([_hessian_l(x, scan.sp, s, pts) for s in _NODULE_SIGMAS_MM], 1)  # (N, 4, 3)
    peak = ndi.maximum_filter(sharp, size=3)[tuple(pts.T)]
    shape = np.array(sharp.shape)

    def sphere(radius):  # (N, 64) sample positions on spheres of ``radius`` mm (N,) or float
        r = np.broadcast_to(np.asarray(radius, dtype=float), (len(pts),))
        q = np.rint(pts[:, None, :] + _DIRS[None] * r[:, None, None] / np.array(scan.sp)).astype(int)
        ok = np.all((q >= 0) & (q < shape), axis=2)
        q = np.clip(q, 0, shape - 1)
        return (q[..., 0], q[..., 1], q[..., 2]), ok

    shells, dense = [], []
    for radius in _SHELL_RADII_MM:
        q, ok = sphere(radius)
        shells.append((lung[q] & ok).mean(1))
        dense.append(((sharp[q] > -400.0) & ok).mean(1))
    l3 = -ev[:, :, 2]  # (N, 4)
    best = np.argmax(l3, axis=1)
    q, ok = sphere(2.0 * np.asarray(_NODULE_SIGMAS_MM)[best] + 6.0)
    shell_best = (lung[q] & ok).mean(1)
    dist = ndi.distance_transform_edt(np.pad(fld, 1), sampling=scan.sp)[1:-1, 1:-1, 1:-1][tuple(pts.T)]
    feats = np.column_stack(
        [
            (peak + 500.0) / 300.0,
            l3 / 100.0,
            -ev[:, :, 0] / 100.0,
            *shells,
            dense[0],
            dense[1],
            dist / 20.0,
            l3.max(1) / 100.0,
            shell_best,
            _isolation(sharp, pts),
        ]
    ).astype(np.float32)
    return pts + np.array([s.start for s in bb]), feats


# ----------------------------------------------------------------------------- the reader


@lru_cache(maxsize=4)
def _load_params(path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    p = Path(path)
    if not p.is_file():
        raise CTFlowError(
            f"attribute reader parameters {p} not found; run `python -m ctflow.eval.train_features`"
        )
    params = {k: v.astype(np.float32) for k, v in load_file(str(p)).items()}
    if params["nodule_weight"].shape != (len(NODULE_FEATURES),):
        raise CTFlowError(
            f"{p} was calibrated for other nodule features; rerun `python -m ctflow.eval.train_features`"
        )
    return params


def _consolidation(scan: _Scan, eff: np.ndarray, params: dict) -> tuple[np.ndarray, np.ndarray, float]:
    """The consolidation candidates (labels, ml per label) and the cardiothoracic ratio: with an enlarged
    heart the regions are found again with the enlarged-heart atlas."""
    atlas = params["cavity_atlas"]
    lab, ml = _consolidation_regions(scan, eff, atlas)
    # a consolidation next to the heart is not heart
    cardio = _cardio_ratio(scan, (ml >= CONSOLIDATION_ML)[lab])
    if cardio >= CARDIO_RATIO:
        lab, ml = _consolidation_regions(scan, eff, np.minimum(atlas, params["cavity_atlas_cardiomegaly"]))
    return lab, ml, cardio


def consolidation_regions(volume, spacing=None) -> list[dict]:
    """The regions the reader calls consolidation (each at least ``CONSOLIDATION_ML``), largest first:
    ``ml`` (scaled like the call), ``median_hu`` (of their 3^3-median HU), ``posterior_share`` (of
    their voxels in the posterior half of the body, where dependent fluid lies), ``right_share`` (on
    the patient's right of the body midline) and ``slices`` (first and last slice). What the reader
    saw when it called one, e.g. fluid drawn denser than its fluid band
    (``benchmarks/consolidation_probe.py``)."""
    scan = _Scan(_as_volume(volume, spacing))
    if not scan.has_lungs:
        return []
    lab, ml, _ = _consolidation(scan, _effusion_mask(scan), _load_params(str(WEIGHTS_PATH)))
    posterior, right = _posterior_half(scan), _right_side(scan)
    out = []
    for k in np.argsort(-ml):
        if ml[k] < CONSOLIDATION_ML:
            break
        region = lab == k
        z = np.nonzero(region.any((1, 2)))[0]
        out.append(
            {
                "ml": round(float(ml[k]), 1),
                "median_hu": round(float(np.median(scan.median[region])), 1),
                "posterior_share": round(float((region & posterior).sum() / region.sum()), 3),
                "right_share": round(float((region & right).sum() / region.sum()), 3),
                "slices": [int(z[0]), int(z[-1])],
            }
        )
    return out


def _nodule_exclusion(eff: np.ndarray, lab: np.ndarray, ml: np.ndarray) -> np.ndarray:
    """Where no nodule is looked for: the effusion and the consolidations, grown by a voxel."""
    return ndi.binary_dilation(eff | (ml >= CONSOLIDATION_ML)[lab], iterations=1)


def _nodule_score(feats: np.ndarray, rule: dict) -> float:
    """The most nodule-like candidate's score under a nodule rule, less its threshold (>= 0: nodule)."""
    if not len(feats):
        return -10.0
    z = (feats - rule["nodule_mean"]) / rule["nodule_std"]
    return float((z @ rule["nodule_weight"] + rule["nodule_bias"][0]).max()) - float(
        rule["nodule_threshold"][0]
    )


def attribute_scores(
    volume, spacing=None, params: dict | None = None, nodule_rules: dict[str, dict] | None = None
) -> dict[str, float]:
    """The continuous measurements behind :func:`read_attributes` (thresholds not applied).

    ``nodule_rules`` ({name: rule}, :func:`calibrate_nodule_rule`) score the same nodule candidates
    under other rules too, as ``nodule_score_{name}``, without reading the volume again."""
    vol = _as_volume(volume, spacing)
    params = params if params is not None else _load_params(str(WEIGHTS_PATH))
    rules = {name: _checked_rule(rule) for name, rule in (nodule_rules or {}).items()}
    scan = _Scan(vol)
    if not scan.has_lungs:
        return {"lung_volume_ml": float(scan.lung.sum() * scan.voxel_ml), "has_lungs": 0.0}
    eff = _effusion_mask(scan)
    right_ml, left_ml = _effusion_ml(scan, eff)
    lab, ml, cardio = _consolidation(scan, eff, params)
    cons_ml = float(ml.max())
    _, feats = nodule_candidates(scan, _nodule_exclusion(eff, lab, ml))
    return {
        "has_lungs": 1.0,
        "lung_volume_ml": float(scan.lung.sum() * scan.voxel_ml),
        "lung_median_hu": _emphysema_hu(scan),
        "effusion_right_ml": right_ml,
        "effusion_left_ml": left_ml,
        "cardio_ratio": cardio,
        "consolidation_ml": cons_ml,
        "nodule_score": _nodule_score(feats, params),  # > 0: nodule
        **{f"nodule_score_{name}": _nodule_score(feats, rule) for name, rule in rules.items()},
    }


def attributes_from_scores(scores: dict[str, float], nodule_score: str = "nodule_score") -> dict:
    """Apply the decision thresholds to :func:`attribute_scores` output; ``nodule_score`` names the
    score the nodule call is read from (``nodule_score_{name}`` for another rule's)."""
    if not scores.get("has_lungs"):
        return {
            "effusion": "none",
            "cardiomegaly": False,
            "nodule": False,
            "emphysema": False,
            "consolidation": False,
            "lung_volume_ml": scores.get("lung_volume_ml", 0.0),
            "has_lungs": False,
        }
    right = scores["effusion_right_ml"] >= EFFUSION_ML
    left = scores["effusion_left_ml"] >= EFFUSION_ML
    effusion = "bilateral" if right and left else "right" if right else "left" if left else "none"
    return {
        "effusion": effusion,
        "cardiomegaly": bool(scores["cardio_ratio"] >= CARDIO_RATIO),
        "nodule": bool(scores[nodule_score] >= 0.0),
        "emphysema": bool(scores["lung_median_hu"] < EMPHYSEMA_MEDIAN_HU),
        "consolidation": bool(scores["consolidation_ml"] >= CONSOLIDATION_ML),
        "lung_volume_ml": round(float(scores["lung_volume_ml"]), 1),
        "has_lungs": True,
    }


def read_attributes(volume, spacing=None, params: dict | None = None) -> dict:
    """Predict the phantom findings of a HU volume (a :class:`Volume`, or an (S, H, W) array and its
    ``spacing``, which an array needs).

    Returns ``{"effusion": "none"|"left"|"right"|"bilateral", "cardiomegaly": bool,
    "nodule": bool, "emphysema": bool, "consolidation": bool, "lung_volume_ml": float,
    "has_lungs": bool}``. A volume without recognisable lungs (``has_lungs`` False) reads as normal;
    ``ctflow evaluate`` counts it wrong on every attribute. ``params``: the reader's parameters
    (default: the shipped ones, :func:`reader_params`).
    """
    return attributes_from_scores(attribute_scores(volume, spacing, params))


def reader_params(nodule_rule: dict | None = None) -> dict[str, np.ndarray]:
    """The shipped reader parameters, with another nodule rule (:func:`calibrate_nodule_rule`) if given."""
    params = dict(_load_params(str(WEIGHTS_PATH)))
    return params if nodule_rule is None else {**params, **_checked_rule(nodule_rule)}


def _checked_rule(rule: dict) -> dict[str, np.ndarray]:
    """A nodule rule's arrays as float32, once it holds exactly NODULE_RULE_KEYS."""
    if set(rule) != set(NODULE_RULE_KEYS):
        raise CTFlowError(f"a nodule rule holds {', '.join(NODULE_RULE_KEYS)}; got {sorted(rule)}")
    return {k: np.asarray(v, np.float32) for k, v in rule.items()}


# ----------------------------------------------------------------------------- other sources


def attributes_from_ground_truth(gt: dict) -> dict:
    """The same keys from a phantom's ground truth (visible findings only, as the labels)."""
    if not isinstance(gt, dict) or "findings" not in gt:
        raise CTFlowError("attributes_from_ground_truth needs a phantom ground-truth dict with 'findings'")
    vis = [f for f in gt["findings"] if f.get("visible", True)]
    sides = {f["side"] for f in vis if f["type"] == "effusion"}
    if "bilateral" in sides or sides == {"left", "right"}:
        effusion = "bilateral"
    else:
        effusion = next(iter(sides)) if sides else "none"
    kinds = {f["type"] for f in vis}
    return {
        "effusion": effusion,
        "cardiomegaly": "cardiomegaly" in kinds,
        "nodule": "nodule" in kinds,
        "emphysema": "emphysema" in kinds,
        "consolidation": "consolidation" in kinds,
    }


def attribute_accuracy(pred_list: list[dict], truth_list: list[dict]) -> dict[str, float]:
    """Per-attribute fraction of equal values (``effusion`` must match the side exactly)."""
    if len(pred_list) != len(truth_list):
        raise CTFlowError(f"attribute_accuracy: {len(pred_list)} predictions vs {len(truth_list)} truths")
    if not pred_list:
        raise CTFlowError("attribute_accuracy needs at least one (prediction, truth) pair")
    return {
        k: float(np.mean([p[k] == t[k] for p, t in zip(pred_list, truth_list, strict=True)]))
        for k in ATTRIBUTE_KEYS
    }


_ABSENT = (None, False, "none")  # attribute values that name no finding


def finding_counts(pred_list: list[dict], truth_list: list[dict]) -> dict:
    """What the accuracies hide, per attribute: ``found`` (reported findings the reader finds, an
    effusion on the reported side; reported), ``false`` (findings read where the truth has none), and
    ``effusion_any_side`` (reported effusions read on either side; reported)."""
    if len(pred_list) != len(truth_list):
        raise CTFlowError(f"finding_counts: {len(pred_list)} predictions vs {len(truth_list)} truths")
    pairs = list(zip(pred_list, truth_list, strict=True))
    out: dict = {"found": {}, "false": {}}
    for k in ATTRIBUTE_KEYS:
        named = [(p, t) for p, t in pairs if t[k] not in _ABSENT]
        out["found"][k] = (sum(p[k] == t[k] for p, t in named), len(named))
        out["false"][k] = sum(p[k] not in _ABSENT for p, t in pairs if t[k] in _ABSENT)
    named = [p for p, t in pairs if t["effusion"] not in _ABSENT]
    out["effusion_any_side"] = (sum(p["effusion"] not in _ABSENT for p in named), len(named))
    return out


# ----------------------------------------------------------------------------- calibration


_CAVITY_TISSUES = ("lung_right", "lung_left", "effusion", "consolidation", "nodule", "atelectasis")


def _accumulate_atlas(scan: _Scan, labels: np.ndarray, counts: np.ndarray, totals: np.ndarray) -> None:
    from ctflow.data.phantom import LABEL_IDS

    nt, nv, nu = ATLAS_SHAPE
    it, iv, iu = _atlas_index(scan)
    cavity = np.isin(labels, [LABEL_IDS[n] for n in _CAVITY_TISSUES])
    idx = np.broadcast_to((it[:, None, None] * nv + iv[None, :, None]) * nu + iu[None, None, :], cavity.shape)
    counts += np.bincount(idx.ravel(), weights=cavity.ravel(), minlength=nt * nv * nu).reshape(ATLAS_SHAPE)
    totals += np.bincount(idx.ravel(), minlength=nt * nv * nu).reshape(ATLAS_SHAPE)


def _fit_linear(x: np.ndarray, y: np.ndarray, l2: float = 1e-3) -> tuple[np.ndarray, float]:
    """Class-weighted logistic regression (positives x20) by Newton steps: weights, bias."""
    n, d = x.shape
    a = np.hstack([x, np.ones((n, 1))])
    w = np.zeros(d + 1)
    cw = np.where(y > 0, 20.0, 1.0)
    reg = np.full(d + 1, 2 * l2 * cw.sum() / n)
    reg[-1] = 0.0
    for _ in range(30):
        p = 1.0 / (1.0 + np.exp(-np.clip(a @ w, -30, 30)))
        grad = a.T @ (cw * (p - y)) / n + reg * w
        hess = (a * (cw * p * (1 - p))[:, None]).T @ a / n + np.diag(reg + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-6:
            break
    return w[:-1], float(w[-1])


NODULE_RULE_KEYS = ("nodule_weight", "nodule_bias", "nodule_mean", "nodule_std", "nodule_threshold")


def _nodule_samples(scan: _Scan, findings: list[dict], shape, exclude: np.ndarray | None = None):
    """A scan's nodule candidates' features, whether each lies within 10 mm of a visible nodule of the
    ground truth ``findings`` (voxel centres of the volume of ``shape``, before the reader's in-plane
    resampling), and whether the scan has one: (features, near, has_nodule)."""
    pts, feats = nodule_candidates(scan, exclude)
    nodules = [f for f in findings if f["type"] == "nodule" and f.get("visible")]
    zoom = np.array([1.0, scan.H / shape[1], scan.W / shape[2]])
    near = np.zeros(len(pts), bool)
    for f in nodules:
        centre = (np.array(f["center_voxel"]) + 0.5) * zoom - 0.5  # on the reader's grid
        near |= np.linalg.norm((pts - centre) * np.array(scan.sp), axis=1) < 10.0
    return feats, near, bool(nodules)


def fit_nodule_rule(samples: list[tuple[np.ndarray, np.ndarray, bool]]) -> dict[str, np.ndarray]:
    """The linear nodule rule from scans' (features, near, has_nodule) (:func:`_nodule_samples`): a
    class-weighted logistic fit of "near a nodule" on standardised features, and the threshold on a
    scan's highest candidate score that reads the most scans right."""
    x = np.concatenate([f for f, _, _ in samples])
    y = np.concatenate([n for _, n, _ in samples]).astype(np.float64)
    mean, std = x.mean(0), x.std(0) + 1e-6
    w, b = _fit_linear((x - mean) / std, y)
    best = np.array([((f - mean) / std @ w + b).max() if len(f) else -np.inf for f, _, _ in samples])
    truth = np.array([has for _, _, has in samples])
    cuts = np.unique(best[np.isfinite(best)])
    acc = [((best >= c) == truth).mean() for c in cuts]
    i = int(np.argmax(acc))
    threshold = float((cuts[i] + cuts[i - 1]) / 2) if i > 0 else float(cuts[0] - 1e-3)
    return {
        "nodule_weight": w.astype(np.float32),
        "nodule_bias": np.array([b], np.float32),
        "nodule_mean": mean.astype(np.float32),
        "nodule_std": std.astype(np.float32),
        "nodule_threshold": np.array([threshold], np.float32),
    }


def calibrate_nodule_rule(cases, log=None) -> dict[str, np.ndarray]:
    """The nodule rule fitted on other volumes than the phantoms themselves: ``cases`` yields
    (volume, ground truth) pairs, for example phantoms through a slice VAE, whose blur makes vessels
    read as nodules under the phantom-calibrated rule. Candidates are found as
    :func:`attribute_scores` finds them (outside the effusion and consolidations). Use the result with
    :func:`reader_params` or as one of :func:`attribute_scores`' ``nodule_rules``."""
    params, samples = _load_params(str(WEIGHTS_PATH)), []
    for n, (volume, truth) in enumerate(cases):
        volume = _as_volume(volume)
        scan = _Scan(volume)
        if scan.has_lungs:
            eff = _effusion_mask(scan)
            lab, ml, _ = _consolidation(scan, eff, params)
            exclude = _nodule_exclusion(eff, lab, ml)
            samples.append(_nodule_samples(scan, truth["findings"], volume.array.shape, exclude))
        if log is not None and (n + 1) % 50 == 0:
            log(f"nodule rule: {n + 1} volumes")
    if not any(has for _, _, has in samples) or all(has for _, _, has in samples):
        raise CTFlowError("calibrate_nodule_rule needs volumes with and without a visible nodule")
    return fit_nodule_rule(samples)


def calibrate_reader(
    seeds, size: int = READER_SIZE, slice_range=(40, 120), log=None
) -> dict[str, np.ndarray]:
    """Build the cavity atlases and fit the nodule rule on freshly rendered phantoms.

    Returns float32 arrays ready for safetensors: ``cavity_atlas`` and
    ``cavity_atlas_cardiomegaly`` (ATLAS_SHAPE), ``nodule_weight``, ``nodule_bias``,
    ``nodule_mean``, ``nodule_std``, ``nodule_threshold``. Deterministic for given seeds.
    """
    from ctflow.data.phantom import render_phantom, sample_spec

    if size % READER_SIZE:  # the label maps are strided down to the reader's grid
        raise CTFlowError(f"calibration phantoms must be a multiple of {READER_SIZE} pixels wide, got {size}")
    counts, totals = np.zeros(ATLAS_SHAPE), np.zeros(ATLAS_SHAPE)
    counts_c, totals_c = np.zeros(ATLAS_SHAPE), np.zeros(ATLAS_SHAPE)
    samples = []
    seeds = list(seeds)
    for n, seed in enumerate(seeds):
        spec = sample_spec(int(seed), size=size, slice_range=slice_range)
        r = render_phantom(spec)
        scan = _Scan(r.volume)
        if not scan.has_lungs:
            continue
        _accumulate_atlas(scan, r.labels[:, :: size // READER_SIZE, :: size // READER_SIZE], counts, totals)
        # the same body with an enlarged heart (findings never change the anatomy stream)
        if not any(f["type"] == "cardiomegaly" for f in spec.findings) and n % 2 == 0:
            spec.findings = [*spec.findings, {"type": "cardiomegaly"}]
            rc = render_phantom(spec)
            scan_c = _Scan(rc.volume)
            if scan_c.has_lungs:
                _accumulate_atlas(
                    scan_c, rc.labels[:, :: size // READER_SIZE, :: size // READER_SIZE], counts_c, totals_c
                )
        elif any(f["type"] == "cardiomegaly" for f in spec.findings):
            _accumulate_atlas(
                scan, r.labels[:, :: size // READER_SIZE, :: size // READER_SIZE], counts_c, totals_c
            )
        samples.append(_nodule_samples(scan, r.ground_truth["findings"], r.volume.array.shape))
        if log is not None and (n + 1) % 50 == 0:
            log(f"reader calibration: {n + 1}/{len(seeds)} phantoms")
    atlas = counts / np.maximum(totals, 1)
    atlas_c = counts_c / np.maximum(totals_c, 1)
    atlas_c[totals_c == 0] = atlas[totals_c == 0]
    return {
        "cavity_atlas": atlas.astype(np.float32),
        "cavity_atlas_cardiomegaly": atlas_c.astype(np.float32),
        **fit_nodule_rule(samples),
    }
