"""The phantom attribute reader: accuracy on fresh phantoms, report parsing, edge cases."""

import numpy as np
import pytest
import torch

from ctflow.data.phantom import PhantomSpec, make_phantom, sample_spec
from ctflow.data.reports import phantom_report
from ctflow.errors import CTFlowError
from ctflow.eval.attributes import (
    ATTRIBUTE_KEYS,
    attribute_accuracy,
    attributes_from_ground_truth,
    attributes_from_report,
    finding_counts,
    read_attributes,
)
from ctflow.models.text import format_report

torch.set_num_threads(1)

SEEDS = range(30_000, 30_060)  # disjoint from calibration (20000-20199) and tuning (0-399) seeds


@pytest.fixture(scope="module")
def phantoms():
    out = []
    for seed in SEEDS:
        vol, gt = make_phantom(sample_spec(seed, size=64, slice_range=(40, 120)))
        out.append((seed, vol, gt))
    return out


@pytest.fixture(scope="module")
def readings(phantoms):
    return [read_attributes(vol) for _, vol, _ in phantoms]


def test_reader_reaches_target_accuracy_on_unseen_64px_phantoms(phantoms, readings):
    truth = [attributes_from_ground_truth(gt) for _, _, gt in phantoms]
    acc = attribute_accuracy(readings, truth)
    for key in ("effusion", "cardiomegaly", "emphysema", "consolidation"):
        assert acc[key] >= 0.95, (key, acc)
    # 6-9 mm nodules are one or two voxels at 64 px: the reader's measured accuracy is
    # ~92 % over 400 phantoms (benchmarks/attribute_reader.py reports the 200-phantom figure)
    assert acc["nodule"] >= 0.85, acc


def test_reader_output_has_the_documented_keys_and_types(readings):
    r = readings[0]
    assert set(ATTRIBUTE_KEYS) <= set(r)
    assert r["effusion"] in ("none", "left", "right", "bilateral")
    assert all(isinstance(r[k], bool) for k in ATTRIBUTE_KEYS if k != "effusion")
    assert r["lung_volume_ml"] > 500


def test_reader_tells_effusion_sides_apart_at_128px():
    base = sample_spec(31_000, size=128, num_slices=72)
    for side in ("left", "right", "bilateral"):
        spec = PhantomSpec(
            **{**base.__dict__, "findings": [{"type": "effusion", "side": side, "depth_mm": 65.0}]}
        )
        vol, _ = make_phantom(spec)
        assert read_attributes(vol)["effusion"] == side


def test_reader_sees_emphysema_and_cardiomegaly_in_an_array_with_spacing():
    base = sample_spec(31_001, size=64, num_slices=80)
    spec = PhantomSpec(**{**base.__dict__, "findings": [{"type": "emphysema"}, {"type": "cardiomegaly"}]})
    vol, _ = make_phantom(spec)
    got = read_attributes(vol.array, spacing=vol.spacing)
    assert got["emphysema"] and got["cardiomegaly"]
    assert not got["consolidation"] and got["effusion"] == "none"


def test_a_volume_without_lungs_reads_as_normal():
    water = np.zeros((40, 64, 64), np.float32)
    got = read_attributes(water, spacing=(5.0, 5.0, 5.0))
    assert got["effusion"] == "none" and not any(got[k] for k in ATTRIBUTE_KEYS if k != "effusion")


def test_reader_refuses_non_3d_and_non_finite_input():
    with pytest.raises(CTFlowError, match="3D"):
        read_attributes(np.zeros((64, 64)))
    bad = np.zeros((10, 64, 64), np.float32)
    bad[0, 0, 0] = np.nan
    with pytest.raises(CTFlowError, match="NaN"):
        read_attributes(bad, spacing=(5.0, 5.0, 5.0))
    # an array's spacing was guessed (2.5, 5.5, 5.5 mm), which misread every 64 px phantom of a probe
    with pytest.raises(CTFlowError, match="needs its spacing"):
        read_attributes(np.zeros((10, 64, 64), np.float32))


def test_report_parser_recovers_ground_truth_from_phantom_reports(phantoms):
    for seed, _, gt in phantoms:
        rep = phantom_report(gt, seed)
        text = format_report(rep["Findings_EN"], rep["Impressions_EN"], gt["num_slices"], gt["spacing"][0])
        assert attributes_from_report(text) == attributes_from_ground_truth(gt), (seed, text)


