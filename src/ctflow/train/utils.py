"""Pieces both trainers share: LR schedule, EMA, per-step generators, progress bar, JSONL log."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

from ctflow.errors import CTFlowError
from ctflow.files import write_text_atomic


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warmup to 1, then cosine decay to ``min_ratio``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """All randomness of one training step: resuming at ``step`` replays it exactly."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 7919 + rank * 104_729)


class EMA:
    """Exponential moving average of a model's parameters (float32 shadow copy)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v.float(), 1 - self.decay)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.shadow = {k: v.clone() for k, v in state.items()}

    def to(self, device: torch.device | str) -> EMA:
        """Move the shadow weights to ``device`` (where the model trains); returns the EMA."""
        self.shadow = {k: v.to(device) for k, v in self.shadow.items()}
        return self

    def copy_to(self, model: torch.nn.Module) -> None:
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in self.shadow.items()})


CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def _cpuinfo(field: str) -> str | None:
    """The first value of ``field`` in ``/proc/cpuinfo`` (Linux), else None."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == field:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what :mod:`platform` says."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def matmul_gflops(size: int = 1024, seconds: float = 0.5) -> float:
    """fp32 matrix-multiply throughput (GFLOP/s) with torch's current threads: a yardstick that puts
    times measured on different machines side by side (2-core machines here have differed 1.7x)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    runs, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or runs < 3:
        a @ b
        runs += 1
    return round(2 * size**3 * runs / elapsed / 1e9, 1)


def machine() -> dict:
    """The machine a timing was taken on: CPU model, cores, torch threads, the vector and matrix
    instructions torch can use (from ``/proc/cpuinfo`` flags) and :func:`matmul_gflops`."""
    flags = set((_cpuinfo("flags") or "").split())
    return {
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_features": [f for f in CPU_FEATURES if f in flags],
        "matmul_gflops_fp32": matmul_gflops(),
    }


def check_run_folder(out, resume: bool) -> Path:
    """A trainer's ``--out``: a folder, new or empty unless ``resume``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CTFlowError(f"{out} is a file; --out names the run's folder")
    if out.exists() and any(out.iterdir()) and not resume:
        raise CTFlowError(f"{out} is not empty; pass --resume to continue that run or choose a new --out")
    return out


def final_weights_due(folder: Path, step: int, start: int, steps: int) -> bool:
    """Whether a trainer writes its final weights into ``folder``: this call took the run to its last
    step, or an earlier one did without leaving them (a stop mid-write). A resume of a finished run
    writes nothing."""
    return step >= steps and (step > start or not any(Path(folder).glob("*.safetensors")))


def resume_note(step: int, total: int, checkpoints: Path) -> str:
    """What a trainer says when ``--resume`` starts: the step it goes on from, or that there was no
    checkpoint (a mistyped --out would otherwise start a new run unnoticed)."""
    if step:
        return f"resuming from step {step} of {total}"
    return f"no checkpoint in {checkpoints}: starting from step 0"


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def trim_log(path: Path, step: int) -> None:
    """Drop a training log's records past ``step`` (a resume from that step's checkpoint writes them
    again); unreadable lines (a write cut by a kill) go too."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    write_text_atomic(path, "".join(f"{line}\n" for line in kept), overwrite=True)


class StepBar:
    """Progress over training steps with the latest loss, on stderr (no-op when disabled): a rich bar
    in a terminal; elsewhere (nohup, a job's log file) a plain line every ``every`` seconds and at the
    end, where a bar would show nothing until the run was over."""

    def __init__(self, enabled: bool, name: str, total: int, start: int, every: float = 30.0):
        self.progress, self.plain = None, False
        if not enabled:
            return
        from rich.console import Console

        from ctflow.progress import show_bar

        console = Console(stderr=True)
        if not show_bar(console):
            self.plain, self.name, self.total, self.start, self.every = True, name, total, start, every
            self.t0 = self.shown = time.monotonic()
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn(name),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
        )
        self.task = self.progress.add_task(name, total=total, completed=start, loss="-")
        self.progress.start()

    def update(self, step: int, loss: float) -> None:
        now = time.monotonic()
        if self.progress:
            self.progress.update(self.task, completed=step, loss=f"{loss:.4f}")
        elif self.plain and (now - self.shown >= self.every or step >= self.total):
            self.shown = now
            eta = (now - self.t0) / max(1, step - self.start) * (self.total - step)
            print(
                f"{self.name} step {step}/{self.total} loss {loss:.4f} eta {eta / 60:.1f} min",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        """Stop the bar (and show the cursor again); safe to call twice, as a ``finally`` does."""
        if self.progress:
            self.progress.stop()
            self.progress = None
