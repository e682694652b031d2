"""Generation speed and memory, as ratios within one run.

* context-cache speedup: a token-context transformer sampling one chunk with
  the context keys/values computed once per chunk vs recomputed at every ODE
  step (goal >= 1.6x);
* forward-pass share: fraction of `pipe(...)` time spent inside the
  transformer's forward (goal >= 85%: the loop adds little overhead);
* time vs number of ODE steps (should be ~linear);
* peak memory vs depth: process peak RSS generating 32 vs 128 slices in fresh
  subprocesses (goal: flat; finished chunks leave the working set).

    python benchmarks/generation.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from common import best_of, write_result  # noqa: E402

from ctflow.flow import context_cache_for, guided_velocity, make_scheduler, sample_chunk  # noqa: E402
from ctflow.models.transformer import CTFlowTransformer  # noqa: E402

REPORT = "Findings: Heart size is enlarged. Left-sided pleural effusion. Impressions: Cardiomegaly."


def _cond(model, batch=1, text_len=48):
    c = model.config
    return {
        "encoder_hidden_states": torch.randn(batch, text_len, c.text_dim),
        "encoder_attention_mask": torch.ones(batch, text_len, dtype=torch.long),
        "pooled_text": torch.randn(batch, c.text_dim),
        "chunk_index": torch.ones(batch, dtype=torch.long),
        "context": torch.randn(batch, c.in_channels, c.chunk_slices, c.sample_size, c.sample_size),
    }


@torch.no_grad()
def cache_speedup(steps: int = 10) -> dict:
    torch.manual_seed(0)
    model = CTFlowTransformer.from_preset("tiny", context="tokens").eval()  # the shipped tiny geometry
    cond = _cond(model)
    c = model.config
    shape = (1, c.in_channels, c.chunk_slices, c.sample_size, c.sample_size)
    sched = make_scheduler("euler")

    def cached():
        sample_chunk(model, sched, shape, cond, steps, generator=torch.Generator().manual_seed(0))

    def recomputed():  # the same loop, but every forward recomputes the context pass
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        sched.set_timesteps(steps)
        for i, ts in enumerate(sched.timesteps):
            v = guided_velocity(model, x, sched.sigmas[i].expand(1), cond, context_cache=None)
            x = sched.step(v, ts, x, return_dict=False)[0]

    cached(), recomputed()  # warm up
    t_cache, t_full = best_of(cached), best_of(recomputed)
    cache = context_cache_for(model, cond)
    assert cache is not None
    return {
        "steps": steps,
        "cached_s": round(t_cache, 4),
        "recomputed_s": round(t_full, 4),
        "speedup": round(t_full / t_cache, 3),
        "goal": 1.6,
        "passed": t_full / t_cache >= 1.6,
    }


def forward_share_and_steps() -> dict:
    from ctflow.pipeline import CTFlowPipeline

    pipe = CTFlowPipeline.from_pretrained()
    spent = [0.0]
    forward = pipe.transformer.forward

    def timed(*a, **k):
        t0 = time.perf_counter()
        out = forward(*a, **k)
        spent[0] += time.perf_counter() - t0
        return out

    pipe.transformer.forward = timed
    pipe(REPORT, num_slices=16, num_inference_steps=2)  # warm up
    by_steps = {}
    for steps in (5, 10, 20):
        spent[0] = 0.0
        t0 = time.perf_counter()
        pipe(REPORT, num_slices=64, num_inference_steps=steps, generator=torch.Generator().manual_seed(0))
        total = time.perf_counter() - t0
        by_steps[steps] = {"seconds": round(total, 3), "forward_share": round(spent[0] / total, 4)}
    share = by_steps[20]["forward_share"]
    return {
        "num_slices": 64,
        "by_steps": by_steps,
        "time_ratio_20_vs_5_steps": round(by_steps[20]["seconds"] / by_steps[5]["seconds"], 3),
        "forward_share_20_steps": share,
        "goal_forward_share": 0.85,
        "passed": share >= 0.85,
    }


MEMORY_SNIPPET = """
import resource, sys, torch
from ctflow.pipeline import CTFlowPipeline
pipe = CTFlowPipeline.from_pretrained()
pipe("Findings: normal.", num_slices=8, num_inference_steps=1)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
pipe("Findings: normal.", num_slices=int(sys.argv[1]), num_inference_steps=2)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
"""


def memory_vs_depth() -> dict:
    out = {}
    for depth in (32, 128):
        proc = subprocess.run(
            [sys.executable, "-c", MEMORY_SNIPPET, str(depth)], capture_output=True, text=True, check=True
        )
        out[depth] = round(float(proc.stdout.strip().splitlines()[-1]), 1)
    output_mb = {d: d * 64 * 64 * 4 * 2 / 2**20 for d in out}  # float32 slices + HU copy
    return {
        "extra_peak_rss_mb": out,
        "output_arrays_mb": output_mb,
        "note": "growth should stay near the size of the output arrays themselves",
    }


if __name__ == "__main__":
    import argparse

    from common import RESULTS

    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--parts", default="cache,pipeline,memory", help="comma-separated subset to (re)measure"
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    parts = {"cache": cache_speedup, "pipeline": forward_share_and_steps, "memory": memory_vs_depth}
    old = RESULTS / "generation.json"
    result = json.loads(old.read_text()) if old.exists() else {}
    result.pop("environment", None)
    for name in args.parts.split(","):
        result[name] = parts[name]()
    write_result("generation", result)
    print(
        json.dumps(
            {
                "cache_speedup": result["cache"]["speedup"],
                "forward_share": result["pipeline"]["forward_share_20_steps"],
            }
        )
    )
