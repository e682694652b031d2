"""Nodule counts of the benchmarks under the reader's nodule rule fitted through the VAE."""

import pytest

from tests.benchmark_module import load_benchmark


def test_nodule_pairs_counts_both_rules_calls():
    pairs = load_benchmark("nodule_pairs")

    def read(score, call, refitted):
        return {"score": score, "nodule": call, "nodule_vae_rule": refitted}

    rows = [
        {"nodule": read(0.5, True, True), "clear": read(0.2, True, False)},
        {"nodule": read(-1.0, False, False), "clear": read(-0.5, False, False)},
    ]
    out = pairs.summary(rows)
    assert (out["found"], out["false"], out["found_vae_rule"], out["false_vae_rule"]) == (1, 1, 1, 0)
    assert out["pairs_following_report"] == 1 and out["mean_score_shift"] == pytest.approx((0.3 - 0.5) / 2)
    older = [{key: {k: v for k, v in r[key].items() if k != "nodule_vae_rule"} for key in r} for r in rows]
    assert "found_vae_rule" not in pairs.summary(older)


def test_nodule_pairs_skips_seeds_without_a_placed_nodule_and_numbers_the_rest(monkeypatch):
    pairs = load_benchmark("nodule_pairs")
    placed = {10: "a", 12: "b", 13: "c", 15: "d"}  # seeds 11 and 14 place no nodule
    calls = []

    def pair(seed, i):
        calls.append((seed, i))
        return placed.get(seed)

    monkeypatch.setattr(pairs, "pair", pair)
    assert list(pairs.pairs(10, 3)) == [(0, 10, "a"), (1, 12, "b"), (2, 13, "c")]
    # a skipped seed is tried with the next pair's index (its lobe and size follow the index)
    assert calls == [(10, 0), (11, 1), (12, 1), (13, 2)]
    assert list(pairs.pairs(10, 0)) == []


def test_nodule_calls_are_counted_by_whether_the_report_names_one():
    common = load_benchmark("common")
    rows = [
        {"truth": {"nodule": True}, "nodule_vae_rule": True},
        {"truth": {"nodule": True}, "nodule_vae_rule": False},
        {"truth": {"nodule": False}, "nodule_vae_rule": True},
        {"truth": {"nodule": False}, "nodule_vae_rule": False},
        {"truth": {"nodule": False}, "nodule_vae_rule": False},
    ]
    assert common.nodule_calls(rows, "nodule_vae_rule") == {"found": [1, 2], "false": [1, 3]}


def test_vae_nodule_rule_is_kept_per_vae_and_read_back(tmp_path, monkeypatch):
    import numpy as np
    import torch

    import ctflow.eval.attributes as attributes
    from tests.tiny_pipeline import tiny_pipeline

    common = load_benchmark("common")
    fits = []

    def fake_fit(cases):
        volumes = list(cases)
        fits.append(len(volumes))
        return {k: np.full(3, 0.1 * len(fits), np.float32) for k in attributes.NODULE_RULE_KEYS}

    monkeypatch.setattr(attributes, "calibrate_nodule_rule", fake_fit)
    pipe = tiny_pipeline()
    first = common.vae_nodule_rule(pipe, n=2, cache=tmp_path)
    again = common.vae_nodule_rule(pipe, n=2, cache=tmp_path)
    assert fits == [2] and len(list(tmp_path.glob("vae_nodule_rule_*.json"))) == 1
    assert set(again) == set(attributes.NODULE_RULE_KEYS)
    assert all(again[k].dtype == np.float32 and np.array_equal(again[k], first[k]) for k in first)
    common.vae_nodule_rule(pipe, n=1, cache=tmp_path)  # other seeds: fitted again
    with torch.no_grad():
        next(pipe.vae.parameters()).add_(1.0)  # another VAE: fitted again
    changed = common.vae_nodule_rule(pipe, n=2, cache=tmp_path)
    assert fits == [2, 1, 2] and not np.array_equal(changed["nodule_bias"], first["nodule_bias"])
    common.vae_nodule_rule(pipe, n=1, cache=None)  # not kept
    assert fits == [2, 1, 2, 1] and len(list(tmp_path.glob("*.json"))) == 3
