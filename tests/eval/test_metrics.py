"""Evaluation metrics: shipped weights, FID/FVD behaviour, CLIP score, continuity, memorisation."""

import numpy as np
import pytest
import torch

from ctflow.data.phantom import make_phantom, sample_spec
from ctflow.data.reports import phantom_report
from ctflow.errors import CTFlowError
from ctflow.eval.features import FEATURE_DIM, WEIGHTS_DIR, load_features, plane_slices, volume_tensor
from ctflow.eval.metrics import clip_score, clip_scores, continuity, fid_planes, fvd, memorization
from ctflow.models.text import format_report

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def phantoms():
    out = []
    for seed in range(32_000, 32_012):
        vol, gt = make_phantom(sample_spec(seed, size=64, slice_range=(40, 120)))
        rep = phantom_report(gt, seed)
        out.append((vol.hu(), format_report(rep["Findings_EN"], rep["Impressions_EN"])))
    return out


def _noisy(volumes, sigma, seed=0):
    rng = np.random.default_rng(seed)
    return [v + rng.normal(0, sigma, v.shape).astype(np.float32) for v in volumes]


def test_weights_load_from_safetensors_and_fit_the_size_budget():
    files = sorted(WEIGHTS_DIR.glob("*"))
    assert {p.name for p in files} >= {"features.safetensors", "attribute_reader.safetensors"}
    assert not [p for p in files if p.suffix in (".pt", ".pth", ".bin", ".pkl", ".ckpt")]
    assert sum(p.stat().st_size for p in files) <= 10 * 1024 * 1024
    model = load_features()
    x = torch.stack([volume_tensor(np.full((50, 64, 64), -1000.0, np.float32))])
    assert model.volume.features(x).shape == (1, FEATURE_DIM)
    assert not any(p.requires_grad for p in model.parameters())


def test_inputs_are_resized_to_the_network_grids(phantoms):
    vol = phantoms[0][0]
    assert volume_tensor(vol).shape == (1, 32, 64, 64)
    for plane in ("axial", "coronal", "sagittal"):
        x = plane_slices(vol, plane, 16)
        assert x.shape == (16, 1, 64, 64) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_fid_is_zero_for_identical_sets_and_grows_with_noise(phantoms):
    real = [v for v, _ in phantoms[:8]]
    same = fid_planes(real, real)
    assert all(v < 1e-3 for v in same.values()), same
    weak, strong = fid_planes(real, _noisy(real, 30.0)), fid_planes(real, _noisy(real, 150.0))
    for plane in same:
        assert same[plane] < weak[plane] < strong[plane], (plane, same, weak, strong)


def test_fid_grows_with_an_hu_shift(phantoms):
    real = [v for v, _ in phantoms[:8]]
    small = fid_planes(real, [v + 40.0 for v in real])["axial"]
    large = fid_planes(real, [v + 200.0 for v in real])["axial"]
    assert 0.0 < small < large


def test_fvd_is_zero_for_identical_sets_and_monotone_in_corruption(phantoms):
    real = [v for v, _ in phantoms[:8]]
    values = [fvd(real, real), fvd(real, _noisy(real, 40.0)), fvd(real, _noisy(real, 150.0))]
    assert values[0] < 1e-3 and values[0] < values[1] < values[2], values
    with pytest.raises(CTFlowError, match="at least 2"):
        fvd(real[:1], real[:1])


def test_clip_score_prefers_matching_reports_to_shuffled_ones(phantoms):
    volumes = [v for v, _ in phantoms]
    reports = [r for _, r in phantoms]
    matched = clip_scores(volumes, reports)
    shuffled = clip_scores(volumes, reports[3:] + reports[:3])
    assert float(matched.mean()) > float(shuffled.mean())
    assert 0.0 <= float(matched.min()) and float(matched.max()) <= 100.0
    assert clip_score(volumes[:2], reports[:2]) == pytest.approx(float(matched[:2].mean()), abs=1e-4)
    with pytest.raises(CTFlowError, match="one report per volume"):
        clip_score(volumes[:2], reports[:1])


def test_continuity_is_near_one_for_a_phantom_and_flags_an_artificial_seam(phantoms):
    vol = phantoms[0][0]
    smooth = continuity(vol)
    assert 0.7 < smooth["ratio"] < 1.3, smooth
    seamed = vol.copy()
    for start in range(8, vol.shape[0], 16):  # every other 8-slice chunk shifted by 2 pixels and +60 HU
        seamed[start : start + 8] = np.roll(vol[start : start + 8], 2, axis=2) + 60.0
    flagged = continuity(seamed)
    assert flagged["ratio"] > 1.5 * smooth["ratio"], (smooth, flagged)
    assert continuity(vol[:5])["boundaries"] == 0
    constant = np.full((40, 8, 8), -1000.0, np.float32)  # no change anywhere is no seam: ratio 1, not 0
    assert continuity(constant)["ratio"] == pytest.approx(1.0)


def test_memorization_flags_copies_but_not_a_new_phantom(phantoms):
    train = [v for v, _ in phantoms[:6]]
    noisy_copy = train[4] + np.random.default_rng(1).normal(0, 40, train[4].shape).astype(np.float32)
    audit = memorization([train[2].copy(), noisy_copy, phantoms[6][0]], train)
    assert audit["flagged"] == [0, 1]
    assert audit["nearest_correlation_index"][:2] == [2, 4] and audit["nearest_correlation"][0] > 0.999
    assert audit["nearest_correlation"][2] < audit["threshold"]
    assert audit["nearest_cosine_index"][0] == 2 and audit["nearest_cosine"][0] > 0.999
    assert audit["fraction_flagged"] == pytest.approx(2 / 3)
    # a copy moved by a voxel or two of the audit's grid (64 px across) is still a copy
    grid = train[3].shape[1] / 64
    moved = [np.roll(train[3], round(2 * grid), axis=2), np.roll(train[3], (1, round(grid)), axis=(0, 1))]
    audit = memorization(moved, train)
    assert audit["flagged"] == [0, 1] and audit["nearest_correlation_index"] == [3, 3]


def test_metric_arguments_that_cannot_work_are_named(phantoms):
    vol = phantoms[0][0]
    with pytest.raises(CTFlowError, match="pass each as a list, even of one volume"):
        fid_planes(vol, [vol])
    with pytest.raises(CTFlowError, match="slices_per_volume must be a whole number of at least 1"):
        fid_planes([vol], [vol], slices_per_volume=0)
    for chunk in (8.5, "8", 1):
        with pytest.raises(CTFlowError, match="chunk must be a whole number of at least 2"):
            continuity(vol, chunk)
    with pytest.raises(CTFlowError, match="NaN"):
        continuity(np.full((20, 4, 4), np.nan, np.float32))
    for threshold in (float("nan"), 2.0, 0):
        with pytest.raises(CTFlowError, match="threshold is a correlation"):
            memorization([vol], [vol], threshold=threshold)