@pytest.mark.parametrize(
    "text, key, value",
    [
        ("No pleural effusion was detected. Pericardial effusion was not observed.", "effusion", "none"),
        ("Pericardial effusion-thickening is absent. There is a left pleural effusion.", "effusion", "left"),
        ("Pleural effusion is seen on the right side.", "effusion", "right"),
        ("Pleural effusion is seen on both sides.", "effusion", "bilateral"),
        ("Heart size is normal.", "cardiomegaly", False),
        ("The heart is enlarged (cardiomegaly).", "cardiomegaly", True),
        ("No mass or nodule was detected in either lung.", "nodule", False),
        ("A 12 mm nodule is seen in the right upper lobe.", "nodule", True),
        ("No emphysematous change is seen.", "emphysema", False),
        ("Centrilobular emphysema is present in both lungs.", "emphysema", True),
        ("There is no consolidation in either lung.", "consolidation", False),
        ("An area of consolidation is seen in the left lower lobe.", "consolidation", True),
    ],
)
def test_report_parser_respects_negations(text, key, value):
    assert attributes_from_report(text)[key] == value


def test_attribute_accuracy_counts_exact_matches_per_key():
    a = {
        "effusion": "left",
        "cardiomegaly": True,
        "nodule": False,
        "emphysema": False,
        "consolidation": False,
    }
    b = {**a, "effusion": "bilateral", "nodule": True}
    acc = attribute_accuracy([a, a], [a, b])
    assert acc == {
        "effusion": 0.5,
        "cardiomegaly": 1.0,
        "nodule": 0.5,
        "emphysema": 1.0,
        "consolidation": 1.0,
    }
    with pytest.raises(CTFlowError, match="predictions"):
        attribute_accuracy([a], [a, b])


def test_finding_counts_separate_found_false_and_effusions_on_any_side():
    none = {
        "effusion": "none",
        "cardiomegaly": False,
        "nodule": False,
        "emphysema": False,
        "consolidation": False,
    }
    truth = [{**none, "effusion": "left", "nodule": True}, {**none, "effusion": "right"}, none]
    pred = [
        {**none, "effusion": "left"},
        {**none, "effusion": "bilateral", "nodule": True},
        {**none, "nodule": True},
    ]
    counts = finding_counts(pred, truth)
    assert counts["found"]["effusion"] == (1, 2) and counts["effusion_any_side"] == (2, 2)
    assert counts["found"]["nodule"] == (0, 1) and counts["false"]["nodule"] == 2
    assert counts["found"]["emphysema"] == (0, 0) and sum(counts["false"].values()) == 2
    with pytest.raises(CTFlowError, match="predictions"):
        finding_counts(pred, truth[:2])


def test_ground_truth_attributes_ignore_findings_outside_the_scan():
    gt = {
        "findings": [
            {"type": "nodule", "lobe": "right upper", "visible": False},
            {"type": "effusion", "side": "left", "visible": True},
        ]
    }
    got = attributes_from_ground_truth(gt)
    assert got["effusion"] == "left" and not got["nodule"]


def test_consolidation_regions_show_an_effusion_drawn_denser_than_fluid():
    from ctflow.data.phantom import LABEL_IDS, render_phantom
    from ctflow.data.volume import Volume
    from ctflow.eval.attributes import consolidation_regions

    base = sample_spec(31_002, size=64, num_slices=80)
    spec = PhantomSpec(
        **{**base.__dict__, "findings": [{"type": "effusion", "side": "right", "depth_mm": 65.0}]}
    )
    r = render_phantom(spec)
    assert read_attributes(r.volume)["effusion"] == "right"
    assert consolidation_regions(r.volume) == []  # fluid in its band is an effusion, not a consolidation
    # the same fluid 45 HU denser, as the embedded model draws much of it
    fluid = r.labels == LABEL_IDS["effusion"]
    dense = Volume(np.where(fluid, r.volume.array + 45.0, r.volume.array), r.volume.spacing)
    got = read_attributes(dense)
    assert got["consolidation"] and got["effusion"] == "none"
    (region, *_) = consolidation_regions(dense)
    z = np.nonzero(fluid.any((1, 2)))[0]
    assert region["posterior_share"] > 0.8 and 22.0 < region["median_hu"] < 150.0
    assert region["right_share"] > 0.9  # the patient's right, as the effusion
    assert z[0] <= region["slices"][0] <= region["slices"][1] <= z[-1]


