"""A check, runnable on a CPU-only machine, that code creates its tensors on the device it was given:
every torch factory call made directly from the watched files must name its ``device``."""

from __future__ import annotations

import sys
from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode

FACTORIES = {
    torch.tensor,
    torch.zeros,
    torch.ones,
    torch.full,
    torch.arange,
    torch.empty,
    torch.randn,
    torch.rand,
}


@contextmanager
def tensors_made_without_a_device(*files: str):
    """Yield a list that fills with ``"file.py:line factory"`` for each factory call made directly
    from a file whose path ends with one of ``files`` without a ``device`` argument."""
    found: list[str] = []

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in FACTORIES and "device" not in kwargs:
                frame = sys._getframe(1)
                path = frame.f_code.co_filename.replace("\\", "/")
                if path.endswith(files):
                    found.append(f"{path.rsplit('/', 1)[-1]}:{frame.f_lineno} {func.__name__}")
            return func(*args, **kwargs)

    with Watch():
        yield found
