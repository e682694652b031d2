"""Flow-transformer training on the latent cache (``ctflow train``).

A readable loop in the nanoGPT manner. Each step draws a batch of chunks:
with probability ``start_boost`` the first chunk of a volume (conditioned on
the report and the start context), otherwise a later chunk (conditioned on the
report and the previous chunk, lightly noised); ``start_boost = 0`` draws a
volume uniformly, then one of its chunks. Volumes end with white EOS
slices, so the model learns where scans stop.

Every random draw of step ``k`` comes from a generator seeded by
``(seed, k, rank)``: resuming from a checkpoint reproduces an uninterrupted
run exactly, and processes under ``torchrun`` draw different batches.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch

from ctflow.errors import CTFlowError, warn
from ctflow.files import atomic_dir
from ctflow.train.checkpoint import clean_partial, list_checkpoints, restore, save_checkpoint
from ctflow.train.config import FlowTrainConfig, warn_changed_settings
from ctflow.train.latents import LatentCache, short_key
from ctflow.train.utils import (
    EMA,
    StepBar,
    append_jsonl,
    check_run_folder,
    final_weights_due,
    lr_lambda,
    resume_note,
    step_generator,
    trim_log,
)


def num_chunks(slices: int, k: int) -> int:
    """Chunks of a ``slices``-slice volume cut into k-slice chunks: the last one EOS-padded, then one
    all-EOS chunk."""
    return math.ceil(slices / k) + 1


def chunk_at(latents: torch.Tensor, eos: torch.Tensor, k: int, i: int) -> torch.Tensor:
    """[C,S,h,w] -> chunk i [C,k,h,w] of the volume cut into k-slice chunks: slices past the end are
    the EOS latent, so chunk ceil(S / k) (the last one) is all EOS. Copies only those k slices."""
    c, s, h, w = latents.shape
    if not 0 <= i < num_chunks(s, k):
        raise IndexError(f"chunk {i} of a {s}-slice volume cut into {k}-slice chunks")
    part = latents[:, i * k : (i + 1) * k]
    if part.shape[1] == k:
        return part.clone()
    return torch.cat([part, eos[:, None].expand(c, k - part.shape[1], h, w)], dim=1)


def finding_onsets(cache: LatentCache, k: int) -> dict[tuple[int, int], frozenset[str]]:
    """(volume, chunk index) -> the finding types that begin there (or in the chunk before: a finding
    such as an effusion starts as a sliver), from the cache's ``finding_slices``, sorted. First chunks
    are left out: StartBoost already draws them. A chunk where several findings start is listed once."""
    out: dict[tuple[int, int], set[str]] = {}
    for v in range(len(cache)):
        for f in cache.rows[v][1].get("finding_slices") or []:
            first, last = int(f["first"]) // k, int(f["last"]) // k
            for i in (first, first + 1):
                if 0 < i <= last:
                    out.setdefault((v, i), set()).add(str(f["type"]))
    return {key: frozenset(types) for key, types in sorted(out.items())}


def same_depth(i: int, k: int, slices_from: int, slices_to: int) -> int:
    """The chunk of a ``slices_to``-slice volume at the depth (share of the stack) of the middle of
    chunk ``i`` of a ``slices_from``-slice volume, kept off the first chunk and the EOS chunk. Phantom
    stacks all run from the lung apices to the upper abdomen, so equal depth means the same anatomy."""
    depth = (i * k + k / 2) / slices_from
    return min(max(int(depth * slices_to) // k, 1), math.ceil(slices_to / k) - 1)


class Draw(NamedTuple):
    """One training sample: chunk ``chunk`` of volume ``volume``. A FindingBoost control also names
    the onset chunk it stands in for (``region``): with ``finding_weight``, that chunk's finding mask
    weights this one, so leaving the region empty counts as much as filling it."""

    volume: int
    chunk: int
    region: tuple[int, int] | None = None


def _uniform(g: torch.Generator) -> float:
    return float(torch.rand((), generator=g))


def report_flags(row: dict) -> list[list[float]]:
    """A latent-cache row's finding flags (:func:`ctflow.data.reports.finding_vector`): of its report,
    then of each shortened version."""
    from ctflow.data.reports import finding_vector

    return [finding_vector(text) for text in [row["report"], *row.get("short_reports", [])]]


class ChunkSampler:
    """Draws training chunks (with StartBoost, FindingBoost and its controls, FindingWeight, short
    reports, meta-line and finding-flag dropout) from a latent cache. With ``num_findings`` each row
    also gets the finding flags of the report text it reads."""

    def __init__(self, cache: LatentCache, chunk_slices: int, config: FlowTrainConfig, num_findings: int = 0):
        from ctflow.data.reports import FINDING_NAMES

        self.cache, self.k, self.cfg = cache, chunk_slices, config
        if num_findings and num_findings != len(FINDING_NAMES):
            raise CTFlowError(
                f"transformer num_findings is {num_findings} but reports give {len(FINDING_NAMES)} finding flags"
                f" ({', '.join(FINDING_NAMES)}); set num_findings: {len(FINDING_NAMES)} or 0"
            )
        self.flags = [report_flags(row) for _, row in cache.rows] if num_findings else None
        if self.flags and any(len(f) != 1 + cache.report_variants for f in self.flags):
            raise CTFlowError(
                "num_findings reads the text of each shortened report, which this latent cache does not"
                " list; encode it again with `ctflow encode --overwrite`"
            )
        # chunks per volume (its slices, EOS-padded, plus the EOS chunk): known from the index alone
        self.num_chunks = [num_chunks(cache.num_slices(i), chunk_slices) for i in range(len(cache))]
        stages = config.stages()  # a late stage may boost findings where the run's start does not
        boost, controls, weight = (
            any(getattr(c, k) > 0 for c in stages)
            for k in ("finding_boost", "finding_controls", "finding_weight")
        )
        onsets = finding_onsets(cache, chunk_slices) if boost else {}
        self.onsets = list(onsets)
        # FindingBoost controls: per onset, the volumes whose ground truth has none of the findings that
        # begin there and that have a chunk past the first (an onset without any is drawn itself)
        self.controls: list[list[int]] = []
        if controls:
            rows = [row for _, row in cache.rows]
            usable = [
                v
                for v, row in enumerate(rows)
                if row.get("finding_slices") is not None and self.num_chunks[v] > 2
            ]
            found = [{str(f["type"]) for f in row.get("finding_slices") or []} for row in rows]
            by_types = {t: [v for v in usable if not t & found[v]] for t in set(onsets.values())}
            self.controls = [by_types[t] for t in onsets.values()]
        if boost and not self.onsets:
            raise CTFlowError(
                "finding_boost needs finding_slices in the latent cache (phantom data sets, encoded by this"
                " version of `ctflow encode --overwrite`); none of its volumes has a finding past the first"
                " chunk. Set finding_boost: 0"
            )
        if weight and not cache.finding_masks:
            raise CTFlowError(
                "finding_weight needs finding masks in the latent cache; encode a phantom data set again with"
                " `ctflow encode --finding-masks --overwrite`, or set finding_weight: 0"
            )
        if config.short_reports > 0 and cache.report_variants == 0:
            raise CTFlowError(
                "short_reports needs shortened reports in the latent cache; encode it again with"
                " `ctflow encode --report-variants 4 --overwrite`, or set short_reports: 0"
            )

    def draw(self, g: torch.Generator, config: FlowTrainConfig | None = None) -> Draw:
        """One training sample (:class:`Draw`), drawn as ``config`` says (default: the sampler's own,
        ``config.at_step(step)`` for a run's late stage)."""
        cfg = config or self.cfg
        v = int(torch.randint(len(self.cache), (), generator=g))
        n = self.num_chunks[v]
        start, finding = cfg.start_boost, cfg.finding_boost
        if start > 0 and _uniform(g) < start:
            return Draw(v, 0)
        later_share = finding / (1.0 - start) if finding > 0 else 0.0  # finding_boost of all samples
        if later_share and _uniform(g) < later_share:
            o = int(torch.randint(len(self.onsets), (), generator=g))
            onset = Draw(*self.onsets[o])
            if self.controls and _uniform(g) < cfg.finding_controls and self.controls[o]:
                return self.control(onset, self.controls[o], g)
            return onset
        # StartBoost off: every chunk equally likely, the first included
        return Draw(v, int(torch.randint(0 if start <= 0 else 1, n, (), generator=g)))

    def control(self, onset: Draw, candidates: list[int], g: torch.Generator) -> Draw:
        """A FindingBoost control for ``onset``: the chunk at the same depth of a random volume
        without the findings that begin there (:func:`same_depth`)."""
        w = candidates[int(torch.randint(len(candidates), (), generator=g))]
        v, i = onset.volume, onset.chunk
        j = same_depth(i, self.k, self.cache.num_slices(v), self.cache.num_slices(w))
        return Draw(w, j, (v, i))

    def finding_share(self, v: int, i: int) -> torch.Tensor:
        """[1,k,h,w]: the share of each latent pixel of chunk ``i`` of volume ``v`` a finding covers."""
        mask = self.cache.tensor(v, "finding_mask")[None]  # [1,S,h,w]
        return chunk_at(mask, torch.zeros_like(mask[:, 0]), self.k, i)

    def row(self, g: torch.Generator, config: FlowTrainConfig | None = None) -> dict:
        """One training row: a drawn chunk (:meth:`draw`), the chunk before it, the report text it
        reads (full or shortened, with or without its meta line), its finding flags and per-pixel loss
        weight when the config uses them. Its random draws come in a fixed order, so a step's batch
        depends only on the step's generator.

        Keys (shapes as :meth:`batch` collates them over B rows): ``x0`` and ``context`` [C,k,h,w],
        ``first`` (bool: the first chunk, start context), ``chunk_index``, ``tokens`` [L,D] and
        ``pooled_text`` [D] of the report, ``num_slices`` (the meta line's count, 0 when dropped);
        ``findings`` [F] (the report's flags, -1 when dropped) and ``weight`` [1,k,h,w] (per-pixel
        loss weight) when used."""
        cfg = config or self.cfg
        v, i, region = self.draw(g, cfg)
        latents = self.cache.tensor(v, "latents")  # only what this row uses is read from the shard
        if latents.shape[1] != self.cache.num_slices(v):
            raise CTFlowError(
                f"latent cache: {self.cache.rows[v][1]['name']} has {latents.shape[1]} latent slices but "
                f"its index says {self.cache.num_slices(v)}; re-encode it with `ctflow encode --overwrite`"
            )
        x0 = chunk_at(latents, self.cache.eos, self.k, i)
        row = {
            "x0": x0,
            "context": chunk_at(latents, self.cache.eos, self.k, i - 1) if i > 0 else torch.zeros_like(x0),
            "first": i == 0,
            "chunk_index": i,
        }
        if cfg.finding_weight > 0:  # 1 + finding_weight x the finding's share of each latent pixel
            share = self.finding_share(v, i)
            if region is not None:  # a control: its onset's finding region counts too
                share = torch.maximum(share, self.finding_share(*region))
            row["weight"] = 1 + cfg.finding_weight * share.pow(cfg.finding_share_power)
        dropped = _uniform(g) < cfg.meta_dropout  # no meta line: the slice count is unknown (0)
        variant = None  # the full report, else shortened version j
        if cfg.short_reports > 0 and _uniform(g) < cfg.short_reports:
            variant = int(torch.randint(self.cache.report_variants, (), generator=g))
        suffix = ("" if variant is None else short_key(variant)) + ("_nometa" if dropped else "")
        row["tokens"] = self.cache.tensor(v, "tokens" + suffix)
        row["pooled_text"] = self.cache.tensor(v, "pooled" + suffix)
        row["num_slices"] = 0 if dropped else self.cache.num_slices(v)
        if self.flags is not None:
            flags = self.flags[v][0 if variant is None else variant + 1]
            if cfg.finding_dropout > 0 and _uniform(g) < cfg.finding_dropout:
                flags = [-1.0] * len(flags)  # unknown: the model reads the text alone
            row["findings"] = flags
        return row

    def batch(
        self,
        batch_size: int,
        g: torch.Generator,
        config: FlowTrainConfig | None = None,
        device: torch.device | str | None = None,
    ) -> dict[str, torch.Tensor]:
        """``batch_size`` rows (:meth:`row`) collated: report tokens padded to the longest with an
        attention mask, and each row's previous chunk noised (``context_noise``; a first chunk has none:
        its context stays zero). Drawn on the CPU (so a generator gives the same batch whatever device
        trains on it), then moved to ``device``."""
        from ctflow.flow import context_noise

        cfg = config or self.cfg
        rows = [self.row(g, cfg) for _ in range(batch_size)]
        out = {key: _collate([r[key] for r in rows]) for key in rows[0] if key != "tokens"}
        toks = [r["tokens"] for r in rows]
        tokens = torch.zeros(batch_size, max(t.shape[0] for t in toks), toks[0].shape[1])
        mask = torch.zeros(tokens.shape[:2], dtype=torch.long)
        for b, t in enumerate(toks):
            tokens[b, : t.shape[0]] = t
            mask[b, : t.shape[0]] = 1
        out["encoder_hidden_states"], out["encoder_attention_mask"] = tokens, mask
        lo, hi = cfg.context_noise, max(cfg.context_noise, cfg.context_noise_max)
        if hi > 0:  # per row: fixed, or uniform in [lo, hi]; a first chunk's zero context stays zero
            std = (
                lo + (hi - lo) * torch.rand(batch_size, generator=g)
                if hi > lo
                else torch.full((batch_size,), lo)
            )
            out["context"] = context_noise(out["context"], std.masked_fill(out["first"], 0.0), g)
        if device is not None:
            out = {key: value.to(device, non_blocking=True) for key, value in out.items()}
        return out


def _collate(values: list):
    """One batch entry from the rows' values: tensors stacked, numbers and flag lists as a tensor."""
    return torch.stack(values) if isinstance(values[0], torch.Tensor) else torch.tensor(values)


def chunk_loss(
    model,
    batch: dict,
    g: torch.Generator,
    config: FlowTrainConfig,
    one_pass: bool = False,
    every_parameter: bool = False,
):
    """Flow-matching loss over a batch mixing first chunks (no context) and later chunks.

    A fraction ``config.cfg_dropout`` of rows gets the null report (classifier-free guidance).
    The first chunks' times and noise are drawn before the later chunks'. ``one_pass`` runs the whole
    batch through the model at once, the first chunks with a zero context: for ``concat`` and ``none``
    models that is what they see without one, so the loss is the same (up to rounding) as the two
    passes a ``tokens`` model needs (its start has no context tokens at all), in 0.92-0.97x the time
    (two runs of ``benchmarks/train_throughput.py``).

    ``every_parameter`` (training under DDP): a batch of first chunks only, or later chunks only, leaves
    a ``tokens`` model's other context parameters (``start_context`` or ``context_embedder``) out of the
    loss, and DDP's reducer, which waits for every parameter's gradient, fails at the next step; they
    take part with weight 0 instead (cheaper than ``find_unused_parameters``, which walks the graph).
    """
    from diffusers.utils.torch_utils import randn_tensor

    from ctflow.flow import drop_condition, flow_matching_loss, sample_time

    batch = drop_condition(batch, config.cfg_dropout, g)
    keys = ("encoder_hidden_states", "encoder_attention_mask", "pooled_text", "chunk_index", "num_slices")
    keys += ("findings",) if "findings" in batch else ()
    groups = [
        (first, rows) for first, rows in ((True, batch["first"]), (False, ~batch["first"])) if rows.any()
    ]
    x0, weight = batch["x0"], batch.get("weight")
    if one_pass:
        t, noise = torch.empty(x0.shape[0], device=x0.device), torch.empty_like(x0)
        for _, rows in groups:  # the same draws, in the same order, as the two passes below
            t[rows] = sample_time(int(rows.sum()), g, config.time_distribution, x0.device, config.time_mean)
            noise[rows] = randn_tensor(x0[rows].shape, generator=g, device=x0.device, dtype=x0.dtype)
        cond = {k: batch[k] for k in keys}
        cond["context"] = batch["context"].masked_fill(batch["first"].view(-1, 1, 1, 1, 1), 0.0)
        loss, _ = flow_matching_loss(
            model, x0, cond, t=t, noise=noise, loss_space=config.loss_space, weight=weight
        )
        return loss
    total = 0.0
    for first, rows in groups:
        cond = {k: batch[k][rows] for k in keys}
        cond["context"] = None if first else batch["context"][rows]
        loss, _ = flow_matching_loss(
            model,
            x0[rows],
            cond,
            generator=g,
            distribution=config.time_distribution,
            time_mean=config.time_mean,
            loss_space=config.loss_space,
            weight=None if weight is None else weight[rows],
        )
        total = total + loss * rows.sum() / x0.shape[0]
    if every_parameter and len(groups) < 2:
        total = total + 0.0 * sum(p.sum() for p in model.parameters() if p.requires_grad)
    return total


TRAINING_RECORD = "training.json"  # beside a run's transformer weights: what they were trained on


def write_training_record(folder: Path, latents: str, step: int, steps: int) -> None:
    """Record in a transformer folder the latent cache (its fingerprint) and the step its weights are
    from, so `ctflow assemble` can check them wherever the folder is copied."""
    record = {"latents": latents, "step": int(step), "steps": int(steps)}
    (Path(folder) / TRAINING_RECORD).write_text(json.dumps(record, indent=1))


def build_transformer(config: FlowTrainConfig, cache: LatentCache):
    from ctflow.models.transformer import CTFlowTransformer

    spec = dict(config.transformer)
    preset = spec.pop("preset", "tiny")
    c, h, _ = cache.eos.shape
    spec.setdefault("in_channels", c)
    spec.setdefault("sample_size", h)
    spec.setdefault("text_dim", int(cache.index["text_dim"]))
    if spec["text_dim"] != int(cache.index["text_dim"]):
        raise CTFlowError(
            f"the config's transformer.text_dim is {spec['text_dim']} but the latent cache's reports were"
            f" encoded {cache.index['text_dim']} wide; encode them with the matching report encoder"
            " (`ctflow encode --text-encoder`) or drop text_dim from the config"
        )
    # before the run folder is written: found at the first step, the failed run blocked the fixed one
    for key, value in (("in_channels", c), ("sample_size", h)):
        if spec[key] != value:
            raise CTFlowError(
                f"the config's transformer.{key} is {spec[key]} but the latent cache's latents are"
                f" {c} channels of {h}x{h}; drop {key} from the config (it follows the cache)"
            )
    try:
        model = CTFlowTransformer.from_preset(preset, **spec)
    except TypeError as e:
        raise CTFlowError(f"bad transformer config: {e}") from None
    moments = cache.text_moments()
    model.set_text_moments(moments["tokens"], moments["pooled"])
    return model


def train_flow(
    latents: str | Path,
    config: FlowTrainConfig,
    out: str | Path,
    resume: bool = False,
    stop_at: int | None = None,
    progress: bool = True,
) -> Path | None:
    """Train and write ``out/transformer`` (EMA weights), ``out/checkpoints`` and ``out/log.jsonl``.

    ``stop_at`` ends the run early at that step (as if interrupted) after checkpointing. Returns
    ``out/transformer`` when this call wrote it (on the main process), else None: stopped early, a
    resume of a run that had already finished and written it, or another process.
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs

    out = check_run_folder(out, resume)
    # a "tokens" model's two passes (first chunks, later chunks) are two forward calls, and a process
    # whose batch holds one kind makes one: DDP must not broadcast buffers in each (a collective the
    # other process would not join; the run hung). The buffers are fixed at build time, the same on all.
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available(), kwargs_handlers=[ddp]
    )
    if config.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        warn(
            "mixed_precision fp16 does not run on the CPU (accelerate turns it off): this run trains in float32; bf16 does run there"
        )
    cache = LatentCache(latents)
    torch.manual_seed(config.seed)  # same initial weights on every process and every run
    model = build_transformer(config, cache)
    if config.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    sampler = ChunkSampler(cache, model.config.chunk_slices, config, model.config.num_findings)
    one_pass = model.config.context != "tokens"  # see chunk_loss
    o = config.optim
    # fused: one kernel over all parameters, not a Python loop over its tensors (on the phantom model
    # 0.30x the time, 6.4 ms less a step on the faster Xeon, 0.36x and 9.9 ms on the slower AMD kind:
    # benchmarks/results/train_throughput*.json); the same update up to rounding
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, fused=True
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(o.warmup_steps, config.steps, o.min_lr_ratio)
    )
    ema = EMA(model, o.ema_decay)
    ckpt_dir = out / "checkpoints"
    step = 0
    if resume:
        clean_partial(ckpt_dir)
        found = list_checkpoints(ckpt_dir)
        if found:
            info = restore(found[-1], {"model": model, "ema": ema}, {"optimizer": optimizer})
            step = info["step"]
            if info.get("latents", cache.fingerprint) != cache.fingerprint:
                raise CTFlowError(
                    f"{out} was trained on another latent cache than {latents} (fingerprint"
                    f" {info['latents']} there, {cache.fingerprint} here); pass the run's own --latents"
                    " or train into a new --out"
                )
            warn_changed_settings(info, config, step)
            before = info.get("processes", accelerator.num_processes)
            if before != accelerator.num_processes:  # batch_size is per process
                warn(
                    f"resuming from step {step} on {accelerator.num_processes} process(es) where the run had"
                    f" {before}: the global batch changes from {before * config.batch_size} to"
                    f" {accelerator.num_processes * config.batch_size} chunks a step"
                )
            scheduler.last_epoch = step  # the rates themselves come back with the optimizer's param_groups
            if accelerator.scaler is not None and "grad_scaler" in info:  # fp16: the loss scale it reached
                accelerator.scaler.load_state_dict(info["grad_scaler"])
    model, optimizer = accelerator.prepare(model, optimizer)
    ema.to(accelerator.device)  # the shadow weights live beside the model's (a GPU's, under accelerate)
    model.train()
    rank, main = accelerator.process_index, accelerator.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(config), indent=1))
    log_path = out / "log.jsonl"
    if main and resume:  # steps after the checkpoint are trained (and logged) again
        trim_log(log_path, step)
    end = min(config.steps, stop_at) if stop_at is not None else config.steps
    start = step
    if main and progress and resume:
        print(resume_note(start, config.steps, ckpt_dir), file=sys.stderr)
    bar = StepBar(progress and main, "train", end, step)
    try:
        data_time = compute_time = 0.0
        interval = 0  # steps since the last log line (the first and last intervals may be shorter)
        while step < end:
            t0 = time.perf_counter()
            g = step_generator(config.seed, step, rank)
            stage = config.at_step(step)  # the late stage's sampling from late.from_step on
            batch = sampler.batch(config.batch_size, g, stage, device=accelerator.device)
            t1 = time.perf_counter()
            with accelerator.autocast():
                loss = chunk_loss(
                    model, batch, g, stage, one_pass, every_parameter=accelerator.num_processes > 1
                )
            accelerator.backward(loss)
            # grad_clip 0 turns clipping off (as in the VAE trainer); the norm is still measured and logged
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), o.grad_clip or float("inf"))
            # stop before the weights, a checkpoint or a log line hold it. The gradient norm is of the
            # all-reduced gradients, the same on every process; fp16 overflows are the scaler's to skip
            bad = ~torch.isfinite(loss.detach())
            if accelerator.scaler is not None and accelerator.num_processes > 1:
                # fp16: the norm may be inf (the scaler skips such steps), so every process asks about
                # every loss, and all stop together
                bad = accelerator.reduce(bad.float(), "sum") > 0
            if bad or (accelerator.scaler is None and not torch.isfinite(grad_norm)):
                raise CTFlowError(
                    f"the loss became {float(loss.detach())} (gradient norm {float(grad_norm)}) at step {step + 1};"
                    f" lower optim.lr, or --resume from the last checkpoint in {ckpt_dir}"
                )
            optimizer.step()
            lr = scheduler.get_last_lr()[0]  # the rate this step took (after scheduler.step: the next's)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            ema.update(accelerator.unwrap_model(model))
            step += 1
            interval += 1
            t2 = time.perf_counter()
            data_time, compute_time = data_time + t1 - t0, compute_time + t2 - t1
            logging = step % config.log_every == 0 or step == end
            if logging:
                loss = accelerator.reduce(loss.detach(), "mean")  # every process's batch, not rank 0's alone
            if main and logging:
                record = {
                    "step": step,
                    "loss": round(loss.item(), 6),
                    "grad_norm": round(float(grad_norm), 4),
                    "lr": lr,
                    "data_share": round(data_time / max(1e-9, data_time + compute_time), 4),
                    "sec_per_step": round((data_time + compute_time) / interval, 4),
                }
                data_time = compute_time = 0.0
                interval = 0
                append_jsonl(log_path, record)
                bar.update(step, loss=record["loss"])
            if step % config.checkpoint_every == 0 or step == end:
                accelerator.wait_for_everyone()
                if main:
                    save_checkpoint(
                        ckpt_dir,
                        step,
                        {"model": accelerator.unwrap_model(model), "ema": ema},
                        {"optimizer": optimizer},
                        {
                            "config": asdict(config),
                            "latents": cache.fingerprint,
                            "processes": accelerator.num_processes,
                            # fp16's loss scale: a resumed run skips the same overflowing steps
                            **(
                                {"grad_scaler": accelerator.scaler.state_dict()} if accelerator.scaler else {}
                            ),
                        },
                        keep=config.keep_checkpoints,
                    )
    finally:
        bar.close()  # a stop mid-run too: the terminal gets its cursor back
    accelerator.wait_for_everyone()
    # every process must hold the same weights: compare a checksum across processes
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    sums = accelerator.gather(checksum)
    if main and step > start:  # a resume of a finished run trains nothing and records nothing again
        append_jsonl(
            log_path,
            {
                "step": step,
                "processes": accelerator.num_processes,
                "replicas_identical": bool(torch.all(sums == sums[0])),
            },
        )
    written = None
    if main and final_weights_due(out / "transformer", step, start, config.steps):
        final = accelerator.unwrap_model(model)
        ema.copy_to(final)
        with atomic_dir(out / "transformer", overwrite=True) as tmp:  # whole or not there
            final.save_pretrained(tmp, safe_serialization=True)
            write_training_record(tmp, cache.fingerprint, step, config.steps)
        written = out / "transformer"
    # all ranks tear the process group down together: a rank that left while rank 0 was still saving
    # sometimes died in gloo's teardown ("terminate called without an active exception", ~1 run in 8)
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:
        # a gloo worker thread may still be releasing the last collective, which takes the GIL, while
        # its lock is held; destroying the process group with the GIL held then deadlocks (seen in gdb:
        # ~ProcessGroupGloo waiting for that lock, the pt_gloo_runloop thread waiting for the GIL, in
        # about one full test run in three). Sleeping gives the GIL up so the workers finish first.
        time.sleep(0.5)
    accelerator.end_training()
    return written