def test_a_nodule_rule_is_fitted_on_given_volumes_and_swapped_into_the_reader(phantoms):
    from ctflow.eval.attributes import (
        NODULE_RULE_KEYS,
        attribute_scores,
        attributes_from_scores,
        calibrate_nodule_rule,
        reader_params,
    )

    cases = [(vol, gt) for _, vol, gt in phantoms[:24]]
    rule = calibrate_nodule_rule(cases)
    assert set(rule) == set(NODULE_RULE_KEYS) and all(np.isfinite(v).all() for v in rule.values())
    params = reader_params(rule)
    truth = [attributes_from_ground_truth(gt)["nodule"] for _, gt in cases]
    calls = [read_attributes(vol, params=params)["nodule"] for vol, _ in cases]
    # fitted on these very volumes, the rule reads at least as many of them right as it could by
    # calling no nodule at all, and it finds some
    assert sum(c == t for c, t in zip(calls, truth, strict=True)) >= max(sum(truth), len(truth) - sum(truth))
    assert any(c and t for c, t in zip(calls, truth, strict=True))
    # swapped in, only the nodule score changes
    never_rule = {**rule, "nodule_threshold": np.array([1e6], np.float32)}
    never = reader_params(never_rule)
    vol = cases[int(np.argmax(calls))][0]
    a, b = attribute_scores(vol, params=params), attribute_scores(vol, params=never)
    assert a["nodule_score"] > 0 > b["nodule_score"]
    assert {k: v for k, v in a.items() if k != "nodule_score"} == {
        k: v for k, v in b.items() if k != "nodule_score"
    }
    # scored beside the shipped rule in one read: the same scores as swapped in
    both = attribute_scores(vol, nodule_rules={"refit": rule, "never": never_rule})
    assert both["nodule_score_refit"] == a["nodule_score"] and both["nodule_score_never"] == b["nodule_score"]
    assert {k: v for k, v in both.items() if not k.startswith("nodule_score_")} == attribute_scores(vol)
    assert attributes_from_scores(both, "nodule_score_refit")["nodule"]
    assert not attributes_from_scores(both, "nodule_score_never")["nodule"]


def test_a_nodule_rule_needs_volumes_with_and_without_nodules_and_all_its_parts(phantoms):
    from ctflow.eval.attributes import attribute_scores, calibrate_nodule_rule, reader_params

    clear = [(vol, gt) for _, vol, gt in phantoms if not attributes_from_ground_truth(gt)["nodule"]][:3]
    with pytest.raises(CTFlowError, match="with and without a visible nodule"):
        calibrate_nodule_rule(clear)
    with pytest.raises(CTFlowError, match="nodule rule holds"):
        reader_params({"nodule_weight": np.zeros(3)})
    with pytest.raises(CTFlowError, match="nodule rule holds"):
        attribute_scores(clear[0][0], nodule_rules={"partial": {"nodule_weight": np.zeros(3)}})


def test_nodule_samples_find_the_nodule_of_a_volume_the_reader_resamples():
    from ctflow.data.phantom import render_phantom
    from ctflow.eval.attributes import _nodule_samples, _Scan

    base = sample_spec(31_004, size=128, num_slices=60)
    spec = PhantomSpec(
        **{**base.__dict__, "findings": [{"type": "nodule", "lobe": "right lower", "size_mm": 20.0}]}
    )
    r = render_phantom(spec)
    scan = _Scan(r.volume)  # read on the 64 px grid
    feats, near, has = _nodule_samples(scan, r.ground_truth["findings"], r.volume.array.shape)
    assert has and near.any() and len(near) == len(feats)
    # the centre taken as if on the 64 px grid lands elsewhere: the candidates by the nodule are missed
    _, near_unscaled, _ = _nodule_samples(scan, r.ground_truth["findings"], (60, 64, 64))
    assert not near_unscaled[near].all()


def test_calibration_refuses_phantom_sizes_it_cannot_stride_to_the_reader_grid():
    from ctflow.eval.attributes import calibrate_reader

    with pytest.raises(CTFlowError, match="multiple of 64 pixels wide, got 96"):
        calibrate_reader([1], size=96)
