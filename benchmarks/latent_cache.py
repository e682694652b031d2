"""Memory of flow training's data: the latent cache read on demand vs held in memory.

Synthetic caches of full-size-shaped latents (16 channels, 32x32, 40-199 slices, shards of 32
volumes; 3.9 MB per volume in fp16) of two sizes are read by the trainer's chunk sampler, each in a
fresh process:

* ``on-demand``: ``LatentCache`` as the trainer uses it (a volume is read from its memory-mapped
  shard when a batch draws it);
* ``in-memory``: every volume loaded first and then sampled (what the cache did before it read on
  demand).

Each process draws ``--batches`` batches of 16 chunks. Reported per mode and size: the process's
anonymous memory after the batches (``RssAnon``: what it holds itself, what runs out first), its peak
RSS (``VmHWM``, which also counts the pages of the memory-mapped shards it touched: page cache the
kernel can drop) and seconds per batch. Goals: from the small to the large cache, on-demand anonymous
memory grows by under a tenth of what the cache grows on disk (a ratio of totals would hide growth
under the ~500 MB torch itself holds), and an on-demand batch costs < 2x an in-memory one (a
full-size training step is seconds, a batch draw a tenth of one).

    python benchmarks/latent_cache.py [--sizes 64 256] [--batches 20]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_rss_mb, refuse_unnamed_variant, synthetic_cache, write_result  # noqa: E402

SHAPE = {"channels": 16, "size": 32, "text_dim": 768, "slices": (40, 200), "shard_size": 32}


class InMemory:
    """Every volume of a LatentCache loaded up front, with the interface the sampler reads."""

    def __init__(self, cache):
        self.eos, self.rows, self.volumes = cache.eos, cache.rows, list(cache)

    def tensor(self, i: int, key: str):
        return getattr(self.volumes[i], key)

    def __len__(self) -> int:
        return len(self.volumes)

    def num_slices(self, i: int) -> int:
        return self.volumes[i].num_slices


def child(mode: str, folder: Path, batches: int) -> dict:
    import torch

    from ctflow.train.config import FlowTrainConfig
    from ctflow.train.flow_trainer import ChunkSampler
    from ctflow.train.latents import LatentCache

    torch.set_num_threads(1)
    cache = LatentCache(folder)
    if mode == "in-memory":
        cache = InMemory(cache)
    sampler = ChunkSampler(cache, 16, FlowTrainConfig())
    g = torch.Generator().manual_seed(0)
    sampler.batch(16, g)  # warm-up
    t0 = time.perf_counter()
    for _ in range(batches):
        sampler.batch(16, g)
    return {
        "sec_per_batch": round((time.perf_counter() - t0) / batches, 4),
        "anon_mb": round(peak_rss_mb(key="RssAnon"), 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--sizes", type=int, nargs=2, default=[64, 256], help="volumes in the small and large cache"
    )
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--child", nargs=2, metavar=("MODE", "CACHE"), help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help="result name (needed with other options than the defaults)")
    args = p.parse_args()
    if not args.child:
        refuse_unnamed_variant(p, args)
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]), args.batches)))
        sys.exit(0)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            folder = synthetic_cache(Path(tmp) / f"cache{n}", n=n, **SHAPE)
            disk = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
            for mode in ("on-demand", "in-memory"):
                cmd = [sys.executable, __file__, "--child", mode, str(folder), "--batches", str(args.batches)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                results[f"{mode} {n}"] = {**json.loads(out.splitlines()[-1]), "cache_mb": round(disk, 1)}
                print(f"{mode:>9} {n:4d} volumes ({disk:.0f} MB): {results[f'{mode} {n}']}", flush=True)
    small, large = args.sizes
    growth = {
        mode: round(results[f"{mode} {large}"]["anon_mb"] / results[f"{mode} {small}"]["anon_mb"], 3)
        for mode in ("on-demand", "in-memory")
    }
    # anonymous memory added per MB the cache added on disk: ~0 when read on demand, ~1+ when held
    added_share = {
        mode: round(
            (results[f"{mode} {large}"]["anon_mb"] - results[f"{mode} {small}"]["anon_mb"])
            / (results[f"{mode} {large}"]["cache_mb"] - results[f"{mode} {small}"]["cache_mb"]),
            3,
        )
        for mode in ("on-demand", "in-memory")
    }
    time_ratio = (
        results[f"on-demand {large}"]["sec_per_batch"] / results[f"in-memory {large}"]["sec_per_batch"]
    )
    out = {
        "shape": {k: list(v) if isinstance(v, tuple) else v for k, v in SHAPE.items()},
        "batch_size": 16,
        "chunk_slices": 16,
        "by_mode_and_size": results,
        "anon_memory_growth": growth,
        "anon_memory_added_per_cache_mb": added_share,
        "on_demand_vs_in_memory_batch_time": round(time_ratio, 3),
        "goals": {"on_demand_anon_memory_added_per_cache_mb": 0.1, "batch_time_ratio": 2.0},
        "passed": added_share["on-demand"] < 0.1 and time_ratio < 2.0,
    }
    write_result(args.result or "latent_cache", out)
    return out


if __name__ == "__main__":
    main()
