"""The options every generation benchmark takes (benchmarks/common.py)."""

import sys

import torch

from tests.benchmark_module import load_benchmark
from tests.tiny_pipeline import tiny_pipeline


def test_shift_replaces_the_models_sampler_schedule_and_is_recorded(tmp_path, monkeypatch):
    common = load_benchmark("common")
    tiny_pipeline().save_pretrained(tmp_path / "model")
    threads = torch.get_num_threads()
    try:
        schedules = {}
        for shift in (None, 3.0):
            argv = ["bench", "--model", str(tmp_path / "model"), "--result", "t"] + (
                [] if shift is None else ["--shift", str(shift)]
            )
            monkeypatch.setattr(sys, "argv", argv)
            args, pipe = common.generation_setup(4, "test")
            pipe.scheduler.set_timesteps(10)
            schedules[shift] = pipe.scheduler.sigmas.clone()
            assert common.generation_settings(args)["shift"] == shift
    finally:
        torch.set_num_threads(threads)
    # the same 10 steps from t = 1 to 0, spent nearer the noise end with shift 3
    assert schedules[None][0] == schedules[3.0][0] == 1.0
    assert torch.all(schedules[3.0][1:-1] > schedules[None][1:-1])


def test_dtype_casts_the_pipeline_and_is_recorded(tmp_path, monkeypatch):
    common = load_benchmark("common")
    tiny_pipeline().save_pretrained(tmp_path / "model")
    threads = torch.get_num_threads()
    try:
        for dtype, want in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            argv = ["bench", "--model", str(tmp_path / "model"), "--dtype", dtype, "--result", "t"]
            monkeypatch.setattr(sys, "argv", argv)
            args, pipe = common.generation_setup(4, "test")
            assert pipe.dtype == want and next(pipe.vae.parameters()).dtype == want
            assert common.generation_settings(args).get("dtype") == (None if dtype == "float32" else dtype)
    finally:
        torch.set_num_threads(threads)


def test_options_off_their_defaults_need_a_result_name_of_their_own(monkeypatch):
    """Without one they wrote over the stored figures the docs quote (embedded_quality.json from a
    --n 1 --dtype bfloat16 run); --guidance names its own file and needs none."""
    import pytest

    common = load_benchmark("common")
    for argv, refused in (
        (["bench", "--n", "1", "--dtype", "bfloat16"], "--n, --dtype given: pass --result NAME too"),
        (["bench", "--steps", "3"], "--steps given: pass --result NAME too"),
    ):
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit, match=refused):
            common.generation_setup(4, "test")
