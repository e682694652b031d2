"""Flow-training throughput: seconds per step and the share of time spent waiting for data.

Trains the embedded model's configuration (configs/tiny-phantom.yaml) for a few
steps on a latent cache (the one `make train-default` wrote, or a synthetic one
of the same shapes) and reads the trainer's own JSONL log. Goal: data wait
< 10% of step time. Also compares the two context modes at the same size.

    python benchmarks/train_throughput.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from ctflow.train.config import FlowTrainConfig, load_config  # noqa: E402
from ctflow.train.flow_trainer import train_flow  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def synthetic_cache(
    folder: Path, n: int = 64, channels: int = 8, size: int = 16, text_dim: int = 384
) -> Path:
    g = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True)
    save_file({"eos": torch.ones(channels, size, size)}, folder / "eos.safetensors")
    tensors, rows = {}, []
    for i in range(n):
        name, s = f"train_{i + 1}_a_1.nii.gz", 40 + i % 80
        tensors[f"{name}.latents"] = torch.randn(channels, s, size, size, generator=g).half()
        for suffix in ("", "_nometa"):
            tensors[f"{name}.tokens{suffix}"] = torch.randn(90, text_dim, generator=g).half()
            tensors[f"{name}.pooled{suffix}"] = torch.randn(text_dim, generator=g)
        rows.append({"name": name, "report": "", "num_slices": s, "spacing": [2.5, 5.0, 5.0], "labels": None})
    save_file(tensors, folder / "shard_00000.safetensors")
    (folder / "shard_00000.json").write_text(json.dumps(rows))
    (folder / "index.json").write_text(json.dumps({"text_dim": text_dim, "volumes": rows}))
    return folder


def run(cache: Path, config: FlowTrainConfig, work: Path) -> dict:
    train_flow(cache, config, work, progress=False)
    records = [json.loads(x) for x in (work / "log.jsonl").read_text().splitlines()]
    steady = [r for r in records if "sec_per_step" in r][1:]  # drop the first window (warm-up)
    sec = sum(r["sec_per_step"] for r in steady) / len(steady)
    share = sum(r["data_share"] for r in steady) / len(steady)
    return {"sec_per_step": round(sec, 4), "data_share": round(share, 4)}


if __name__ == "__main__":
    torch.set_num_threads(2)
    base = load_config(ROOT / "configs/tiny-phantom.yaml", FlowTrainConfig)
    real = ROOT / "runs/default/latents"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = real if (real / "index.json").exists() else synthetic_cache(tmp / "cache")
        cfg = replace(base, steps=40, log_every=10, checkpoint_every=10**6)
        results = {}
        for mode in ("concat", "tokens"):
            c = replace(cfg, transformer={**cfg.transformer, "context": mode})
            results[mode] = run(cache, c, tmp / mode)
    out = {
        "cache": "runs/default/latents" if cache == real else "synthetic (same shapes)",
        "batch_size": cfg.batch_size,
        "by_context_mode": results,
        "tokens_vs_concat_time_ratio": round(
            results["tokens"]["sec_per_step"] / results["concat"]["sec_per_step"], 3
        ),
        "goal_data_share": 0.10,
        "passed": all(r["data_share"] < 0.10 for r in results.values()),
    }
    write_result("train_throughput", out)
