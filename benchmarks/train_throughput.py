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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import synthetic_cache, write_result  # noqa: E402

from ctflow.train.config import FlowTrainConfig, load_config  # noqa: E402
from ctflow.train.flow_trainer import train_flow  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


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
        cache = real if (real / "index.json").exists() else synthetic_cache(tmp / "cache", report_variants=4)
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
