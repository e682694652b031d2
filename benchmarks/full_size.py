"""The full-size configuration, measured without a GPU: parameters and FLOPs on the meta device.

Counts the `ctflow-0.5b` transformer (CT-RATE setting: 16 x 32 x 32 latent chunks of
16 slices) and the FLUX VAE, then estimates generation time for a 256-slice volume
from the analytic FLOPs at stated throughputs: this CPU's measured matmul rate,
and an H100 at an assumed 40% of its 989 TFLOP/s bf16 dense peak. No GPU was lent
to measure it directly; the figures are labelled as estimates.

    python benchmarks/full_size.py
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from ctflow.models.transformer import count_params, forward_flops, preset_config  # noqa: E402


def cpu_matmul_flops(n: int = 1024, dtype=torch.float32) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t0 = time.perf_counter()
    reps = 10
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def vae_params() -> int:
    from ctflow.models.vae import VAE_PRESETS, _autoencoder_cls

    with torch.device("meta"):
        vae = _autoencoder_cls()(**VAE_PRESETS["flux"])
    return sum(p.numel() for p in vae.parameters())


def main() -> dict:
    torch.set_num_threads(2)
    cfg = preset_config("ctflow-0.5b")
    slices, steps, cfg_batch = 256, 30, 2  # 30 Euler steps, guidance doubles the batch
    chunks = math.ceil(slices / cfg["chunk_slices"])
    step_flops = forward_flops(cfg, batch=cfg_batch, context_stream=False)
    context_flops = forward_flops(cfg, batch=cfg_batch, context_stream=True) - step_flops
    per_volume = chunks * (steps * step_flops + context_flops)
    train_flops = 3 * forward_flops(cfg, batch=1, context_stream=True)
    cpu = cpu_matmul_flops()
    h100 = 0.4 * 989e12
    return {
        "transformer": {
            "params": count_params(cfg),
            "hidden": cfg["hidden_size"],
            "depth": cfg["depth"],
            "chunk": [cfg["in_channels"], cfg["chunk_slices"], cfg["sample_size"], cfg["sample_size"]],
            "attention": cfg["attention"],
            "context": cfg["context"],
        },
        "flux_vae_params": vae_params(),
        "generation_256_slices": {
            "chunks": chunks,
            "steps": steps,
            "flops": per_volume,
            "estimated_seconds_this_cpu_fp32": round(per_volume / cpu, 1),
            "estimated_seconds_h100_bf16_40pct": round(per_volume / h100, 2),
        },
        "training_flops_per_chunk_sample": train_flops,
        "cpu_matmul_gflops_measured": round(cpu / 1e9, 1),
        "assumptions": "analytic FLOPs (linear + attention matmuls), text length 256, CFG batch 2; "
        "H100 at 40% of 989 TFLOP/s bf16 dense; transformer only (VAE decode excluded)",
    }


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args()
    write_result("full_size", main())
