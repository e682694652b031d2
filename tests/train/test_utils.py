import math

import torch

from ctflow.train.utils import EMA, lr_lambda, machine, matmul_gflops, step_generator


def test_lr_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    f = lr_lambda(warmup=10, total=110, min_ratio=0.1)
    assert f(0) == 0.1 and f(4) == 0.5 and f(9) == 1.0
    assert f(10) == 1.0
    assert math.isclose(f(60), 0.1 + 0.9 * 0.5)  # half way through the decay
    assert math.isclose(f(110), 0.1) and math.isclose(f(500), 0.1)  # held at the floor past the end


def test_ema_moves_a_share_of_the_way_and_copies_integer_buffers():
    model = torch.nn.BatchNorm1d(2)
    ema = EMA(model, decay=0.75)
    with torch.no_grad():
        model.weight.fill_(5.0)  # starts at 1
    model.num_batches_tracked.fill_(7)
    ema.update(model)
    assert torch.allclose(ema.shadow["weight"], torch.full((2,), 2.0))  # 1 + 0.25 x (5 - 1)
    assert int(ema.shadow["num_batches_tracked"]) == 7
    other = torch.nn.BatchNorm1d(2)
    ema.copy_to(other)
    assert torch.allclose(other.weight, torch.full((2,), 2.0))


def test_step_generator_replays_a_step_and_differs_across_steps_and_ranks():
    draw = lambda *a: torch.rand(3, generator=step_generator(*a))  # noqa: E731
    assert torch.equal(draw(0, 5), draw(0, 5))
    assert not torch.equal(draw(0, 5), draw(0, 6))
    assert not torch.equal(draw(0, 5, 0), draw(0, 5, 1))
    assert not torch.equal(draw(0, 5), draw(1, 5))


def test_machine_describes_the_cpu_and_measures_matmul_throughput():
    info = machine()
    assert info["cpu"] and info["cpu_count"] >= 1 and info["torch_threads"] == torch.get_num_threads()
    assert set(info["cpu_features"]) <= {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}
    assert info["matmul_gflops_fp32"] > 0
    assert matmul_gflops(size=64, seconds=0.01) > 0


def test_machine_without_cpuinfo_falls_back_to_platform(monkeypatch):
    import platform

    from ctflow.train import utils

    monkeypatch.setattr(utils, "_cpuinfo", lambda field: None)  # not Linux
    assert utils.cpu_name() == (platform.processor() or platform.machine())
    monkeypatch.setattr(utils, "matmul_gflops", lambda: 1.0)
    assert utils.machine()["cpu_features"] == []
    flags = {"flags": "fpu avx2 sse avx512f", "model name": "Some CPU"}
    monkeypatch.setattr(utils, "_cpuinfo", flags.get)
    assert utils.machine()["cpu_features"] == ["avx2", "avx512f"] and utils.cpu_name() == "Some CPU"


def test_step_bar_writes_plain_lines_to_stderr_where_there_is_no_terminal(capsys, monkeypatch):
    """Under nohup or into a job's log file the rich bar showed nothing until the run ended."""
    from ctflow.train.utils import StepBar

    monkeypatch.delenv("CTFLOW_PROGRESS", raising=False)
    bar = StepBar(True, "train", total=10, start=0, every=0.0)
    for step in (1, 5, 10):
        bar.update(step, loss=0.5)
    bar.close()
    bar.close()  # twice, as a finally after a normal end does
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines()[0].startswith("train step 1/10 loss 0.5000 eta")
    assert len(err.splitlines()) == 3 and "step 10/10" in err
    quiet = StepBar(True, "train", total=10, start=0)  # every 30 s: nothing between the first and last
    quiet.update(3, loss=0.5)
    quiet.update(10, loss=0.4)
    assert [line.split(" loss")[0] for line in capsys.readouterr().err.splitlines()] == ["train step 10/10"]
