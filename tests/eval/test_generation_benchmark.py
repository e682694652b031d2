"""benchmarks/generation.py's comparison helper."""

from tests.benchmark_module import load_benchmark


def test_take_turns_warms_up_alternates_and_reports_medians(monkeypatch):
    generation = load_benchmark("generation")
    clock, order = [0.0], []
    costs = {"fast": [1.0, 1.0, 30.0, 1.0, 1.0], "slow": [10.0] * 5}  # one outlier among the fast runs
    monkeypatch.setattr(generation.time, "perf_counter", lambda: clock[0])

    def run(name):
        def call():
            order.append(name)
            calls = order.count(name)
            if calls > 1:  # the first call is the warm-up
                clock[0] += costs[name][calls - 2]

        return call

    median = generation.take_turns({"fast": run("fast"), "slow": run("slow")}, turns=5)
    assert order[:2] == ["fast", "slow"]  # one warm-up each
    turns = [order[2 + 2 * i : 4 + 2 * i] for i in range(5)]
    assert turns == [["slow", "fast"], ["fast", "slow"]] * 2 + [["slow", "fast"]]  # alternating order
    assert median == {"fast": 1.0, "slow": 10.0}  # the outlier does not move the median
