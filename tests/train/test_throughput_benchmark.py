"""benchmarks/train_throughput.py's helpers: the alternating comparison and the run-log reading."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from ctflow.train.config import FlowTrainConfig, load_config
from tests.benchmark_module import load_benchmark

ROOT = Path(__file__).resolve().parents[2]


def test_alternating_runs_each_variant_on_its_own_changed_model(tmp_path):
    common, bench = load_benchmark("common"), load_benchmark("train_throughput")
    config = replace(load_config(ROOT / "configs" / "tiny-phantom.yaml", FlowTrainConfig), batch_size=4)
    cache = common.synthetic_cache(tmp_path / "c", n=4, report_variants=4, finding_masks=True)
    seen = {"plain": [], "changed": []}

    def recording(name):
        def prepare(model):
            forward = model.forward

            def wrapped(x, *args, **kwargs):
                seen[name].append((id(model), x.shape[0]))
                return forward(x, *args, **kwargs)

            model.forward = wrapped

        return prepare

    times = bench.alternating(
        cache,
        {"plain": (config, True), "changed": (config, True)},
        steps=2,
        prepare={"changed": recording("changed"), "plain": recording("plain")},
    )
    assert set(times) == {"plain_sec", "changed_sec"} and all(t > 0 for t in times.values())
    # two warm-up steps and two timed ones, the whole batch in one pass, each variant its own model
    assert [rows for _, rows in seen["plain"]] == [4] * 4 == [rows for _, rows in seen["changed"]]
    assert len({m for m, _ in seen["plain"]} | {m for m, _ in seen["changed"]}) == 2


def test_run_log_leaves_out_the_first_window(tmp_path):
    bench = load_benchmark("train_throughput")
    records = [
        {"step": 10 * i, "sec_per_step": s, "data_share": d}
        for i, (s, d) in enumerate([(9.0, 0.9), (0.2, 0.05), (0.4, 0.15)], start=1)
    ]
    records.append({"step": 30, "processes": 2, "replicas_identical": True})
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = bench.run_log(tmp_path)
    assert out["sec_per_step"] == pytest.approx(0.3) and out["data_share"] == pytest.approx(0.1)


def test_ddp_comparison_takes_turns_and_reports_medians(tmp_path, monkeypatch):
    bench = load_benchmark("train_throughput")
    order, seconds = [], {"one": iter([0.5, 0.3, 0.32]), "ddp": iter([0.31, 0.33, 0.34])}

    def fake(name):
        def launch(cache, config, work):
            order.append((name, work.name))
            return {"sec_per_step": next(seconds[name]), "data_share": 0.0}

        return launch

    monkeypatch.setattr(bench, "run", fake("one"))
    monkeypatch.setattr(bench, "ddp_run", fake("ddp"))
    out = bench.ddp_against_one(tmp_path / "cache", None, tmp_path / "ddp.yaml", tmp_path, rounds=3)
    # each round's first launch swapped, each run in its own folder
    assert order == [
        ("one", "one0"),
        ("ddp", "ddp0"),
        ("ddp", "ddp1"),
        ("one", "one1"),
        ("one", "one2"),
        ("ddp", "ddp2"),
    ]
    # the median, not the first pair (0.5 against 0.31 would read 0.62x)
    assert out["one_process_sec_per_step"] == 0.32 and out["ddp_sec_per_step"] == 0.33
    assert out["rounds"] == {"one_process": [0.5, 0.3, 0.32], "ddp": [0.31, 0.33, 0.34]}
