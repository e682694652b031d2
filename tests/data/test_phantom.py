"""Procedural chest-CT phantoms: geometry, HU ranges, findings, determinism, speed."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace

import numpy as np
import pytest
from scipy import ndimage

from ctflow.data.labels import CTRATE_LABELS
from ctflow.data.phantom import (
    FINDING_LABELS,
    FINDING_TISSUES,
    LABEL_IDS,
    LOBES,
    PhantomSpec,
    clear_twin,
    finding_extents,
    finding_mask,
    make_phantom,
    render_phantom,
    sample_spec,
    side_twin,
)
from ctflow.data.reports import phantom_report
from ctflow.data.volume import Volume
from ctflow.errors import CTFlowError

LUNG_IDS = [LABEL_IDS["lung_right"], LABEL_IDS["lung_left"]]


def _spec(**kw) -> PhantomSpec:
    base = dict(seed=3, size=96, num_slices=80, slice_spacing=3.75, pixel_spacing=3.8, start_level=-25.0)
    base.update(kw)
    return PhantomSpec(**base)


@pytest.fixture(scope="module")
def normal():
    spec = PhantomSpec(
        seed=7, size=128, num_slices=110, slice_spacing=2.75, pixel_spacing=2.9, start_level=-30.0
    )
    return spec, render_phantom(spec)


def _region_means(vol: Volume, gt: dict):
    """Mean HU in the posterior lower quarter of each lung side: (right, left)."""
    a = vol.hu()
    an = gt["anatomy"]
    apex, dome = an["lung_apex_slice"], max(an["right_dome_slice"], an["left_dome_slice"])
    k0, k1 = int(apex + 0.72 * (dome - apex)), int(dome) + 1
    hc, wc = an["body_center_voxel_hw"]
    half_w = an["body_half_width_mm"] / vol.spacing[2]
    rows = slice(int(hc + 2), int(hc + 0.7 * half_w * 0.7))
    off0, off1 = int(0.2 * half_w), int(0.75 * half_w)
    right = a[k0:k1, rows, int(wc - off1) : int(wc - off0)].mean()
    left = a[k0:k1, rows, int(wc + off0) : int(wc + off1)].mean()
    return float(right), float(left)


# ----------------------------------------------------------------------------- basics


def test_deterministic_same_seed_identical_and_seeds_differ():
    spec = _spec(size=64, num_slices=40, pixel_spacing=5.5, slice_spacing=7.0)
    a, gt_a = make_phantom(spec)
    b, gt_b = make_phantom(replace(spec))
    assert np.array_equal(a.array, b.array)
    assert json.dumps(gt_a, sort_keys=True) == json.dumps(gt_b, sort_keys=True)
    c, _ = make_phantom(replace(spec, seed=spec.seed + 1))
    assert not np.array_equal(a.array, c.array)
    assert np.abs(a.hu() - c.hu()).mean() > 5.0


def test_shape_spacing_dtype_and_ground_truth_layout():
    spec = _spec(num_slices=70, slice_spacing=4.0, pixel_spacing=3.5)
    vol, gt = make_phantom(spec)
    assert isinstance(vol, Volume)
    assert vol.shape == (70, 96, 96)
    assert vol.spacing == (4.0, 3.5, 3.5)
    assert vol.array.dtype == np.int16
    assert vol.synthetic
    assert np.allclose(np.abs(vol.affine[:3, :3]).sum(0), [4.0, 3.5, 3.5])
    assert gt["num_slices"] == 70 and gt["spacing"] == [4.0, 3.5, 3.5]
    assert gt["spec"] == asdict(spec)
    assert list(gt["labels"]) == list(CTRATE_LABELS)
    assert all(v == 0 for v in gt["labels"].values())
    assert gt["findings"] == []
    json.dumps(gt)  # JSON-serialisable


def test_hu_ranges_of_regions(normal):
    spec, r = normal
    a, lab = r.volume.hu(), r.labels
    lung = np.isin(lab, LUNG_IDS)
    assert lung.mean() > 0.08
    assert abs(float(a[lung].mean()) + 850.0) < 80.0
    air = lab == LABEL_IDS["air"]
    corners = np.zeros_like(air)
    corners[:, :10, :10] = corners[:, :10, -10:] = True
    assert abs(float(a[air & corners].mean()) + 1000.0) < 50.0
    assert (a > 300).sum() > 500
    assert float(a[lab == LABEL_IDS["cortical_bone"]].mean()) > 300.0
    heart = np.isin(lab, [LABEL_IDS["myocardium"], LABEL_IDS["blood_pool"]])
    assert 10.0 < float(a[heart].mean()) < 80.0
    liver = lab == LABEL_IDS["liver"]
    assert liver.any() and 30.0 < float(a[liver].mean()) < 90.0
    fat = lab == LABEL_IDS["fat"]
    assert -140.0 < float(a[fat].mean()) < -40.0


def test_anatomy_order_along_z(normal):
    spec, r = normal
    an = r.ground_truth["anatomy"]
    assert an["lung_apex_slice"] < an["carina_slice"] < an["heart_center_voxel"][0] < an["right_dome_slice"]
    assert an["right_dome_slice"] < an["left_dome_slice"]  # the right hemidiaphragm is higher
    lab = r.labels
    # the lungs appear below the apex, the liver only below the right dome
    lung_slices = np.nonzero(np.isin(lab, LUNG_IDS).any((1, 2)))[0]
    assert lung_slices.min() >= int(an["lung_apex_slice"]) - 1
    liver_slices = np.nonzero((lab == LABEL_IDS["liver"]).any((1, 2)))[0]
    assert liver_slices.min() >= int(an["right_dome_slice"]) - 2
    # heart left of the midline, liver right of it
    hc, wc = an["body_center_voxel_hw"]
    assert an["heart_center_voxel"][2] > wc
    ks, hs, ws = np.nonzero(lab == LABEL_IDS["liver"])
    assert ws.mean() < wc


def test_z_continuity(normal):
    _, r = normal
    a = r.volume.hu()
    adjacent = np.abs(np.diff(a, axis=0)).mean()
    distant = np.abs(a[20:] - a[:-20]).mean()
    assert adjacent < 0.5 * distant


def test_same_body_at_different_slice_sampling():
    fine = _spec(num_slices=96, slice_spacing=2.5, noise_hu=0.0)
    coarse = replace(fine, num_slices=48, slice_spacing=5.0)
    a, _ = make_phantom(fine)
    b, _ = make_phantom(coarse)
    assert a.shape[0] == 96 and b.shape[0] == 48
    for k in (10, 24, 36):  # same physical z: start + 5k mm
        x, y = a.hu()[2 * k], b.hu()[k]
        corr = np.corrcoef(x.ravel(), y.ravel())[0, 1]
        assert corr > 0.9


def test_field_of_view_and_body_scale_change_the_footprint():
    small_fov = make_phantom(_spec(pixel_spacing=3.0, num_slices=30, start_level=100.0))[0].hu()
    large_fov = make_phantom(_spec(pixel_spacing=4.5, num_slices=30, start_level=100.0))[0].hu()
    assert (small_fov[15] > -500).mean() > 1.5 * (large_fov[15] > -500).mean()
    big = make_phantom(_spec(body_scale=1.2, num_slices=30, start_level=100.0))[0].hu()
    ref = make_phantom(_spec(body_scale=1.0, num_slices=30, start_level=100.0))[0].hu()
    assert (big[15] > -500).sum() > 1.2 * (ref[15] > -500).sum()


# ----------------------------------------------------------------------------- findings


def test_labels_consistent_with_findings():
    findings = [
        {"type": "nodule", "lobe": "left lower", "size_mm": 12.0},
        {"type": "effusion", "side": "right"},
        {"type": "cardiomegaly"},
        {"type": "emphysema"},
        {"type": "consolidation", "lobe": "right upper"},
    ]
    spec = _spec(size=64, pixel_spacing=5.5, num_slices=60, slice_spacing=5.0, findings=findings)
    _, gt = make_phantom(spec)
    assert set(gt["labels"]) == set(CTRATE_LABELS)
    on = {k for k, v in gt["labels"].items() if v}
    assert on == {FINDING_LABELS[f["type"]] for f in findings}
    assert all(f["visible"] for f in gt["findings"])
    types = [f["type"] for f in gt["findings"]]
    assert sorted(types) == sorted(f["type"] for f in findings)


def test_findings_outside_the_scanned_range_are_not_labelled():
    findings = [
        {"type": "nodule", "lobe": "right lower", "size_mm": 10.0},
        {"type": "effusion", "side": "left"},
        {"type": "cardiomegaly"},
        {"type": "emphysema"},
    ]
    # a short stack through the neck: no lungs, no heart
    _, gt = make_phantom(_spec(num_slices=8, start_level=-120.0, findings=findings))
    assert not any(gt["labels"].values())
    assert [f["visible"] for f in gt["findings"]] == [False] * 4


@pytest.mark.parametrize("side", ["left", "right"])
def test_effusion_side_visible(side):
    spec = _spec(findings=[{"type": "effusion", "side": side}])
    vol, gt = make_phantom(spec)
    assert gt["labels"]["Pleural effusion"] == 1
    rec = gt["findings"][0]
    assert rec["side"] == side and rec["voxels"] > 500
    right, left = _region_means(vol, gt)
    named, other = (left, right) if side == "left" else (right, left)
    assert named - other > 150.0
    # the same region of a normal phantom is symmetric
    vol0, gt0 = make_phantom(_spec())
    r0, l0 = _region_means(vol0, gt0)
    assert abs(r0 - l0) < 120.0


def test_side_twin_moves_the_effusion_to_the_other_side_and_keeps_the_rest():
    spec = _spec(findings=[{"type": "cardiomegaly"}, {"type": "effusion", "side": "left", "depth_mm": 55}])
    twin = side_twin(spec)
    assert twin.findings == [{"type": "cardiomegaly"}, {"type": "effusion", "side": "right", "depth_mm": 55}]
    assert replace(twin, findings=spec.findings) == spec and spec.findings[1]["side"] == "left"
    assert side_twin(twin) == spec
    a, b = render_phantom(spec), render_phantom(twin)
    wc = a.ground_truth["anatomy"]["body_center_voxel_hw"][1]
    fluid = [np.nonzero(r.labels == LABEL_IDS["effusion"])[2] for r in (a, b)]
    assert (fluid[0] > wc).mean() > 0.95 and (fluid[1] < wc).mean() > 0.95  # left: +x, right: -x
    # the same body: outside both effusions (and the lung they compress) not one label differs
    ids = [LABEL_IDS[t] for t in FINDING_TISSUES["effusion"]]
    moved = np.isin(a.labels, ids) | np.isin(b.labels, ids)
    assert moved.mean() < 0.1 and (a.labels == b.labels)[~moved].all()
    # and the same report wording, but for the side
    ra, rb = (phantom_report(r.ground_truth) for r in (a, b))
    assert ra != rb and ra == {k: v.replace("Right", "Left").replace("right", "left") for k, v in rb.items()}


@pytest.mark.parametrize(
    "findings", [[], [{"type": "cardiomegaly"}], [{"type": "effusion", "side": "bilateral"}]]
)
def test_side_twin_is_none_without_a_one_sided_effusion(findings):
    assert side_twin(_spec(findings=findings)) is None


@pytest.mark.parametrize("side", ["left", "bilateral"])
def test_clear_twin_removes_the_effusion_and_keeps_the_body_and_the_wording(side):
    spec = _spec(findings=[{"type": "cardiomegaly"}, {"type": "effusion", "side": side, "depth_mm": 55}])
    twin = clear_twin(spec)
    assert twin.findings == [{"type": "cardiomegaly"}] and len(spec.findings) == 2
    assert replace(twin, findings=spec.findings) == spec and clear_twin(twin) is None
    a, b = render_phantom(spec), render_phantom(twin)
    ids = [LABEL_IDS[t] for t in FINDING_TISSUES["effusion"]]
    assert np.isin(a.labels, ids).any() and not np.isin(b.labels, ids).any()
    # the same body: outside the fluid and the lung it compressed not one label differs
    moved = np.isin(a.labels, ids)
    assert (a.labels == b.labels)[~moved].all()
    assert (
        b.ground_truth["labels"]["Pleural effusion"] == 0
        and a.ground_truth["labels"]["Pleural effusion"] == 1
    )
    ra, rb = (phantom_report(r.ground_truth) for r in (a, b))
    assert (
        "effusion was detected" not in ra["Findings_EN"] and "pleural effusion" in ra["Findings_EN"].lower()
    )
    sa, sb = (r["Findings_EN"].split(". ") for r in (ra, rb))
    assert len(sa) == len(sb) and sum(x != y for x, y in zip(sa, sb, strict=True)) == 1  # the effusion's
    assert rb["Findings_EN"].count("effusion") == 2  # "No pericardial effusion", "No pleural effusion"


def test_clear_twin_is_none_without_an_effusion():
    assert clear_twin(_spec(findings=[{"type": "cardiomegaly"}])) is None and clear_twin(_spec()) is None


def test_nodule_twin_removes_the_nodule_and_its_sentence():
    spec = _spec(
        findings=[{"type": "nodule", "lobe": "right upper", "size_mm": 14.0}, {"type": "cardiomegaly"}]
    )
    twin = clear_twin(spec, "nodule")
    assert twin.findings == [{"type": "cardiomegaly"}] and clear_twin(twin, "nodule") is None
    assert clear_twin(spec) is None  # no effusion to clear
    a, b = render_phantom(spec), render_phantom(twin)
    nodule = a.labels == LABEL_IDS["nodule"]
    assert nodule.any() and not (b.labels == LABEL_IDS["nodule"]).any()
    assert (a.labels == b.labels)[~nodule].all()  # the heart comes first in neither: nothing else moves
    ra, rb = (phantom_report(r.ground_truth)["Findings_EN"] for r in (a, b))
    assert "14 mm" in ra and "mm" not in rb and "nodule" in rb  # its sentence reads "No ... nodule ..."
    assert (b.ground_truth["labels"]["Lung nodule"], a.ground_truth["labels"]["Lung nodule"]) == (0, 1)


def test_clear_twin_names_an_unknown_finding():
    with pytest.raises(CTFlowError, match="unknown finding 'mass'"):
        clear_twin(_spec(), "mass")


def test_bilateral_effusion_labels_both_sides():
    spec = _spec(findings=[{"type": "effusion", "side": "bilateral"}])
    r = render_phantom(spec)
    lab = r.labels
    wc = r.ground_truth["anatomy"]["body_center_voxel_hw"][1]
    ks, hs, ws = np.nonzero(lab == LABEL_IDS["effusion"])
    assert (ws < wc).sum() > 300 and (ws > wc).sum() > 300
    assert 0.0 < float(np.median(r.volume.hu()[lab == LABEL_IDS["effusion"]])) < 40.0


def test_cardiomegaly_enlarges_heart(normal):
    spec, r0 = normal
    r1 = render_phantom(replace(spec, findings=[{"type": "cardiomegaly"}]))
    assert r1.ground_truth["labels"]["Cardiomegaly"] == 1

    def heart_area(r):
        """Pixels of 0..100 HU connected to the heart centre in its mid slice."""
        k, h, w = (int(round(v)) for v in r.ground_truth["anatomy"]["heart_center_voxel"])
        sl = ndimage.uniform_filter(r.volume.hu()[k], 3)
        comp, _ = ndimage.label((sl > 0) & (sl < 100))
        assert comp[h, w] > 0
        return int((comp == comp[h, w]).sum())

    assert heart_area(r1) > 1.3 * heart_area(r0)
    heart_ids = [LABEL_IDS["myocardium"], LABEL_IDS["blood_pool"]]
    assert np.isin(r1.labels, heart_ids).sum() > 1.5 * np.isin(r0.labels, heart_ids).sum()
    # nothing else moved: noise and the body are identical far from the heart
    k_top = 5
    assert np.array_equal(r0.volume.array[k_top], r1.volume.array[k_top])


@pytest.mark.parametrize("lobe", ["right upper", "left lower", "right middle"])
def test_nodule_at_ground_truth_centre(lobe):
    spec = _spec(
        size=112,
        pixel_spacing=3.0,
        num_slices=100,
        slice_spacing=2.5,
        findings=[{"type": "nodule", "lobe": lobe, "size_mm": 14.0}],
    )
    r = render_phantom(spec)
    gt = r.ground_truth
    assert gt["labels"]["Lung nodule"] == 1
    rec = gt["findings"][0]
    assert rec["lobe"] == lobe and rec["size_mm"] == 14.0 and rec["visible"]
    s, h, w = (int(round(v)) for v in rec["center_voxel"])
    a = r.volume.hu()
    assert -120.0 < float(a[s, h, w]) < 150.0  # soft tissue (partial volume at the rim only)
    assert -250.0 < float(a[s - 1 : s + 2, h - 1 : h + 2, w - 1 : w + 2].mean()) < 150.0
    assert r.labels[s, h, w] == LABEL_IDS["nodule"]
    assert rec["radius_voxel"][1] == pytest.approx(7.0 / spec.pixel_spacing, abs=0.01)
    an = gt["anatomy"]
    wc = an["body_center_voxel_hw"][1]
    assert (w < wc) == lobe.startswith("right")
    if lobe.endswith("upper"):
        assert s < an["heart_center_voxel"][0]
    if lobe.endswith("lower"):
        assert h > an["body_center_voxel_hw"][0] - 5  # posterior half
    # surrounded by lung
    ring = a[s, h - 6 : h + 7, w - 6 : w + 7]
    assert (ring < -500).mean() > 0.3


def test_consolidation_and_emphysema_change_lung_density(normal):
    spec, r0 = normal
    small = replace(spec, size=96, pixel_spacing=3.8, num_slices=80, slice_spacing=3.75)
    base = render_phantom(small)
    cons = render_phantom(replace(small, findings=[{"type": "consolidation", "lobe": "left lower"}]))
    rec = cons.ground_truth["findings"][0]
    assert rec["voxels"] > 500 and cons.ground_truth["labels"]["Consolidation"] == 1
    m = cons.labels == LABEL_IDS["consolidation"]
    assert float(cons.volume.hu()[m].mean()) > -150.0
    assert (m.nonzero()[2] > base.ground_truth["anatomy"]["body_center_voxel_hw"][1]).all()
    emph = render_phantom(replace(small, findings=[{"type": "emphysema"}]))
    lung0 = np.isin(base.labels, LUNG_IDS)
    lung1 = np.isin(emph.labels, LUNG_IDS)
    assert float(emph.volume.hu()[lung1].mean()) < float(base.volume.hu()[lung0].mean()) - 40.0


def test_finding_extents_match_the_label_map():
    findings = [
        {"type": "effusion", "side": "right"},
        {"type": "cardiomegaly"},
        {"type": "nodule", "lobe": "left lower", "size_mm": 14.0},
        {"type": "consolidation", "lobe": "right upper"},
        {"type": "emphysema"},
    ]
    r = render_phantom(_spec(findings=findings))
    extents = {e["type"]: (e["first"], e["last"]) for e in finding_extents(r.ground_truth)}
    assert set(extents) == {"effusion", "cardiomegaly", "nodule", "consolidation"}  # emphysema: everywhere

    def slices(*names):
        z = np.nonzero(np.isin(r.labels, [LABEL_IDS[n] for n in names]).any((1, 2)))[0]
        return int(z.min()), int(z.max())

    assert extents["effusion"] == slices("effusion")
    assert extents["consolidation"] == slices("consolidation")
    lo, hi = slices("nodule")
    assert extents["nodule"][0] <= lo and hi <= extents["nodule"][1] <= hi + 2
    heart = slices("myocardium", "blood_pool")  # from the heart's centre and z semi-axis
    assert all(abs(a - b) <= 2 for a, b in zip(extents["cardiomegaly"], heart, strict=True))
    # an invisible finding (scanned range misses it) has no extent
    _, gt = make_phantom(_spec(num_slices=8, start_level=-120.0, findings=findings[:1]))
    assert finding_extents(gt) == []


def test_finding_mask_marks_the_findings_tissues_rendered_again_from_the_ground_truth():
    findings = [
        {"type": "effusion", "side": "left"},
        {"type": "nodule", "lobe": "right upper", "size_mm": 14.0},
    ]
    r = render_phantom(_spec(findings=findings))
    truth = json.loads(json.dumps(r.ground_truth))  # as read back from the sidecar
    mask = finding_mask(truth)
    tissue = [LABEL_IDS[n] for n in ("effusion", "atelectasis", "nodule")]
    np.testing.assert_array_equal(mask, np.isin(r.labels, tissue))
    assert mask.any() and not (mask & np.isin(r.labels, [LABEL_IDS["myocardium"]])).any()
    # without cardiomegaly the heart is anatomy; with it, the enlarged heart is the finding
    big = render_phantom(_spec(findings=[{"type": "cardiomegaly"}]))
    heart = np.isin(big.labels, [LABEL_IDS["myocardium"], LABEL_IDS["blood_pool"]])
    np.testing.assert_array_equal(finding_mask(big.ground_truth), heart)
    # no localized finding: an empty map, emphysema included (it fills the lungs)
    for fs in ([], [{"type": "emphysema"}]):
        gt = render_phantom(_spec(findings=fs)).ground_truth
        m = finding_mask(gt)
        assert m.shape == tuple(gt["shape"]) and m.dtype == bool and not m.any()
    bad = {**truth, "shape": [truth["shape"][0] + 1, *truth["shape"][1:]]}
    with pytest.raises(CTFlowError, match="renders"):
        finding_mask(bad)


def test_invalid_specs_raise_one_line_errors():
    for bad in (
        _spec(findings=[{"type": "tumour"}]),
        _spec(findings=[{"type": "nodule", "lobe": "left middle", "size_mm": 10}]),
        _spec(findings=[{"type": "effusion", "side": "both"}]),
        _spec(seed=-1),
        _spec(size=4),
        _spec(slice_spacing=0.0),
        # rendered as 10 slices of 40 px while the ground truth recorded 10.7 and 40.5
        _spec(num_slices=10.7),
        _spec(size=40.5),
        _spec(seed=True),
        _spec(noise_hu="15"),
        _spec(findings=[{"type": "nodule", "lobe": "left upper", "size_mm": "big"}]),  # a bare ValueError
        _spec(findings=[{"type": "effusion", "side": "left", "depth_mm": 5}]),
    ):
        with pytest.raises(CTFlowError) as e:
            make_phantom(bad)
        assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- sampling and speed


def test_sample_spec_deterministic_and_distribution():
    assert sample_spec(5) == sample_spec(5)
    assert sample_spec(5) != sample_spec(6)
    specs = [sample_spec(i, slice_range=(64, 160)) for i in range(300)]
    n = np.array([s.num_slices for s in specs])
    assert n.min() >= 64 and n.max() <= 160 and len(set(n.tolist())) > 40
    normal_frac = np.mean([not s.findings for s in specs])
    assert 0.15 < normal_frac < 0.35
    assert all(1 <= len(s.findings) <= 2 for s in specs if s.findings)
    types = {f["type"] for s in specs for f in s.findings}
    assert types == set(FINDING_LABELS)
    for s in specs:
        s.validate()
        extent = s.num_slices * s.slice_spacing
        assert 220.0 < extent < 450.0
        assert 300.0 < s.size * s.pixel_spacing < 520.0
        for f in s.findings:
            if "lobe" in f:
                assert f["lobe"] in LOBES
            if f["type"] == "nodule":
                assert 6.0 <= f["size_mm"] <= 25.0
    json.dumps([asdict(s) for s in specs])
    assert sample_spec(1, num_slices=77).num_slices == 77
    assert sample_spec(1, size=64).size == 64


def test_speed_sanity():
    spec = PhantomSpec(seed=11, size=128, num_slices=128, slice_spacing=2.5, pixel_spacing=2.9)
    make_phantom(replace(spec, num_slices=8))  # warm caches
    t = time.perf_counter()
    make_phantom(spec)
    assert time.perf_counter() - t < 1.5


def test_a_given_effusion_depth_is_the_depth_recorded_whatever_the_body_scale():
    for scale in (0.9, 1.0, 1.2):
        spec = _spec(body_scale=scale, findings=[{"type": "effusion", "side": "left", "depth_mm": 55}])
        assert make_phantom(spec)[1]["findings"][0]["depth_mm"] == 55.0, scale
    with pytest.raises(CTFlowError, match="depth_mm must be a number from 10 to 120 mm"):
        _spec(findings=[{"type": "effusion", "side": "left", "depth_mm": 500}]).validate()


def test_a_nodules_voxel_count_is_the_voxels_labelled_nodule():
    spec = _spec(findings=[{"type": "nodule", "lobe": "right upper", "size_mm": 20}])
    r = render_phantom(spec)
    rec = next(f for f in r.ground_truth["findings"] if f["type"] == "nodule")
    assert rec["visible"] and rec["voxels"] == int((r.labels == LABEL_IDS["nodule"]).sum())
