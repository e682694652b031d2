import pytest
import torch

from ctflow.device import resolve_device, resolve_dtype
from ctflow.errors import CTFlowError
from tests.conftest import assert_clean_error


def test_plain_cuda_means_this_process_gpu(monkeypatch):
    """Under torchrun each process takes the GPU of its LOCAL_RANK; a GPU index past the visible ones
    is refused (CUDA faked: these machines have none)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(CTFlowError, match="only 2 CUDA GPUs"):
        resolve_device("cuda:2")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("bfloat16") == torch.bfloat16


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "xla", "cuda"])
def test_bad_or_missing_devices_are_refused(name):
    with pytest.raises(CTFlowError, match="--device"):
        resolve_device(name)  # "cuda" too: the CPU build of torch these tests run on sees no GPU


@pytest.mark.parametrize("command", ["encode", "train-vae"])
def test_encode_and_train_vae_take_a_device(command, tmp_path, run_cli):
    args = ["--data", tmp_path / "none", "--out", tmp_path / "out", "--device", "cuda"]
    if command == "encode":
        args += ["--vae", tmp_path / "novae"]
    assert_clean_error(run_cli(command, *args), "no CUDA GPU")
    assert not (tmp_path / "out").exists()
