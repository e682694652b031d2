"""Procedural chest-CT phantoms with exact ground truth.

A phantom is fully determined by a :class:`PhantomSpec`. Anatomy is defined
analytically in physical millimetres, so the same spec sampled with a different
slice spacing, slice count or field of view shows the same body at a different
sampling. Coordinates used inside this module ("anatomy units") are mm divided
by ``body_scale``:

* ``X``: patient right (-) to left (+), 0 = body midline;
* ``Y``: anterior (-) to posterior (+), 0 = body centre;
* ``Z``: superior (-) to inferior (+), 0 = the lung apex.

In the ground truth, ``*_voxel`` positions are array indices ``(slice, row, column)`` of the
volume as written; ``center_mm`` is in this body frame, in mm (anatomy units times
``body_scale``), not the NIfTI's world coordinates: map ``center_voxel`` through the affine for
those.

Rendering builds a ``uint8`` tissue-label volume (cheap vectorised predicates:
2D in-plane maps broadcast against 1D functions of ``Z``), maps labels to HU
with a lookup table, splats tubes (airways, great vessels, the pulmonary vessel
tree) and small spheres, then applies a slice profile along ``Z``, correlated
Gaussian noise and a light in-plane blur. Everything is seeded from
``spec.seed`` through independent ``SeedSequence`` streams (anatomy, vessels,
findings, noise), so adding a finding changes nothing else, and the same spec
gives a bit-identical array.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from ctflow.data.labels import CTRATE_LABELS
from ctflow.data.volume import Volume, canonical_affine
from ctflow.errors import CTFlowError, check_whole, is_number, one_of, positive_number

MAX_SLICE_SPACING = 6.0  # mm: a stack of fewer slices than the body's length needs stops short
# the slices that cover 95% of the longest body sample_spec draws (350 mm x body scale 1.12) at that
# spacing: fewer may stop well short of the upper abdomen, though the report describes the whole chest
FULL_COVERAGE_SLICES = math.ceil(0.95 * 350.0 * 1.12 / MAX_SLICE_SPACING)
LOBES: tuple[str, ...] = ("right upper", "right middle", "right lower", "left upper", "left lower")
EFFUSION_SIDES: tuple[str, ...] = ("left", "right", "bilateral")
FINDING_TYPES: tuple[str, ...] = ("nodule", "effusion", "cardiomegaly", "emphysema", "consolidation")
# each finding type switches exactly one CT-RATE label on
FINDING_LABELS: dict[str, str] = {
    "nodule": "Lung nodule",
    "effusion": "Pleural effusion",
    "cardiomegaly": "Cardiomegaly",
    "emphysema": "Emphysema",
    "consolidation": "Consolidation",
}
CARDIOMEGALY_SCALE = 1.32  # in-plane heart axes factor (1.15 along z)
EMPHYSEMA_LUNG_HU = -950.0  # parenchyma of emphysematous lungs (normal: -885 + dependent gradient)
EMPHYSEMA_HOLES = 900  # low-attenuation holes (2-8 mm, a few 9-16 mm bullae)
_Z_BLUR = 0.2  # 3-tap slice profile [w, 1-2w, w] along z
_XY_BLUR = 0.12  # 3-tap in-plane blur (anti-aliasing, noise correlation)

# (name, HU without contrast, HU with IV contrast); the index is the label id
TISSUES: tuple[tuple[str, float, float], ...] = (
    ("air", -1000, -1000),
    ("skin", 25, 25),
    ("fat", -105, -105),
    ("muscle", 45, 55),
    ("mediastinal_fat", -90, -90),
    ("lung_right", -885, -885),
    ("lung_left", -885, -885),
    ("pericardial_fat", -95, -95),
    ("myocardium", 38, 105),
    ("blood_pool", 45, 260),
    ("aorta", 45, 280),
    ("pulmonary_artery", 42, 250),
    ("vein", 42, 170),
    ("airway", -995, -995),
    ("airway_wall", 30, 30),
    ("esophagus", 35, 45),
    ("cortical_bone", 850, 850),
    ("cancellous_bone", 240, 240),
    ("disc", 85, 85),
    ("spinal_canal", 20, 20),
    ("rib", 620, 620),
    ("cartilage", 120, 120),
    ("liver", 60, 110),
    ("spleen", 48, 120),
    ("stomach", 15, 20),
    ("stomach_air", -990, -990),
    ("kidney", 32, 170),
    ("abdomen", -60, -55),
    ("diaphragm", 45, 55),
    ("table_shell", 260, 260),
    ("table_foam", -760, -760),
    ("nodule", 35, 60),
    ("effusion", 12, 14),
    ("consolidation", 32, 60),
    ("atelectasis", -420, -400),
    ("thyroid", 85, 150),
    ("gallbladder", 8, 8),
)
LABEL_IDS: dict[str, int] = {name: i for i, (name, _, _) in enumerate(TISSUES)}
_L = LABEL_IDS
_LUNGS = (_L["lung_right"], _L["lung_left"])


@dataclass
class PhantomSpec:
    """Everything that determines one phantom (JSON-serialisable via ``dataclasses.asdict``).

    ``findings`` entries (optional keys in brackets)::

        {"type": "nodule", "lobe": "right upper", ["size_mm": 10.0]}   # lobe in LOBES, 2..60 mm
        {"type": "effusion", "side": "left" | "right" | "bilateral", ["depth_mm": 45..70]}
        {"type": "cardiomegaly"}                                      # heart axes x1.32 (x1.15 in z)
        {"type": "emphysema"}                                         # darker lungs, holes, bullae
        {"type": "consolidation", "lobe": "left lower"}
    """

    seed: int
    size: int = 128  # in-plane pixels (H = W = size)
    num_slices: int = 96
    slice_spacing: float = 2.5  # mm between slices
    pixel_spacing: float = 2.7  # mm in-plane (field of view = size * pixel_spacing)
    body_scale: float = 1.0  # patient size
    start_level: float = 0.0  # where the scan starts relative to the lung apex (mm, positive = lower)
    table: bool = True
    noise_hu: float = 15.0
    findings: list[dict] = field(default_factory=list)
    contrast: bool = False  # IV contrast (arterial phase): bright blood pool, aorta, enhancing organs

    def validate(self) -> None:
        """Raise :class:`CTFlowError` when the spec cannot be rendered."""
        for name, low, high in (("seed", 0, None), ("size", 16, 1024), ("num_slices", 1, 2048)):
            check_whole(f"phantom {name}", getattr(self, name), low, high)  # 10.7 slices: not 10 silently
        for name in ("slice_spacing", "pixel_spacing", "body_scale", "start_level", "noise_hu"):
            v = getattr(self, name)
            if not (is_number(v) and math.isfinite(v)):
                raise CTFlowError(f"phantom {name} must be a number; got {v!r}")
        for name in ("slice_spacing", "pixel_spacing"):
            if not positive_number(getattr(self, name)):
                raise CTFlowError(f"phantom {name} must be a positive number; got {getattr(self, name)}")
        if not 0.5 <= self.body_scale <= 2.0:
            raise CTFlowError(f"phantom body_scale must be 0.5..2.0; got {self.body_scale}")
        if self.noise_hu < 0:
            raise CTFlowError(f"phantom noise_hu must be >= 0; got {self.noise_hu}")
        for f in self.findings:
            _check_finding(f)


def _check_finding(f: Any) -> None:
    if not isinstance(f, dict) or f.get("type") not in FINDING_TYPES:
        raise CTFlowError(f"unknown phantom finding {f!r}; the type must be {one_of(FINDING_TYPES)}")
    t = f["type"]
    if t in ("nodule", "consolidation") and f.get("lobe") not in LOBES:
        raise CTFlowError(f"{t} lobe must be {one_of(LOBES)}; got {f.get('lobe')!r}")
    for key, kind, default, low, high in (
        ("size_mm", "nodule", 10.0, 2.0, 60.0),
        ("depth_mm", "effusion", 45.0, 10.0, 120.0),
    ):
        if t == kind:
            v = f.get(key, default)
            if not (is_number(v) and low <= v <= high):
                raise CTFlowError(f"{kind} {key} must be a number from {low:g} to {high:g} mm; got {v!r}")
    if t == "effusion" and f.get("side") not in EFFUSION_SIDES:
        raise CTFlowError(f"effusion side must be {one_of(EFFUSION_SIDES)}; got {f.get('side')!r}")


# ----------------------------------------------------------------------------- sampling


def sample_spec(
    seed: int, size: int = 128, num_slices: int | None = None, slice_range=(64, 160)
) -> PhantomSpec:
    """A random but seed-deterministic phantom spec.

    Slice count (when ``num_slices`` is None) is uniform in ``slice_range``; the
    slice spacing is chosen so the stack covers apex-to-upper-abdomen (about
    285-350 mm scaled by body size); about 25% of specs are normal, the others
    carry one or two findings.
    """
    rng = np.random.default_rng([int(seed), 7919])
    lo, hi = int(slice_range[0]), int(slice_range[1])
    if num_slices is None:
        n = int(rng.integers(lo, hi + 1))
    else:
        n = int(num_slices)
    body_scale = round(float(rng.uniform(0.88, 1.12)), 3)
    extent = float(rng.uniform(285.0, 350.0)) * body_scale
    spacing = float(np.clip(round(extent / n * 4.0) / 4.0, 0.5, MAX_SLICE_SPACING))
    start = round(float(rng.uniform(-45.0, -12.0)), 1)
    fov = 310.0 * body_scale * float(rng.uniform(1.1, 1.3))
    pixel_spacing = round(fov / size, 4)
    table = bool(rng.random() < 0.9)
    noise = round(float(rng.uniform(8.0, 24.0)), 1)
    contrast = bool(rng.random() < 0.3)
    findings: list[dict] = []
    if rng.random() >= 0.25:
        k = 1 if rng.random() < 0.65 else 2
        types = rng.choice(len(FINDING_TYPES), size=k, replace=False, p=[0.3, 0.2, 0.2, 0.15, 0.15])
        for ti in sorted(int(t) for t in types):
            t = FINDING_TYPES[ti]
            if t == "nodule":
                findings.append(
                    {
                        "type": "nodule",
                        "lobe": LOBES[int(rng.integers(5))],
                        "size_mm": float(rng.integers(6, 26)),
                    }
                )
            elif t == "effusion":
                findings.append({"type": "effusion", "side": EFFUSION_SIDES[int(rng.integers(3))]})
            elif t == "consolidation":
                findings.append({"type": "consolidation", "lobe": LOBES[int(rng.integers(5))]})
            else:
                findings.append({"type": t})
    return PhantomSpec(
        seed=int(seed),
        size=int(size),
        num_slices=n,
        slice_spacing=spacing,
        pixel_spacing=pixel_spacing,
        body_scale=body_scale,
        start_level=start,
        table=table,
        noise_hu=noise,
        findings=findings,
        contrast=contrast,
    )


def side_twin(spec: PhantomSpec) -> PhantomSpec | None:
    """The same phantom with its one-sided pleural effusion on the other side, or None when it has none.

    Everything else (anatomy, noise, the other findings, and so the report's wording) stays as it is,
    so a pair of twins differs only where the fluid lies and in the words "left" and "right": a data
    set holding both teaches a model to read the side (``ctflow phantoms --side-twins``). A bilateral
    effusion has no twin."""
    other = {"left": "right", "right": "left"}
    if not any(f["type"] == "effusion" and f.get("side") in other for f in spec.findings):
        return None
    findings = [
        {**f, "side": other[f["side"]]} if f["type"] == "effusion" and f.get("side") in other else dict(f)
        for f in spec.findings
    ]
    return replace(spec, findings=findings)


def clear_twin(spec: PhantomSpec, finding: str = "effusion") -> PhantomSpec | None:
    """The same phantom without its ``finding`` (default: the pleural effusion, one-sided or
    bilateral; ``"nodule"``: the lung nodule), or None when it has none.

    The body, its noise and its report's wording stay (each report sentence draws one wording, so only
    the sentences naming the finding change), so a pair differs where the finding (and, for fluid, the
    lung it compressed) lies: a data set holding both shows a model when to leave it out (``ctflow
    phantoms --clear-twins``, ``--nodule-twins``). Each finding draws from the random stream of its
    place in the list, so the findings listed after the removed one (a nodule comes first) may lie
    elsewhere or be shaped differently in the twin."""
    if finding not in FINDING_TYPES:
        raise CTFlowError(f"unknown finding {finding!r}; use {one_of(FINDING_TYPES)}")
    if not any(f["type"] == finding for f in spec.findings):
        return None
    return replace(spec, findings=[dict(f) for f in spec.findings if f["type"] != finding])


# ----------------------------------------------------------------------------- small helpers


def _smoothstep(e0: float, e1: float, x):
    t = np.clip((np.asarray(x, dtype=np.float32) - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _polyline(points, radii, step: float):
    """Dense samples (N, 3) and radii (N,) along a polyline given in anatomy units."""
    p = np.asarray(points, dtype=np.float64)
    r = np.asarray(radii, dtype=np.float64)
    seg = np.diff(p, axis=0)
    lens = np.linalg.norm(seg, axis=1)
    # thick tubes need fewer samples: the union of balls is smooth when step << radius
    st = np.maximum(step, 0.35 * np.minimum(r[:-1], r[1:]))
    n = np.maximum(np.ceil(lens / st).astype(int), 1)
    idx = np.repeat(np.arange(len(seg)), n)
    t = (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)) / np.repeat(n, n)
    pts = p[idx] + seg[idx] * t[:, None]
    rad = r[idx] + (r[idx + 1] - r[idx]) * t
    return np.vstack([pts, p[-1:]]), np.concatenate([rad, r[-1:]])


def _smooth3(a: np.ndarray, axis: int, w: float) -> np.ndarray:
    """3-tap ``[w, 1-2w, w]`` smoothing along ``axis`` of a 3D float32 array (edges replicated)."""
    if a.shape[axis] < 2:
        return a

    def sl(start, stop):
        return tuple(slice(start, stop) if i == axis else slice(None) for i in range(a.ndim))

    out = a * np.float32(1.0 - 2.0 * w)
    tmp = a * np.float32(w)
    out[sl(1, None)] += tmp[sl(None, -1)]
    out[sl(None, -1)] += tmp[sl(1, None)]
    out[sl(0, 1)] += tmp[sl(0, 1)]
    out[sl(-1, None)] += tmp[sl(-1, None)]
    return out


def _gauss_table() -> np.ndarray:
    """256 equiprobable standard-normal quantiles.

    Random bytes looked up here give Gaussian noise several times faster than
    ``Generator.standard_normal``; the in-plane blur applied afterwards makes it continuous.
    """
    from scipy.special import ndtri

    q = ndtri((np.arange(256) + 0.5) / 256.0)
    return (q / q.std()).astype(np.float32)


_GAUSS_Q = _gauss_table()


def _segments(starts, ends, r0, r1, step: float):
    """Dense samples along many independent segments (vectorised)."""
    starts = np.asarray(starts, dtype=np.float64)
    seg = np.asarray(ends, dtype=np.float64) - starts
    lens = np.linalg.norm(seg, axis=1)
    n = np.maximum(np.ceil(lens / step).astype(int), 1) + 1
    idx = np.repeat(np.arange(len(seg)), n)
    t = (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)) / np.repeat(n - 1, n)
    pts = starts[idx] + seg[idx] * t[:, None]
    rad = np.asarray(r0)[idx] + (np.asarray(r1) - np.asarray(r0))[idx] * t
    return pts, rad


# ----------------------------------------------------------------------------- anatomy


class _Anatomy:
    """Seeded anatomical parameters and point-wise predicates (anatomy units)."""

    def __init__(self, spec: PhantomSpec, rng: np.random.Generator):
        u = rng.uniform
        self.a = 152.0 * u(0.95, 1.05)  # lateral half-width of the body
        self.b_ant = 98.0 * u(0.92, 1.08)
        self.b_post = 112.0 * u(0.95, 1.05)
        self.fat = float(np.clip(u(7.0, 15.0) + 25.0 * (spec.body_scale - 1.0), 4.0, 30.0))
        self.muscle = u(10.0, 13.0)
        self.shoulder = u(40.0, 50.0)  # extra upper-chest wall thickness (conical rib cage)
        self.x0 = u(-6.0, 6.0)  # physical lateral offset of the body centre (mm)
        self.y_jit = u(-5.0, 5.0)
        # lungs
        self.kap = 0.02 * u(0.9, 1.1)
        self.zd_r = 203.0 + u(-10.0, 10.0)  # right dome top
        self.zd_l = self.zd_r + 14.0 + u(-4.0, 6.0)
        # heart (normal; cardiomegaly is applied by the renderer)
        self.heart_c = np.array([18.0 + u(-5, 5), -26.0 + u(-4, 4), 162.0 + u(-6, 6)])
        self.heart_ax = np.array([60.0, 45.0, 58.0]) * u(0.94, 1.06)
        self.heart_angle = math.radians(-30.0 + u(-6, 6))
        self.heart_scale = np.array([1.0, 1.0, 1.0])
        # spine and ribs
        self.ys = 52.0 + u(-3, 3)
        self.vert_r = 18.0 * u(0.95, 1.05)
        self.vert_period = 27.0 * u(0.95, 1.05)
        self.vert_phase = u(0.0, 1.0)
        self.rib_period = 25.5 * u(0.95, 1.05)
        self.rib_z0 = -12.0 + u(-4, 4)
        self.rib_drop = 72.0 * u(0.9, 1.1)
        # airway
        self.carina = np.array([0.0, 10.0, 72.0 + u(-6, 6)])

    # --- body
    def radius(self, X, Y):
        """Body outline radius (at scale 1) in the direction of (X, Y)."""
        rho = np.sqrt(X * X + Y * Y) + 1e-6
        c, s = np.abs(X) / rho, Y / rho
        post = s > 0
        p = np.where(post, 3.0, 2.2)
        b = np.where(post, self.b_post, self.b_ant)
        return (np.power(c / self.a, p) + np.power(np.abs(s) / b, p)) ** (-1.0 / p), rho

    def zscale(self, Z):
        Z = np.asarray(Z, dtype=np.float32)
        return 1.0 - 0.07 * _smoothstep(-10.0, -60.0, Z) - 0.04 * _smoothstep(260.0, 360.0, Z)

    def depth(self, X, Y, Z):
        """Radial depth below the skin in mm (negative outside the body)."""
        R, rho = self.radius(X, Y)
        return (self.zscale(Z) * R - rho).astype(np.float32)

    def wall(self, X, Y, Z=None):
        """Thickness of the body wall (skin + fat + muscle) around the thoracic cavity.

        Without ``Z`` the in-plane base thickness; with ``Z`` it adds the shoulder
        girdle muscles that make the upper thoracic cavity conical.
        """
        Xa = np.asarray(X, dtype=np.float32)
        Ya = np.asarray(Y, dtype=np.float32)
        post = np.clip(Ya / 60.0, 0.0, 1.0)
        bump = 34.0 * np.exp(-((Xa / 30.0) ** 2)) * post  # paraspinal muscles
        w = 2.0 + self.fat + self.muscle + 6.0 * post + bump
        if Z is None:
            return w
        return w + self.upper_extra(Xa, Ya) * self.upper_z(Z)

    def upper_extra(self, X, Y):
        rho = np.sqrt(X * X + Y * Y) + 1e-6
        lat = (X / rho) ** 2
        return (self.shoulder * (0.35 + 0.65 * lat)).astype(np.float32)

    def upper_z(self, Z):
        return _smoothstep(150.0, -15.0, Z)

    # --- diaphragm and apex
    def zdia(self, X, Y):
        X = np.asarray(X, dtype=np.float32)
        Y = np.asarray(Y, dtype=np.float32)
        post = np.maximum(Y - 10.0, 0.0)
        zr = self.zd_r + 0.0085 * (X + 50.0) ** 2 + 0.004 * (Y + 5.0) ** 2 + 0.004 * post * post
        zl = self.zd_l + 0.0085 * (X - 55.0) ** 2 + 0.004 * (Y + 5.0) ** 2 + 0.004 * post * post
        w = 1.0 / (1.0 + np.exp(-(X - 5.0) / 12.0))
        return zr * (1.0 - w) + zl * w

    def zapex(self, X, Y):
        X = np.asarray(X, dtype=np.float32)
        Y = np.asarray(Y, dtype=np.float32)
        zr = self.kap * ((X + 55.0) ** 2 + (0.8 * (Y - 18.0)) ** 2)
        zl = 2.0 + self.kap * ((X - 55.0) ** 2 + (0.8 * (Y - 18.0)) ** 2)
        return np.where(X < 5.0, zr, zl)

    # --- heart
    def heart_e2(self, X, Y, grow: float = 0.0, normal: bool = False):
        """In-plane quadratic form of the heart ellipsoid (<= 1 - z-term inside)."""
        sc = np.ones(3) if normal else self.heart_scale
        c = self.heart_c if normal else self.heart_center()
        ax = self.heart_ax * sc + grow
        ca, sa = math.cos(self.heart_angle), math.sin(self.heart_angle)
        dx, dy = X - c[0], Y - c[1]
        uu = (ca * dx + sa * dy) / ax[0]
        vv = (-sa * dx + ca * dy) / ax[1]
        return (uu * uu + vv * vv).astype(np.float32)

    def heart_ez(self, Z, grow: float = 0.0, normal: bool = False):
        sc = np.ones(3) if normal else self.heart_scale
        c = self.heart_c if normal else self.heart_center()
        dz = (np.asarray(Z, dtype=np.float32) - c[2]) / (self.heart_ax[2] * sc[2] + grow)
        return (dz * dz).astype(np.float32)

    def heart_center(self):
        c = self.heart_c.copy()
        grow = self.heart_scale - 1.0
        c[0] += 14.0 * grow[0] / 0.32
        c[2] -= 0.5 * self.heart_ax[2] * grow[2]
        return c

    # --- lungs
    def mediastinum_w(self, X, Y, Z):
        Y = np.asarray(Y, dtype=np.float32)
        upper = np.where(Y < -45.0, 7.0, 13.0)
        lower = np.where(Y < -45.0, 10.0, 20.0)
        h = _smoothstep(70.0, 120.0, Z)
        return upper + (lower - upper) * h

    def lung_code(self, X, Y, Z, D=None, normal_heart: bool = False):
        """0 outside the lungs, 1 right lung, 2 left lung (broadcasting)."""
        X = np.asarray(X, dtype=np.float32)
        Y = np.asarray(Y, dtype=np.float32)
        Z = np.asarray(Z, dtype=np.float32)
        if D is None:
            D = self.depth(X, Y, Z)
        inside = D >= self.wall(X, Y, Z) + 1.5
        inside &= Z >= self.zapex(X, Y)
        inside &= Z < self.zdia(X, Y)
        xm = np.float32(4.0)
        inside &= np.abs(X - xm) >= self.mediastinum_w(X, Y, Z)
        r2 = X * X + (Y - self.ys) ** 2
        inside &= r2 >= (self.vert_r + 7.0) ** 2
        inside &= ~((np.abs(X) < 16.0) & (Y > self.ys))
        e = self.heart_e2(X, Y, grow=4.0, normal=normal_heart) + self.heart_ez(
            Z, grow=4.0, normal=normal_heart
        )
        inside &= e > 1.0
        return np.where(inside, np.where(X < xm, 1, 2), 0).astype(np.uint8)

    def fissure_z(self, X, Y):
        """Z of the oblique (major) fissure: high posteriorly, low anteriorly, curved laterally."""
        X = np.asarray(X, dtype=np.float32)
        Y = np.asarray(Y, dtype=np.float32)
        return 150.0 - 0.95 * Y + 0.004 * (np.abs(X) - 50.0) ** 2

    def lobe_of(self, X, Y, Z, code):
        """Lobe index into LOBES (-1 outside the lungs)."""
        Z = np.asarray(Z, dtype=np.float32)
        lower = Z > self.fissure_z(X, Y)
        right = np.where(lower, 2, np.where(Z > 128.0, 1, 0))
        left = np.where(lower, 4, 3)
        return np.where(code == 1, right, np.where(code == 2, left, -1))


# ----------------------------------------------------------------------------- splatting


class _Grid:
    """Voxel <-> anatomy coordinate maps of one spec."""

    def __init__(self, spec: PhantomSpec, anat: _Anatomy):
        self.S, self.H, self.W = int(spec.num_slices), int(spec.size), int(spec.size)
        self.ds, self.dp, self.bs = (
            float(spec.slice_spacing),
            float(spec.pixel_spacing),
            float(spec.body_scale),
        )
        self.start = float(spec.start_level)
        fov = self.H * self.dp
        span_post = (anat.b_post + 28.0) * self.bs
        span_ant = anat.b_ant * self.bs
        self.y0 = -(span_post - span_ant) / 2.0 + anat.y_jit
        self.y0 = float(np.clip(self.y0, -0.2 * fov, 0.2 * fov))
        self.x0 = anat.x0
        self.z = ((self.start + np.arange(self.S) * self.ds) / self.bs).astype(np.float32)
        self.y = (((np.arange(self.H) - (self.H - 1) / 2.0) * self.dp - self.y0) / self.bs).astype(np.float32)
        self.x = (((np.arange(self.W) - (self.W - 1) / 2.0) * self.dp - self.x0) / self.bs).astype(np.float32)

    def to_voxel(self, pts):
        """Anatomy-unit points (N, 3) as X, Y, Z -> float voxel coordinates (N, 3) as s, h, w."""
        p = np.asarray(pts, dtype=np.float64).reshape(-1, 3)
        s = (p[:, 2] * self.bs - self.start) / self.ds
        h = (p[:, 1] * self.bs + self.y0) / self.dp + (self.H - 1) / 2.0
        w = (p[:, 0] * self.bs + self.x0) / self.dp + (self.W - 1) / 2.0
        return np.stack([s, h, w], axis=1)

    def k_range(self, z0: float, z1: float):
        """Slice index range [k0, k1) whose Z lies in [z0, z1] (anatomy units)."""
        k0 = int(np.searchsorted(self.z, z0, side="left"))
        k1 = int(np.searchsorted(self.z, z1, side="right"))
        return k0, k1

    def splat(self, pts, radii_anat, min_frac: float = 0.0, partial: bool = False):
        """Flat voxel indices and coverage fractions of balls around anatomy-unit points.

        ``partial`` scales the fraction of structures thinner than a pixel by their
        diameter / pixel (partial-volume dimming of small vessels at coarse pixels).
        """
        if len(pts) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        vox = self.to_voxel(pts)
        r_mm = np.asarray(radii_anat, dtype=np.float64) * self.bs
        sp = np.array([self.ds, self.dp, self.dp])
        reach = (r_mm[:, None] + self.dp) / sp[None, :] + 1.0
        shp = np.array([self.S, self.H, self.W])
        vis = np.all((vox > -reach) & (vox < shp[None, :] - 1 + reach), axis=1)
        if not vis.all():
            vox, r_mm = vox[vis], r_mm[vis]
            if len(vox) == 0:
                return np.zeros(0, np.int64), np.zeros(0, np.float32)
        pix = np.float32(self.dp)
        S, H, W = self.S, self.H, self.W
        shp = np.array([S, H, W])
        # radius classes ~15% wide; each class uses the stencil of its largest radius
        rq = np.floor(np.log(np.maximum(r_mm, 0.25) / 0.25) / np.log(1.15))
        centre = np.rint(vox).astype(np.int64)
        rem = ((vox - centre) * sp).astype(np.float32)  # mm offset of each point from its voxel centre
        r32 = r_mm.astype(np.float32)
        base = (centre[:, 0] * H + centre[:, 1]) * W + centre[:, 2]
        order = np.argsort(rq, kind="stable")
        bins, first = np.unique(rq[order], return_index=True)
        bounds = list(first) + [len(order)]
        idx_all, frac_all = [], []
        for bi in range(len(bins)):
            sel = order[bounds[bi] : bounds[bi + 1]]
            rb = float(r_mm[sel].max())
            ext = np.ceil((rb + 0.5 * self.dp) / sp + 0.5).astype(int)
            gs, gh, gw = np.meshgrid(
                np.arange(-ext[0], ext[0] + 1),
                np.arange(-ext[1], ext[1] + 1),
                np.arange(-ext[2], ext[2] + 1),
                indexing="ij",
            )
            off = np.stack([gs.ravel(), gh.ravel(), gw.ravel()], axis=1)
            offmm = off * sp
            keep = np.linalg.norm(offmm, axis=1) <= rb + 0.5 * self.dp + np.linalg.norm(sp) * 0.5
            off, offmm = off[keep], offmm[keep].astype(np.float32)
            off_flat = (off[:, 0] * H + off[:, 1]) * W + off[:, 2]
            rs = rem[sel]
            d2 = (offmm * offmm).sum(1)[None, :] - 2.0 * (rs @ offmm.T) + (rs * rs).sum(1)[:, None]
            np.maximum(d2, 0.0, out=d2)
            frac = (r32[sel][:, None] - np.sqrt(d2)) / pix + np.float32(0.5)
            np.clip(frac, 0.0, 1.0, out=frac)
            if partial:
                frac *= np.minimum(np.float32(1.0), 2.0 * r32[sel][:, None] / pix)
            c = centre[sel]
            inner = np.all((c - ext >= 0) & (c + ext < shp), axis=1)
            if inner.any():
                fi = frac[inner]
                ii = base[sel][inner][:, None] + off_flat[None, :]
                m = fi > min_frac
                idx_all.append(ii[m])
                frac_all.append(fi[m])
            if not inner.all():
                fo = frac[~inner]
                vv = c[~inner][:, None, :] + off[None, :, :]
                ok = (fo > min_frac) & np.all((vv >= 0) & (vv < shp), axis=2)
                vv = vv[ok]
                idx_all.append((vv[:, 0] * H + vv[:, 1]) * W + vv[:, 2])
                frac_all.append(fo[ok])
        return np.concatenate(idx_all), np.concatenate(frac_all).astype(np.float32)

    def dedupe(self, idx, frac):
        """Unique voxel indices of a splat, keeping the largest fraction of each voxel."""
        if len(idx) == 0:
            return idx, frac
        buf = np.zeros(self.S * self.H * self.W, np.float32)
        np.maximum.at(buf, idx, frac)
        u = np.flatnonzero(buf)
        return u, buf[u]


# ----------------------------------------------------------------------------- vessel tree


def _vessel_tree(anat: _Anatomy, rng: np.random.Generator):
    """Segments (starts, ends, r0, r1) of a pulmonary vessel tree grown in the normal lungs."""
    roots_dir = np.array(
        [
            [-0.25, 0.15, -1.0],
            [-0.35, -0.7, -0.65],
            [-1.0, 0.05, -0.1],
            [-0.45, -1.0, 0.25],
            [-0.35, 0.95, 0.0],
            [-0.3, 0.25, 1.0],
            [-0.3, 0.85, 0.75],
            [-0.45, -0.55, 0.9],
            [-0.8, 0.3, 0.5],
            [-0.8, -0.4, -0.4],
            [-0.7, 0.6, -0.5],
            [-0.2, -0.2, 1.0],
            [-0.9, -0.3, 0.7],
        ]
    )
    starts, dirs, side = [], [], []
    for sd, hil in ((1, np.array([-46.0, 8.0, 104.0])), (2, np.array([50.0, 10.0, 100.0]))):
        d = roots_dir.copy()
        if sd == 2:
            d[:, 0] *= -1
        d = d + rng.normal(0, 0.12, d.shape)
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        starts.append(np.repeat(hil[None], len(d), 0) + d * 8.0)
        dirs.append(d)
        side += [sd] * len(d)
    starts = np.concatenate(starts)
    dirs = np.concatenate(dirs)
    side = np.array(side)
    hilum = np.where(side[:, None] == 1, np.array([-46.0, 8.0, 104.0]), np.array([50.0, 10.0, 100.0]))
    lens = rng.uniform(26.0, 34.0, len(starts))
    radii = rng.uniform(4.2, 5.2, len(starts))
    out_s, out_e, out_r0, out_r1 = [], [], [], []
    for _gen in range(9):
        if len(starts) == 0:
            break
        ends = starts + dirs * lens[:, None]
        code = anat.lung_code(ends[:, 0], ends[:, 1], ends[:, 2], normal_heart=True)
        ok = code == side
        half = starts + dirs * (0.5 * lens)[:, None]
        code2 = anat.lung_code(half[:, 0], half[:, 1], half[:, 2], normal_heart=True)
        ok2 = (~ok) & (code2 == side)
        ends = np.where(ok[:, None], ends, half)
        keep = ok | ok2
        r_end = radii * 0.85
        out_s.append(starts[keep])
        out_e.append(ends[keep])
        out_r0.append(radii[keep])
        out_r1.append(r_end[keep])
        grow = ok & (radii > 0.6)
        if not grow.any():
            break
        ps, pd, ph, psd = ends[grow], dirs[grow], hilum[grow], side[grow]
        pr, pl = r_end[grow], lens[grow]
        n = len(ps)
        # a random unit vector perpendicular to each parent direction
        rnd = rng.normal(size=(n, 3))
        perp = rnd - (rnd * pd).sum(1, keepdims=True) * pd
        perp /= np.linalg.norm(perp, axis=1, keepdims=True) + 1e-9
        a1 = rng.uniform(0.3, 0.65, n)[:, None]
        a2 = rng.uniform(0.3, 0.65, n)[:, None]
        outward = ps - ph
        outward /= np.linalg.norm(outward, axis=1, keepdims=True) + 1e-9
        c1 = pd * np.cos(a1) + perp * np.sin(a1) + 0.2 * outward
        c2 = pd * np.cos(a2) - perp * np.sin(a2) + 0.2 * outward
        cd = np.concatenate([c1, c2])
        cd /= np.linalg.norm(cd, axis=1, keepdims=True)
        starts = np.concatenate([ps, ps])
        dirs = cd
        side = np.concatenate([psd, psd])
        hilum = np.concatenate([ph, ph])
        lens = np.concatenate([pl, pl]) * rng.uniform(0.7, 0.85, 2 * n)
        radii = np.concatenate([pr, pr]) * rng.uniform(0.8, 0.92, 2 * n)
    if not out_s:
        z = np.zeros((0, 3))
        return z, z, np.zeros(0), np.zeros(0)
    return np.concatenate(out_s), np.concatenate(out_e), np.concatenate(out_r0), np.concatenate(out_r1)


# ----------------------------------------------------------------------------- rendering


@dataclass
class PhantomRender:
    """A rendered phantom: the HU volume, its ground truth and the tissue-label map."""

    volume: Volume
    ground_truth: dict
    labels: np.ndarray  # (S, H, W) uint8 ids into TISSUES / LABEL_IDS


def make_phantom(spec: PhantomSpec) -> tuple[Volume, dict]:
    """Render ``spec``: the HU volume (int16, canonical orientation) and its ground truth."""
    r = render_phantom(spec)
    return r.volume, r.ground_truth


def finding_extents(ground_truth: dict) -> list[dict]:
    """Where each visible, localized finding lies along the slice axis: ``[{"type", "first", "last"}]``
    (slice indices, inclusive), from a phantom's ground truth (``make_phantom``, or the ``.json`` beside
    each volume that ``ctflow phantoms`` writes). Effusions and consolidations carry their slice range,
    a nodule its centre and radius, an enlarged heart its centre and z semi-axis; emphysema fills the
    lungs and has none."""
    num_slices = int(ground_truth["num_slices"])
    z_spacing = float(ground_truth["spacing"][0])
    out = []
    for f in ground_truth.get("findings", []):
        if not f.get("visible"):
            continue
        if "slice_range" in f:
            first, last = f["slice_range"]
        elif f["type"] == "nodule" and "center_voxel" in f:
            first, last = (f["center_voxel"][0] + d * f["radius_voxel"][0] for d in (-1, 1))
        elif f["type"] == "cardiomegaly" and "heart_center_voxel" in f:
            half = f["heart_axes_mm"][2] / z_spacing
            first, last = (f["heart_center_voxel"][0] + d * half for d in (-1, 1))
        else:
            continue
        first, last = max(0, int(np.floor(first))), min(num_slices - 1, int(np.ceil(last)))
        if first <= last:
            out.append({"type": f["type"], "first": first, "last": last})
    return out


# tissues that show a finding in the label map: the lesion itself (an effusion also compresses the lung
# beside it into atelectasis) and, for cardiomegaly, the enlarged heart
FINDING_TISSUES: dict[str, tuple[str, ...]] = {
    "nodule": ("nodule",),
    "effusion": ("effusion", "atelectasis"),
    "consolidation": ("consolidation",),
    "cardiomegaly": ("myocardium", "blood_pool"),
}


def finding_mask(ground_truth: dict) -> np.ndarray:
    """Where a phantom's visible, localized findings lie: a boolean (S, H, W) map of the voxels of
    their tissues (``FINDING_TISSUES``; emphysema fills the lungs and is left out). It renders the
    phantom again from the spec in its ground truth (``make_phantom``, or the ``.json`` beside each
    volume that ``ctflow phantoms`` writes), which gives the same volume, voxel for voxel."""
    types = {f["type"] for f in ground_truth.get("findings", []) if f.get("visible")}
    tissues = [LABEL_IDS[t] for kind in sorted(types & FINDING_TISSUES.keys()) for t in FINDING_TISSUES[kind]]
    shape = tuple(int(n) for n in ground_truth["shape"])
    if not tissues:
        return np.zeros(shape, dtype=bool)
    labels = render_phantom(PhantomSpec(**ground_truth["spec"])).labels
    if labels.shape != shape:
        raise CTFlowError(f"phantom spec renders {labels.shape}, its ground truth says {shape}")
    return np.isin(labels, tissues)


def render_phantom(spec: PhantomSpec) -> PhantomRender:
    """Like :func:`make_phantom`, also returning the tissue-label map."""
    spec.validate()
    return _Renderer(spec).run()


class _Renderer:
    def __init__(self, spec: PhantomSpec):
        self.spec = spec
        ss = np.random.SeedSequence(int(spec.seed))
        # independent streams: a finding never changes the anatomy, the vessels or the noise
        s_anat, s_vessel, s_find, s_noise, _reserved = ss.spawn(5)
        self.rng_anat = np.random.default_rng(s_anat)
        self.rng_vessel = np.random.default_rng(s_vessel)
        self.find_ss = s_find
        self.rng_noise = np.random.default_rng(s_noise)
        self.anat = _Anatomy(spec, self.rng_anat)
        if any(f["type"] == "cardiomegaly" for f in spec.findings):
            self.anat.heart_scale = np.array([CARDIOMEGALY_SCALE, CARDIOMEGALY_SCALE, 1.15])
        self.g = _Grid(spec, self.anat)
        self.step = 0.5 * min(self.g.ds, self.g.dp) / self.g.bs  # anatomy units
        self.step = float(np.clip(self.step, 0.4, 2.0))

    # --- painting helpers
    def _paint(self, sl, mask, label):
        view = self.lab[sl]
        np.copyto(view, np.uint8(label), where=mask)

    def _paint_tube(self, pts, radii, label, where_labels=None, fat_margin: float = 0.0):
        p, r = _polyline(pts, radii, self.step)
        if fat_margin > 0:
            idx, frac = self.g.splat(p, r + fat_margin, min_frac=0.5)
            idx = idx[np.isin(self.lab.flat[idx], _LUNGS)]
            self.lab.flat[idx] = _L["mediastinal_fat"]
        idx, frac = self.g.splat(p, r, min_frac=0.5)
        if where_labels is not None:
            idx = idx[np.isin(self.lab.flat[idx], where_labels)]
        self.lab.flat[idx] = label

    def _ellipsoid(self, c, ax, angle: float = 0.0, z_extra: float = 0.0):
        """(slices, mask) of an ellipsoid (rotated in-plane by ``angle``); None when out of view."""
        g = self.g
        k0, k1 = g.k_range(c[2] - ax[2] - z_extra, c[2] + ax[2] + z_extra)
        if k1 <= k0:
            return None
        ca, sa = math.cos(angle), math.sin(angle)
        dx = g.x[None, :] - c[0]
        dy = g.y[:, None] - c[1]
        e2 = ((ca * dx + sa * dy) / ax[0]) ** 2 + ((-sa * dx + ca * dy) / ax[1]) ** 2
        inside2 = e2 <= 1.0
        rows = np.nonzero(inside2.any(1))[0]
        cols = np.nonzero(inside2.any(0))[0]
        if len(rows) == 0:
            return None
        h0, h1, w0, w1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        ez = ((g.z[k0:k1] - c[2]) / ax[2]) ** 2
        mask = e2[None, h0:h1, w0:w1] + ez[:, None, None] <= 1.0
        return (slice(k0, k1), slice(h0, h1), slice(w0, w1)), mask

    # --- main
    def run(self) -> PhantomRender:
        spec, g, A = self.spec, self.g, self.anat
        S, H, W = g.S, g.H, g.W
        X3 = g.x[None, None, :]
        Y3 = g.y[None, :, None]
        Z3 = g.z[:, None, None]
        X2 = g.x[None, :]
        Y2 = g.y[:, None]
        self.lab = lab = np.zeros((S, H, W), np.uint8)

        # body wall layers by radial depth below the skin
        R2, _ = A.radius(X2, Y2)
        rho2 = np.sqrt(X2 * X2 + Y2 * Y2)
        D = (A.zscale(g.z)[:, None, None] * R2[None].astype(np.float32) - rho2[None]).astype(np.float32)
        self.D = D
        wall3 = A.wall(X2, Y2)[None] + A.upper_extra(X2, Y2)[None] * A.upper_z(g.z)[:, None, None]
        wall3 = wall3.astype(np.float32)
        np.copyto(lab, np.uint8(_L["skin"]), where=D >= 0)
        np.copyto(lab, np.uint8(_L["fat"]), where=D >= 2.0)
        np.copyto(lab, np.uint8(_L["muscle"]), where=D >= 2.0 + A.fat)
        cavity = D >= wall3
        # thoracic inlet: muscles around the apices, fat in the mediastinum
        np.copyto(lab, np.uint8(_L["mediastinal_fat"]), where=cavity)
        k_in = g.k_range(-1e9, 25.0)[1]
        if k_in > 0:
            cen = ((X2 - 4.0) / 26.0) ** 2 + ((Y2 - 8.0) / 48.0) ** 2 < 1.0
            m = cavity[:k_in] & ~cen[None]
            lab[:k_in][m] = _L["muscle"]

        # abdomen below the diaphragm
        zd2 = A.zdia(X2, Y2).astype(np.float32)
        below = cavity & (Z3 >= zd2[None])
        np.copyto(lab, np.uint8(_L["abdomen"]), where=below)
        diaph = cavity & (Z3 >= zd2[None] - 1.0) & (Z3 < zd2[None] + 4.0)
        self._abdomen(below)
        np.copyto(lab, np.uint8(_L["diaphragm"]), where=diaph & (lab != _L["liver"]))

        # lungs
        code = A.lung_code(X3, Y3, Z3, D=D)
        np.copyto(lab, np.uint8(_L["lung_right"]), where=code == 1)
        np.copyto(lab, np.uint8(_L["lung_left"]), where=code == 2)
        self.code = code

        # heart with pericardial fat
        self._heart()
        # mediastinal tubes
        self._mediastinum()
        # bones
        self._spine()
        self._ribs_sternum(D, wall3)
        self._scapulae(D, A.wall(X2, Y2).astype(np.float32)[None])
        if spec.table:
            self._table(D)

        # findings (labels), vessels, emphysema
        findings_gt = self._findings()

        hu = self._to_hu(findings_gt)
        gt = self._ground_truth(findings_gt)
        hu = np.rint(hu, out=hu)
        np.clip(hu, -1024, 3071, out=hu)
        arr = hu.astype(np.int16)
        origin = ((W - 1) / 2.0 * g.dp, (H - 1) / 2.0 * g.dp, -g.start)
        vol = Volume(
            arr,
            spacing=(g.ds, g.dp, g.dp),
            affine=canonical_affine((g.ds, g.dp, g.dp), origin),
            metadata={"synthetic": True, "source": "ctflow.phantom", "seed": int(spec.seed)},
        )
        return PhantomRender(volume=vol, ground_truth=gt, labels=lab)

    # --- organs
    def _abdomen(self, below):
        g, A, lab = self.g, self.anat, self.lab
        X2, Y2 = g.x[None, :], g.y[:, None]
        Z3 = g.z[:, None, None]
        # liver: right upper quadrant, left lobe anterior across the midline
        xl = np.clip(28.0 - 0.55 * (Y2 + 30.0), -20.0, 60.0)
        zbot = 300.0 - 0.45 * X2
        liver = below & (X2 < xl)[None] & (Z3 < zbot[None])
        liver &= ~((np.abs(X2) < 26.0) & (Y2 > A.ys - 30.0))[None]
        lab[liver] = _L["liver"]
        zl = A.zd_l
        # stomach (air rises anteriorly in a supine patient), spleen, kidneys, gallbladder
        c = np.array([58.0, -18.0, zl + 48.0])
        e = self._ellipsoid(c, np.array([42.0, 40.0, 48.0]), angle=0.4)
        if e is not None:
            sl, m = e
            m &= below[sl]
            self._paint(sl, m, _L["stomach"])
            air = m & (g.y[sl[1]][None, :, None] < c[1] - 18.0)
            self._paint(sl, air, _L["stomach_air"])
        for c, ax, ang, lb in (
            (np.array([92.0, 42.0, zl + 55.0]), np.array([26.0, 52.0, 55.0]), -0.6, "spleen"),
            (np.array([-56.0, 58.0, A.zd_r + 118.0]), np.array([24.0, 30.0, 55.0]), 0.45, "kidney"),
            (np.array([58.0, 58.0, zl + 100.0]), np.array([24.0, 30.0, 55.0]), -0.45, "kidney"),
            (np.array([-52.0, -42.0, A.zd_r + 85.0]), np.array([14.0, 18.0, 30.0]), 0.3, "gallbladder"),
        ):
            e = self._ellipsoid(c, ax, angle=ang)
            if e is not None:
                sl, m = e
                self._paint(sl, m & below[sl], _L[lb])

    def _heart(self):
        A, lab = self.anat, self.lab
        c = A.heart_center()
        ax = A.heart_ax * A.heart_scale
        zd = A.zdia
        for grow, lb in ((5.0, "pericardial_fat"), (0.0, "myocardium")):
            e = self._ellipsoid(c, ax + grow, angle=A.heart_angle)
            if e is None:
                return
            sl, m = e
            g = self.g
            zlim = zd(g.x[None, sl[2]], g.y[sl[1], None])[None] + 3.0
            m &= g.z[sl[0], None, None] < zlim
            m &= self.D[sl] >= A.wall(g.x[None, sl[2]], g.y[sl[1], None])[None] - 2.0
            self._paint(sl, m, _L[lb])
        # chambers and septum
        e = self._ellipsoid(c, ax * np.array([0.72, 0.68, 0.75]), angle=A.heart_angle)
        if e is not None:
            sl, m = e
            g = self.g
            ca, sa = math.cos(A.heart_angle), math.sin(A.heart_angle)
            dx = g.x[None, sl[2]] - c[0]
            dy = g.y[sl[1], None] - c[1]
            vv = -sa * dx + ca * dy
            sept = np.abs(vv - 4.0) < 3.5
            m &= ~sept[None]
            m &= lab[sl] == _L["myocardium"]
            self._paint(sl, m, _L["blood_pool"])

    def _mediastinum(self):
        A, c = self.anat, self.anat.carina
        ys = A.ys
        # great vessels
        hz = A.heart_center()[2]
        aorta = [
            [-4.0, -22.0, hz - 22.0],
            [-16.0, -28.0, 100.0],
            [-15.0, -20.0, 64.0],
            [-4.0, 2.0, 52.0],
            [14.0, 22.0, 56.0],
            [26.0, ys - 14.0, 70.0],
            [27.0, ys - 14.0, 110.0],
            [22.0, ys - 18.0, 200.0],
            [10.0, ys - 26.0, 270.0],
            [6.0, ys - 28.0, 500.0],
        ]
        ar = [15.0, 15.5, 14.5, 13.0, 12.5, 12.0, 12.0, 11.5, 11.0, 10.0]
        self._paint_tube(aorta, ar, _L["aorta"], fat_margin=2.5)
        # supra-aortic arteries
        for p in ([-12.0, -14.0, 58.0], [0.0, -4.0, 52.0], [14.0, 6.0, 54.0]):
            self._paint_tube(
                [p, [p[0] * 1.8, p[1] - 4.0, -20.0], [p[0] * 2.2, p[1] - 6.0, -200.0]],
                [5.5, 5.0, 5.0],
                _L["aorta"],
            )
        # pulmonary trunk and arteries
        pa = [[14.0, -40.0, hz - 25.0], [18.0, -26.0, 98.0], [14.0, -10.0, 88.0]]
        self._paint_tube(pa, [13.0, 13.0, 12.0], _L["pulmonary_artery"], fat_margin=3.0)
        self._paint_tube(
            [[14.0, -10.0, 88.0], [38.0, 4.0, 84.0], [50.0, 12.0, 96.0]],
            [11.0, 10.0, 8.0],
            _L["pulmonary_artery"],
        )
        self._paint_tube(
            [[14.0, -10.0, 88.0], [-18.0, -4.0, 94.0], [-44.0, 4.0, 104.0]],
            [11.0, 10.0, 8.0],
            _L["pulmonary_artery"],
        )
        # veins: SVC and IVC, brachiocephalic veins
        self._paint_tube(
            [[-34.0, -14.0, -200.0], [-34.0, -14.0, 40.0], [-30.0, -14.0, 120.0]],
            [8.5, 9.5, 10.0],
            _L["vein"],
            fat_margin=3.0,
        )
        self._paint_tube(
            [[-34.0, -14.0, 40.0], [10.0, -28.0, 30.0], [48.0, -24.0, 20.0], [80.0, -10.0, -40.0]],
            [6.5, 6.5, 6.0, 6.0],
            _L["vein"],
        )
        self._paint_tube([[-20.0, 12.0, A.zd_r - 5.0], [-20.0, 20.0, 500.0]], [11.0, 11.0], _L["vein"])
        # esophagus
        self._paint_tube(
            [
                [2.0, ys - 28.0, -200.0],
                [6.0, ys - 26.0, 120.0],
                [14.0, ys - 32.0, 210.0],
                [40.0, -10.0, A.zd_l + 40.0],
            ],
            [8.0, 8.0, 8.0, 8.0],
            _L["esophagus"],
        )
        # airways: trachea + main bronchi (wall then lumen)
        top = [0.0, -14.0, -200.0]
        tr = [top, [0.0, -6.0, 0.0], list(c)]
        rb = [list(c), [-26.0, c[1] + 4.0, c[2] + 18.0], [-44.0, c[1] + 6.0, c[2] + 34.0]]
        lb = [list(c), [30.0, c[1] + 6.0, c[2] + 14.0], [50.0, c[1] + 8.0, c[2] + 30.0]]
        for lumen, extra in ((False, 2.0), (True, 0.0)):
            lbl = _L["airway"] if lumen else _L["airway_wall"]
            self._paint_tube(tr, [8.5 + extra] * 3, lbl)
            self._paint_tube(rb, [6.5 + extra, 6.0 + extra, 4.5 + extra], lbl)
            self._paint_tube(lb, [6.0 + extra, 5.5 + extra, 4.5 + extra], lbl)
        # thyroid
        for sx in (-1.0, 1.0):
            e = self._ellipsoid(np.array([16.0 * sx, -20.0, -45.0]), np.array([10.0, 12.0, 24.0]))
            if e is not None:
                sl, m = e
                self._paint(sl, m & (self.D[sl] > 20.0), _L["thyroid"])

    def _spine(self):
        g, A, lab = self.g, self.anat, self.lab
        X2, Y2 = g.x[None, :], g.y[:, None]
        cols = np.nonzero(np.abs(g.x) < 46.0)[0]
        rows = np.nonzero((g.y > A.ys - A.vert_r - 10.0) & (g.y < A.ys + 75.0))[0]
        if len(cols) == 0 or len(rows) == 0:
            return
        sl2 = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        x, y = X2[:, sl2[1]], Y2[sl2[0], :]
        rb = A.vert_r
        r2 = x * x + ((y - A.ys) * 1.12) ** 2
        body = r2 <= rb * rb
        cortex = body & (r2 > (rb - 2.6) ** 2)
        cy = A.ys + rb / 1.12 + 9.0
        rc2 = x * x + (y - cy) ** 2
        canal = rc2 <= 8.0**2
        arch = (rc2 > 8.0**2) & (rc2 <= 13.5**2) & (y > cy - 4.0)
        pedicle = (np.abs(x) > 7.0) & (np.abs(x) < 12.5) & (y > A.ys) & (y < cy)
        spinous = (np.abs(x) < 3.0) & (y > cy + 10.0) & (y < cy + 30.0)
        transverse = (
            (np.abs(y - cy + 2.0 - 0.45 * (np.abs(x) - 10.0)) < 3.5) & (np.abs(x) > 10.0) & (np.abs(x) < 32.0)
        )
        post_el = arch | pedicle | spinous | transverse
        phase = ((g.z - A.vert_phase * A.vert_period) / A.vert_period) % 1.0
        disc = phase < 0.2
        endplate = (phase >= 0.2) & (phase < 0.26) | (phase >= 0.95)
        post_on = (phase > 0.3) & (phase < 0.9)
        v = lab[:, sl2[0], sl2[1]]
        # a soft-tissue margin so lungs do not touch bone directly
        margin = (r2 <= (rb + 3.0) ** 2) & ~body
        np.copyto(v, np.uint8(_L["muscle"]), where=margin[None] & np.isin(v, _LUNGS))
        np.copyto(v, np.uint8(_L["cancellous_bone"]), where=body[None] & ~disc[:, None, None])
        np.copyto(
            v,
            np.uint8(_L["cortical_bone"]),
            where=body[None] & (cortex[None] | endplate[:, None, None]) & ~disc[:, None, None],
        )
        np.copyto(v, np.uint8(_L["disc"]), where=body[None] & disc[:, None, None])
        np.copyto(
            v,
            np.uint8(_L["cortical_bone"]),
            where=post_el[None] & post_on[:, None, None] & (self.D[:, sl2[0], sl2[1]] > 6.0),
        )
        np.copyto(v, np.uint8(_L["spinal_canal"]), where=canal[None])

    def _ribs_sternum(self, D, wall3):
        g, A, lab = self.g, self.anat, self.lab
        X2, Y2 = g.x[None, :], g.y[:, None]
        band = (D >= wall3 - 10.0) & (D < wall3 - 1.0)
        band &= (np.abs(X2) > 16.0)[None]
        ks, hs, ws = np.nonzero(band)
        x, y, z = g.x[ws], g.y[hs], g.z[ks]
        phi = np.arctan2(np.abs(x), y)  # 0 posterior, pi anterior
        drop = A.rib_drop * (1.0 - np.cos(phi)) / 2.0
        u = (z - A.rib_z0 - drop) / A.rib_period
        k = np.floor(u)
        frac = u - k
        is_rib = (frac < 0.36) & (k >= 0) & (k <= 11) & ~((k >= 10) & (phi > 1.7))
        cart = phi > 2.45
        sel = is_rib & ~cart
        lab[ks[sel], hs[sel], ws[sel]] = _L["rib"]
        sel = is_rib & cart & (k <= 7)
        lab[ks[sel], hs[sel], ws[sel]] = _L["cartilage"]
        # sternum
        k0, k1 = g.k_range(12.0, 196.0)
        if k1 > k0:
            zz = g.z[k0:k1]
            half = np.where(zz < 55.0, 24.0, 14.0)[:, None, None]
            m = (np.abs(X2)[None] < half) & (Y2 < 0)[None]
            w3 = wall3[k0:k1]
            m &= (D[k0:k1] >= w3 - 12.0) & (D[k0:k1] < w3 - 1.0)
            inner = m & (D[k0:k1] >= w3 - 9.5) & (D[k0:k1] < w3 - 3.5) & (np.abs(X2)[None] < half - 2.5)
            self._paint((slice(k0, k1), slice(None), slice(None)), m, _L["cortical_bone"])
            self._paint((slice(k0, k1), slice(None), slice(None)), inner, _L["cancellous_bone"])

    def _scapulae(self, D, wall2):
        g, A = self.g, self.anat
        k0, k1 = g.k_range(-30.0, 125.0)
        if k1 <= k0:
            return
        X2, Y2 = g.x[None, :], g.y[:, None]
        zz = g.z[k0:k1]
        for sx in (-1.0, 1.0):
            p0 = np.array([132.0 * sx, 38.0])  # lateral (glenoid side)
            p1 = np.array([58.0 * sx, A.b_post - 14.0])  # medial border
            d = p1 - p0
            L2 = float(d @ d)
            t = ((X2 - p0[0]) * d[0] + (Y2 - p0[1]) * d[1]) / L2
            tc = np.clip(t, 0.0, 1.0)
            dist = np.sqrt((X2 - p0[0] - tc * d[0]) ** 2 + (Y2 - p0[1] - tc * d[1]) ** 2)
            plate = (dist < 3.2) & (t >= 0.0) & (t <= 1.0)
            # triangular: shorter medial extent towards the inferior angle
            tmax = 1.0 - 0.55 * _smoothstep(10.0, 125.0, zz)
            m = plate[None] & (t[None] <= tmax[:, None, None])
            m &= (D[k0:k1] > 4.0 + A.fat) & (D[k0:k1] < wall2[0] + 2.0)
            self._paint((slice(k0, k1), slice(None), slice(None)), m, _L["cortical_bone"])

    def _table(self, D):
        g, A = self.g, self.anat
        X2, Y2 = g.x[None, :], g.y[:, None]
        top = A.b_post + 2.0 - 0.0012 * X2 * X2
        within = np.abs(X2) < 165.0
        shell1 = within & (Y2 >= top) & (Y2 < top + 3.0)
        foam = within & (Y2 >= top + 3.0) & (Y2 < top + 19.0)
        shell2 = within & (Y2 >= top + 19.0) & (Y2 < top + 22.0)
        out = D < -0.5
        for m2, lb in ((shell1, "table_shell"), (foam, "table_foam"), (shell2, "table_shell")):
            self._paint((slice(None), slice(None), slice(None)), m2[None] & out, _L[lb])

    # --- findings
    def _in_view_z(self, margin: float):
        g = self.g
        return float(g.z[0] + margin), float(g.z[-1] - margin)

    def _effusion_y(self, X, Z, side_code, depth):
        """Anterior boundary (Y) of a dependent effusion: a meniscus rising along the lateral wall."""
        A = self.anat
        zdome = A.zd_r if side_code == 1 else A.zd_l
        t = np.clip((np.asarray(Z, dtype=np.float32) - 105.0) / (zdome + 30.0 - 105.0), 0.0, 1.0)
        xc = -60.0 if side_code == 1 else 64.0
        lat = np.clip(np.abs(np.asarray(X, dtype=np.float32) - xc) - 15.0, 0.0, None)
        return (A.b_post - 22.0) - depth * t**0.6 - 0.006 * lat * lat * t**0.5

    def _sample_in_lobe(self, rng, lobe: str, margin: float, prefer):
        """A point well inside ``lobe`` and inside the scanned range (anatomy units)."""
        A = self.anat
        li = LOBES.index(lobe)
        sd = 1 if lobe.startswith("right") else 2
        zlo, zhi = self._in_view_z(margin)
        for _attempt in range(3):
            P = np.column_stack(
                [rng.uniform(-140, 140, 4000), rng.uniform(-90, 95, 4000), rng.uniform(-5, 280, 4000)]
            )
            code = A.lung_code(P[:, 0], P[:, 1], P[:, 2])
            ok = (code == sd) & (A.lobe_of(P[:, 0], P[:, 1], P[:, 2], code) == li)
            for ax in range(3):
                for sgn in (-1.0, 1.0):
                    Q = P.copy()
                    Q[:, ax] += sgn * margin
                    cq = A.lung_code(Q[:, 0], Q[:, 1], Q[:, 2])
                    ok &= (cq == sd) & (A.lobe_of(Q[:, 0], Q[:, 1], Q[:, 2], cq) == li)
            for eff in self._effusions:
                if eff["code"] == sd:
                    ok &= P[:, 1] < self._effusion_y(P[:, 0], P[:, 2], sd, eff["depth"]) - margin - 4.0
            in_z = (P[:, 2] >= zlo) & (P[:, 2] <= zhi)
            for cond in (ok & in_z & prefer(P), ok & in_z, ok):
                hits = np.nonzero(cond)[0]
                if len(hits):
                    return P[hits[0]], bool(in_z[hits[0]])
            margin *= 0.6
        return None, False

    def _findings(self):
        spec, g, lab = self.spec, self.g, self.lab
        rngs = [np.random.default_rng(s) for s in self.find_ss.spawn(max(len(spec.findings), 1))]
        out = []
        self._effusions = []
        self._emphysema = None
        self._consolidations = []
        # effusions first: they define where nodules cannot sit
        for i, f in enumerate(spec.findings):
            if f["type"] != "effusion":
                continue
            drawn = rngs[i].uniform(45.0, 70.0)  # drawn either way: the finding's stream stays the same
            # the fluid is drawn in body-scaled units (the ground truth multiplies by body_scale): a given
            # depth in mm is divided by it, so the ground truth records the depth asked for
            depth = float(f["depth_mm"]) / g.bs if "depth_mm" in f else drawn
            sides = {"right": (1,), "left": (2,), "bilateral": (1, 2)}[f["side"]]
            for sd in sides:
                self._effusions.append({"code": sd, "depth": depth, "index": i})
        for i, f in enumerate(spec.findings):
            t, rng = f["type"], rngs[i]
            rec: dict[str, Any] = {"type": t, "index": i}
            if t == "effusion":
                rec["side"] = f["side"]
                vox = 0
                zs = []
                for e in self._effusions:
                    if e["index"] != i:
                        continue
                    yl = self._effusion_y(g.x[None, None, :], g.z[:, None, None], e["code"], e["depth"])
                    side_lung = lab == _LUNGS[e["code"] - 1]
                    m = side_lung & (g.y[None, :, None] > yl)
                    band = side_lung & (g.y[None, :, None] > yl - 7.0) & ~m
                    lab[band] = _L["atelectasis"]
                    lab[m] = _L["effusion"]
                    n = int(m.sum())
                    vox += n
                    if n:
                        zs.append(np.nonzero(m.any((1, 2)))[0])
                    rec["depth_mm"] = round(e["depth"] * g.bs, 1)
                rec["voxels"] = vox
                if zs:
                    allz = np.concatenate(zs)
                    rec["slice_range"] = [int(allz.min()), int(allz.max())]
                rec["visible"] = vox > 0
            elif t == "cardiomegaly":
                rec["scale"] = [CARDIOMEGALY_SCALE, CARDIOMEGALY_SCALE, 1.15]
                rec["visible"] = bool(np.isin(lab, (_L["myocardium"], _L["blood_pool"])).any())
                rec["heart_center_voxel"] = [
                    round(float(v), 2) for v in g.to_voxel(self.anat.heart_center()[None])[0]
                ]
                rec["heart_axes_mm"] = (self.anat.heart_ax * self.anat.heart_scale * g.bs).round(1).tolist()
            elif t == "emphysema":
                rec["visible"] = True
                self._emphysema = (i, rng)
            elif t == "consolidation":
                rec["lobe"] = f["lobe"]
                self._consolidations.append((i, rec, rng))
            elif t == "nodule":
                rec["lobe"] = f["lobe"]
                rec["size_mm"] = float(f.get("size_mm", 10.0))
            out.append(rec)
        # consolidations before nodules (a nodule drawn later stays visible)
        for _i, rec, rng in self._consolidations:
            self._consolidation(rec, rng)
        for rec in out:
            if rec["type"] == "nodule":
                self._nodule(rec, rngs[rec["index"]])
        return out

    def _nodule(self, rec, rng):
        g = self.g
        r = rec["size_mm"] / 2.0 / g.bs
        lobe = rec["lobe"]
        if lobe.endswith("upper"):

            def prefer(P):
                return P[:, 2] < 110.0
        elif lobe.endswith("lower"):

            def prefer(P):
                return (P[:, 2] > 165.0) & (P[:, 1] > 0.0)
        else:

            def prefer(P):
                return P[:, 1] < -15.0

        c, in_z = self._sample_in_lobe(rng, lobe, r + 4.0, prefer)
        if c is None:
            rec["visible"] = False
            return
        # slightly lobulated sphere
        pts = c[None] + rng.normal(0, 0.18 * r, (5, 3))
        rads = np.full(5, r * 0.75)
        idx, frac = self.g.splat(np.vstack([c[None], pts]), np.concatenate([[r], rads]), min_frac=0.5)
        idx = idx[self.lab.flat[idx] != _L["effusion"]]
        self.lab.flat[idx] = _L["nodule"]
        v = g.to_voxel(c[None])[0]
        rec["center_voxel"] = [round(float(x), 2) for x in v]
        rec["center_mm"] = [round(float(x) * g.bs, 2) for x in c]
        rec["radius_mm"] = round(r * g.bs, 2)
        rec["radius_voxel"] = [
            round(r * g.bs / g.ds, 2),
            round(r * g.bs / g.dp, 2),
            round(r * g.bs / g.dp, 2),
        ]
        rec["voxels"] = int(len(np.unique(idx)))  # the six balls overlap: each voxel once
        s = int(round(v[0]))
        rec["visible"] = bool(in_z and 0 <= s < g.S and len(idx) > 0)

    def _consolidation(self, rec, rng):
        g, A, lab = self.g, self.anat, self.lab
        lobe = rec["lobe"]
        li = LOBES.index(lobe)
        sd = 1 if lobe.startswith("right") else 2
        R = float(rng.uniform(45.0, 65.0)) if not lobe.endswith("middle") else float(rng.uniform(32.0, 45.0))

        def prefer(P):  # peripheral (subpleural) centres: consolidation abuts the pleura
            d = A.depth(P[:, 0], P[:, 1], P[:, 2]) - A.wall(P[:, 0], P[:, 1], P[:, 2])
            return d < 30.0

        c, in_z = self._sample_in_lobe(rng, lobe, 10.0, prefer)
        rec["visible"] = False
        rec["voxels"] = 0
        if c is None:
            return
        k0, k1 = g.k_range(c[2] - 1.3 * R, c[2] + 1.3 * R)
        if k1 <= k0:
            return
        sl = slice(k0, k1)
        x, y, z = g.x[None, None, :], g.y[None, :, None], g.z[sl, None, None]
        ph = rng.uniform(0, 2 * np.pi, 3)
        k = 2 * np.pi / rng.uniform(60.0, 90.0, 3)
        mod = 0.1 * (np.sin(k[0] * x + ph[0]) + np.sin(k[1] * y + ph[1]) + np.sin(k[2] * z + ph[2]))
        d2 = (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2
        m = d2 < (R * (1.0 + mod)) ** 2
        m &= lab[sl] == _LUNGS[sd - 1]
        m &= A.lobe_of(x, y, z, np.uint8(sd)) == li
        lab[sl][m] = _L["consolidation"]
        rec["voxels"] = int(m.sum())
        v = g.to_voxel(c[None])[0]
        rec["center_voxel"] = [round(float(t), 2) for t in v]
        rec["radius_mm"] = round(R * g.bs, 1)
        if rec["voxels"]:
            zz = np.nonzero(m.any((1, 2)))[0] + k0
            rec["slice_range"] = [int(zz.min()), int(zz.max())]
        rec["visible"] = rec["voxels"] > 0

    # --- HU synthesis
    def _to_hu(self, findings_gt):
        spec, g, A, lab = self.spec, self.g, self.anat, self.lab
        col = 2 if spec.contrast else 1
        lut = np.array([t[col] for t in TISSUES], dtype=np.float32)
        if self._emphysema is not None:
            lut[_L["lung_right"]] = lut[_L["lung_left"]] = EMPHYSEMA_LUNG_HU
        hu = np.take(lut, lab)
        lung = (lab == _L["lung_right"]) | (lab == _L["lung_left"])
        # dependent density gradient in the lungs (posterior denser)
        grad = (np.clip((g.y - (-80.0)) / 170.0, 0.0, 1.0) * 55.0 - 20.0).astype(np.float32)
        if self._emphysema is not None:
            grad *= 0.4
        np.add(hu, grad[None, :, None], out=hu, where=lung)
        flat = hu.reshape(-1)
        labflat = lab.reshape(-1)
        # emphysema: low-attenuation holes, upper-zone predominant
        if self._emphysema is not None:
            i, rng = self._emphysema
            P = np.column_stack(
                [rng.uniform(-140, 140, 6000), rng.uniform(-95, 95, 6000), rng.uniform(0, 260, 6000)]
            )
            code = A.lung_code(P[:, 0], P[:, 1], P[:, 2])
            keep = (code > 0) & (rng.random(6000) < np.exp(-P[:, 2] / 140.0))
            P = P[keep][:EMPHYSEMA_HOLES]
            rads = np.exp(rng.uniform(np.log(2.0), np.log(8.0), len(P))) / g.bs
            # a few larger subpleural bullae, upper-zone predominant
            nb = min(int(rng.integers(2, 6)), len(P))
            rads[:nb] = rng.uniform(9.0, 16.0, nb) / g.bs
            idx, frac = g.dedupe(*g.splat(P, rads, partial=True))
            m = np.isin(labflat[idx], _LUNGS)
            idx, frac = idx[m], frac[m]
            flat[idx] += frac * (-1000.0 - flat[idx])
            in_view = bool(lung.any())
            for rec in findings_gt:
                if rec["type"] == "emphysema":
                    rec["holes"] = len(P)
                    rec["holes_voxels"] = int(len(idx))
                    rec["lung_hu"] = EMPHYSEMA_LUNG_HU
                    rec["visible"] = in_view
        # pulmonary vessel tree (partial-volume blending into lung voxels)
        s0, s1, r0, r1 = _vessel_tree(A, self.rng_vessel)
        pts, rad = _segments(s0, s1, r0, r1, self.step)
        idx, frac = g.dedupe(*g.splat(pts, rad, partial=True))
        lv = labflat[idx]
        vessel_hu = np.float32(220.0 if spec.contrast else 40.0)
        m = np.isin(lv, _LUNGS) | (lv == _L["atelectasis"])
        flat[idx[m]] += frac[m] * (vessel_hu - flat[idx[m]])
        # air bronchograms inside consolidation follow the tree
        m = (lv == _L["consolidation"]) & (frac > 0.35)
        flat[idx[m]] += 0.8 * frac[m] * (-900.0 - flat[idx[m]])
        self.n_vessel_segments = len(s0)
        # slice profile along z, correlated noise, mild in-plane blur
        if g.S >= 3:
            hu = _smooth3(hu, 0, _Z_BLUR)
        if spec.noise_hu > 0:
            # the in-plane blur divides the noise std by (2 w^2 + (1 - 2 w)^2) over two axes
            q = _GAUSS_Q * np.float32(spec.noise_hu / (2 * _XY_BLUR**2 + (1 - 2 * _XY_BLUR) ** 2))
            noise = np.frombuffer(self.rng_noise.bytes(hu.size), dtype=np.uint8).reshape(hu.shape)
            hu += np.take(q, noise)
        hu = _smooth3(hu, 1, _XY_BLUR)
        hu = _smooth3(hu, 2, _XY_BLUR)
        return hu

    # --- ground truth
    def _ground_truth(self, findings_gt):
        spec, g, A = self.spec, self.g, self.anat
        labels = {name: 0 for name in CTRATE_LABELS}
        for rec in findings_gt:
            if rec.get("visible", True):
                labels[FINDING_LABELS[rec["type"]]] = 1
        hc = A.heart_center()

        def vox(p):
            return [round(float(t), 2) for t in g.to_voxel(np.asarray(p)[None])[0]]

        def zslice(zv):
            return round(float((zv * g.bs - g.start) / g.ds), 2)

        heart_ax_mm = (A.heart_ax * A.heart_scale * g.bs).round(1).tolist()
        anatomy = {
            "heart_center_voxel": vox(hc),
            "heart_axes_mm": heart_ax_mm,
            "carina_slice": zslice(A.carina[2]),
            "lung_apex_slice": zslice(0.0),
            "right_dome_slice": zslice(A.zd_r),
            "left_dome_slice": zslice(A.zd_l),
            "body_center_voxel_hw": [
                round(g.y0 / g.dp + (g.H - 1) / 2.0, 2),
                round(g.x0 / g.dp + (g.W - 1) / 2.0, 2),
            ],
            "body_half_width_mm": round(A.a * g.bs, 1),
            "vessel_segments": int(self.n_vessel_segments),
        }
        return {
            "spec": asdict(spec),
            "labels": labels,
            "findings": findings_gt,
            "num_slices": int(g.S),
            "spacing": [g.ds, g.dp, g.dp],
            "shape": [g.S, g.H, g.W],
            "contrast": bool(spec.contrast),
            "anatomy": anatomy,
        }
