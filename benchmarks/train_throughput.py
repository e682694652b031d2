"""Flow-training throughput: seconds per step and the share of time spent waiting for data.

Trains the embedded model's configuration (configs/tiny-phantom.yaml) for a few
steps on a latent cache (the one `make train-default` wrote, or a synthetic one
of the same shapes) and reads the trainer's own JSONL log. Goal: data wait
< 10% of step time. Also compares the two context modes at the same size, and
times the loss's forward and backward in one pass against two passes (first
chunks apart, as ``tokens`` models need), and with the report's tokens pooled
in runs of 4 (``text_pool``) or read by 16 resampler queries (``text_resampler``) against
neither, on the same batches, alternating;
the report's key/value projections over its real tokens only (the model) against over every token,
padding too (as before 2026-12-03);
and the trainer's fused AdamW step against the default for-loop one;
and the loss's forward and backward in fp32 with torch's default attention kernel (the trainer)
against bf16 autocast, against the plain-math attention kernel and against each block compiled by
torch.compile; and the trainer as two one-thread DDP processes (torchrun), half the batch each,
against one two-thread process (the trainer's way), in alternating rounds (``--rounds``).

    python benchmarks/train_throughput.py [--latents runs/default/latents] [--result NAME]

``--result`` writes another name than train_throughput.json (another machine's figures beside these);
options off their defaults (another ``--latents``, ``--rounds``) need it, so the stored figures stay.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from types import MethodType

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import refuse_unnamed_variant, synthetic_cache, write_result  # noqa: E402

from ctflow.models.transformer import TextCache, pool_tokens  # noqa: E402
from ctflow.train.config import FlowTrainConfig, load_config  # noqa: E402
from ctflow.train.flow_trainer import (  # noqa: E402
    ChunkSampler,
    build_transformer,
    chunk_loss,
    train_flow,
)
from ctflow.train.latents import LatentCache  # noqa: E402
from ctflow.train.utils import step_generator  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run(cache: Path, config: FlowTrainConfig, work: Path) -> dict:
    train_flow(cache, config, work, progress=False)
    return run_log(work)


def run_log(work: Path) -> dict:
    """Seconds per step and data share of a finished run, from its log, the first window left out."""
    records = [json.loads(x) for x in (work / "log.jsonl").read_text().splitlines()]
    steady = [r for r in records if "sec_per_step" in r][1:]  # drop the first window (warm-up)
    sec = sum(r["sec_per_step"] for r in steady) / len(steady)
    share = sum(r["data_share"] for r in steady) / len(steady)
    return {"sec_per_step": round(sec, 4), "data_share": round(share, 4)}


def every_token_text_cache(model, tokens: torch.Tensor, mask: torch.Tensor) -> TextCache:
    """The report's keys/values projected by each block over every token, padding too."""
    tm, ts = model.token_stats
    text, mask = pool_tokens((tokens - tm) / ts, mask, model.config.text_pool)
    text = model.text_embedder(text)
    b, length = mask.shape
    heads = model.config.num_heads
    kv = [
        block.cross_attn.kv(text).view(b, length, 2, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        for block in model.blocks
    ]
    return TextCache(kv, mask)


def alternating(
    cache: Path,
    variants: dict[str, tuple[FlowTrainConfig, bool]],
    steps: int = 30,
    text_caches: dict | None = None,
    contexts: dict | None = None,
    prepare: dict | None = None,
) -> dict:
    """Median seconds of the loss's forward + backward for each variant (config, one pass), on the
    same batches (drawn with the first variant's config), taking turns in a rotating order.
    ``text_caches`` maps a variant to a replacement for its model's ``compute_text_cache``;
    ``contexts`` maps a variant to a function giving the context manager its step runs in;
    ``prepare`` maps a variant to a function changing its model in place (once, before the steps)."""
    latents = LatentCache(cache)
    names = list(variants)
    config = variants[names[0]][0]
    models = {}
    for name, (cfg, _) in variants.items():
        torch.manual_seed(0)
        models[name] = build_transformer(cfg, latents)
        if name in (text_caches or {}):
            models[name].compute_text_cache = MethodType(text_caches[name], models[name])
        if name in (prepare or {}):
            prepare[name](models[name])
    sampler = ChunkSampler(
        latents, models[names[0]].config.chunk_slices, config, models[names[0]].config.num_findings
    )
    times = {name: [] for name in names}
    for step in range(steps + 2):
        batch = sampler.batch(config.batch_size, step_generator(config.seed, step), config)
        for name in names[step % len(names) :] + names[: step % len(names)]:
            cfg, one_pass = variants[name]
            start = time.perf_counter()
            with (contexts or {}).get(name, contextlib.nullcontext)():
                loss = chunk_loss(models[name], batch, step_generator(config.seed, step), cfg, one_pass)
            loss.backward()
            models[name].zero_grad(set_to_none=True)
            if step >= 2:  # the first two steps warm up
                times[name].append(time.perf_counter() - start)
    return {f"{name}_sec": round(statistics.median(t), 4) for name, t in times.items()}


def adamw_steps(cache: Path, config: FlowTrainConfig, steps: int = 40) -> dict:
    """Median seconds of one AdamW step over the model's parameters: the fused kernel the trainer
    uses against the default for-loop over parameter tensors, taking turns."""
    torch.manual_seed(0)
    model = build_transformer(config, LatentCache(cache))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizers = {
        name: torch.optim.AdamW(model.parameters(), lr=1e-6, fused=fused)
        for name, fused in (("fused", True), ("for_loop", None))
    }
    times = {name: [] for name in optimizers}
    for step in range(steps + 2):
        for name, optimizer in optimizers.items():
            start = time.perf_counter()
            optimizer.step()
            if step >= 2:
                times[name].append(time.perf_counter() - start)
    return {f"{name}_sec": round(statistics.median(t), 4) for name, t in times.items()}


def ddp_run(cache: Path, config_path: Path, work: Path, processes: int = 2) -> dict:
    """``run`` as ``processes`` one-thread DDP processes (torchrun, gloo), each drawing the config's
    batch: the other way to use the cores."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    command += ["-m", "ctflow.cli", "train", "--latents", str(cache), "--config", str(config_path)]
    subprocess.run([*command, "--out", str(work)], env=env, check=True, capture_output=True)
    return run_log(work)


def ddp_against_one(cache: Path, config: FlowTrainConfig, ddp_config: Path, work: Path, rounds: int) -> dict:
    """Median seconds per step of ``run`` (one two-thread process) and ``ddp_run`` (two one-thread
    processes, half the batch each), taking turns ``rounds`` times, each round's first run swapped:
    one pair of runs is not enough on a shared machine (a single pair once read 0.54x where
    alternating rounds read 1.0x)."""
    times = {"one_process": [], "ddp": []}
    for r in range(rounds):
        for name in list(times)[:: 1 if r % 2 == 0 else -1]:
            if name == "ddp":
                log = ddp_run(cache, ddp_config, work / f"ddp{r}")
            else:
                log = run(cache, config, work / f"one{r}")
            times[name].append(log["sec_per_step"])
    medians = {f"{name}_sec_per_step": round(statistics.median(t), 4) for name, t in times.items()}
    return {**medians, "rounds": times}


def compile_blocks(model) -> None:
    """Each transformer block compiled by torch.compile (inductor). The whole model does not compile in
    one graph: the report's real-token projection has a data-dependent shape."""
    for block in model.blocks:
        block.compile()


def with_transformer(config: FlowTrainConfig, **changes) -> FlowTrainConfig:
    """``config`` with these transformer options changed."""
    return replace(config, transformer={**config.transformer, **changes})


def ratio(times: dict, new: str, old: str) -> dict:
    return {**times, "ratio": round(times[f"{new}_sec"] / times[f"{old}_sec"], 3)}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--latents", type=Path, default=ROOT / "runs/default/latents", help="a recipe's latent cache"
    )
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of the DDP comparison")
    p.add_argument(
        "--result",
        default=None,
        help="name of the JSON in benchmarks/results (default: train_throughput; needed with other options)",
    )
    args = p.parse_args()
    refuse_unnamed_variant(p, args)
    torch.set_num_threads(2)
    base = load_config(ROOT / "configs/tiny-phantom.yaml", FlowTrainConfig)
    real = args.latents
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = (
            real
            if (real / "index.json").exists()
            else synthetic_cache(tmp / "cache", report_variants=4, finding_masks=True)
        )
        cfg = replace(base, steps=40, log_every=10, checkpoint_every=10**6)
        results = {}
        for mode in ("concat", "tokens"):
            results[mode] = run(cache, with_transformer(cfg, context=mode), tmp / mode)
        passes = ratio(
            alternating(cache, {"one_pass": (cfg, True), "two_passes": (cfg, False)}),
            "one_pass",
            "two_passes",
        )
        # the report's tokens as they are, averaged in runs of 4, or read by 16 resampler queries
        shorter = alternating(
            cache,
            {
                "text_pool_1": (cfg, True),
                "text_pool_4": (with_transformer(cfg, text_pool=4), True),
                "text_resampler_16": (with_transformer(cfg, text_resampler=16), True),
            },
        )
        projection = ratio(
            alternating(
                cache,
                {"real_tokens": (cfg, True), "every_token": (cfg, True)},
                text_caches={"every_token": every_token_text_cache},
            ),
            "real_tokens",
            "every_token",
        )
        adamw = ratio(adamw_steps(cache, cfg), "fused", "for_loop")
        # faster kernels for the same step? bf16 autocast (AMX where the CPU has it), plain-math attention
        from torch.nn.attention import SDPBackend, sdpa_kernel

        # and torch.compile of each block, where a C++ compiler is at hand for inductor's kernels
        compiled = {"compiled_blocks": (cfg, True)} if shutil.which("g++") or shutil.which("c++") else {}
        kernels = alternating(
            cache,
            {"fp32": (cfg, True), "bf16_autocast": (cfg, True), "math_attention": (cfg, True), **compiled},
            contexts={
                "bf16_autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
                "math_attention": lambda: sdpa_kernel(SDPBackend.MATH),
            },
            prepare={"compiled_blocks": compile_blocks},
        )
        # the second core as a second process: two one-thread DDP processes, half the batch each
        ddp_config = tmp / "ddp.yaml"
        ddp_config.write_text(
            f"base: {ROOT / 'configs/tiny-phantom.yaml'}\nsteps: {cfg.steps}\nlog_every: {cfg.log_every}\n"
            f"checkpoint_every: {cfg.checkpoint_every}\nbatch_size: {cfg.batch_size // 2}\n"
        )
        ddp = ddp_against_one(cache, cfg, ddp_config, tmp / "launch", args.rounds)
    out = {
        "cache": str(real) if cache == real else "synthetic (same shapes)",
        "batch_size": cfg.batch_size,
        "by_context_mode": results,
        "tokens_vs_concat_time_ratio": round(
            results["tokens"]["sec_per_step"] / results["concat"]["sec_per_step"], 3
        ),
        "concat_loss_one_pass_vs_two": passes,
        "concat_loss_text_pool_4_vs_1": ratio(shorter, "text_pool_4", "text_pool_1"),
        "concat_loss_text_resampler_16_vs_1": ratio(shorter, "text_resampler_16", "text_pool_1"),
        "concat_loss_text_kv_real_tokens_vs_every_token": projection,
        "adamw_step_fused_vs_for_loop": adamw,
        "concat_loss_bf16_autocast_vs_fp32": ratio(kernels, "bf16_autocast", "fp32"),
        "concat_loss_math_attention_vs_default": ratio(kernels, "math_attention", "fp32"),
        "concat_loss_compiled_blocks_vs_eager": ratio(kernels, "compiled_blocks", "fp32")
        if compiled
        else "skipped: no C++ compiler for inductor",
        "ddp_two_one_thread_processes_half_batch_each": ddp,
        "ddp_vs_one_two_thread_process_time_ratio": round(
            ddp["ddp_sec_per_step"] / ddp["one_process_sec_per_step"], 3
        ),
        "goal_data_share": 0.10,
        "passed": all(r["data_share"] < 0.10 for r in results.values()),
    }
    write_result(args.result or "train_throughput", out)
