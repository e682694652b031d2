"""Where the models run: ``--device`` and ``--dtype`` of the commands that load a model."""

from __future__ import annotations

import os

import torch

from ctflow.errors import CTFlowError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """``--device`` as a torch device: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``. A plain ``cuda`` under
    ``torchrun`` or ``accelerate launch`` is this process's GPU (``LOCAL_RANK``), so a prompts CSV
    split across processes puts each process on its own GPU."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CTFlowError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CTFlowError(
                f"--device {name}: this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu, "
                "or install a CUDA build of torch on a machine with a GPU"
            )
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if device.index >= torch.cuda.device_count():
            raise CTFlowError(
                f"--device {device}: only {torch.cuda.device_count()} CUDA GPUs are visible (cuda:0 on)"
            )
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise CTFlowError(f"--device {name}: this machine has no Apple GPU; use --device cpu")
    elif device.type != "cpu":
        raise CTFlowError(f"--device {name!r}: ctflow runs on cpu, cuda or mps")
    return device


def resolve_dtype(name: str) -> torch.dtype:
    """``--dtype`` as a torch dtype: float32, bfloat16 or float16 (the models' weights; the ODE stays float32)."""
    if name not in DTYPES:
        raise CTFlowError(f"--dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]
