"""Atomic training checkpoints in safetensors, keeping the last k.

A checkpoint is a folder ``step_0000500/`` holding ``state.safetensors``
(model, EMA and optimizer tensors) and ``state.json`` (step, config and the
optimizer's scalar state). It is written to a temporary folder and renamed, so
a run killed at any moment (even SIGKILL) leaves either the previous or the
new checkpoint, never a torn one. Nothing is unpickled on resume.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ctflow.errors import CTFlowError
from ctflow.files import atomic_dir, remove_temporaries

STEP_DIR = re.compile(r"^step_(\d{7})$")


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON scalars."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, pstate in state["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{key}"] = value.contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def load_optimizer_tensors(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict
) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for name, value in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    folder: str | Path,
    step: int,
    modules: dict[str, torch.nn.Module | dict[str, torch.Tensor]],
    optimizers: dict[str, torch.optim.Optimizer],
    info: dict,
    keep: int = 2,
) -> Path:
    """Write ``folder/step_XXXXXXX`` atomically and delete all but the newest ``keep``."""
    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in modules.items():
        sd = module.state_dict() if hasattr(module, "state_dict") else module
        tensors.update({f"{prefix}/{k}": v.detach().cpu().contiguous() for k, v in sd.items()})
    opt_meta = {}
    for prefix, opt in optimizers.items():
        t, meta = optimizer_tensors(opt)
        tensors.update({f"{prefix}/{k}": v.cpu() for k, v in t.items()})
        opt_meta[prefix] = meta
    target = folder / f"step_{step:07d}"
    with atomic_dir(target, overwrite=True) as tmp:
        save_file(tensors, tmp / "state.safetensors")
        (tmp / "state.json").write_text(json.dumps({"step": step, "optimizers": opt_meta, **info}, indent=1))
    for old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of killed runs are ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [
        p for p in folder.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "state.json").exists()
    ]
    return sorted(found, key=lambda p: p.name)


def load_checkpoint(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Return ``({prefix: tensors}, info)`` of one checkpoint folder."""
    path = Path(path)
    flat = load_file(path / "state.safetensors")
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in flat.items():
        prefix, key = name.split("/", 1)
        groups.setdefault(prefix, {})[key] = value
    return groups, json.loads((path / "state.json").read_text())


def restore(path, modules: dict, optimizers: dict) -> dict:
    """Load a checkpoint into modules/optimizers in place; return its info. The optimizers keep the
    hyperparameters they were built with (the run's config: a fine-tune resuming from an earlier
    stage's checkpoint takes its own weight decay and betas); their state comes back, and the learning
    rate, which is where the schedule had reached."""
    groups, info = load_checkpoint(path)
    if missing := [prefix for prefix in modules if prefix not in groups]:  # (an unused optimizer has none)
        raise CTFlowError(
            f"checkpoint {path} holds no {missing[0]} (it holds {', '.join(sorted(groups))}): it is another"
            " trainer's run; resume the run this command wrote, or train into a new --out"
        )
    for prefix, module in modules.items():
        try:
            module.load_state_dict(groups[prefix])
        except RuntimeError as e:  # torch lists every mismatched tensor: name the first
            lines = [ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()]
            raise CTFlowError(
                f"checkpoint {path} holds a {prefix} of another shape than this config builds"
                f" ({lines[0] if lines else e}); resume with the run's own model settings (its"
                " config.json) or train into a new --out"
            ) from None
    for prefix, opt in optimizers.items():
        restored = ("params", "lr", "initial_lr")  # the rest of a group is the run's own
        settings = [{k: v for k, v in g.items() if k not in restored} for g in opt.param_groups]
        load_optimizer_tensors(opt, groups.get(prefix, {}), info["optimizers"][prefix])
        for group, own in zip(opt.param_groups, settings, strict=True):
            group.update(own)
    return info


def clean_partial(folder: str | Path) -> None:
    """Remove temporary folders left by a killed run: half-written checkpoints, and beside them, in the
    run folder, a half-written transformer/ or vae/."""
    folder = Path(folder)
    if folder.is_dir():  # a run's checkpoints: the folder above is a run ctflow owns
        for p in folder.glob(".step_*.tmp"):
            shutil.rmtree(p, ignore_errors=True)
        remove_temporaries(folder.parent)
