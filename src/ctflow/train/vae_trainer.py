"""Slice-autoencoder training (``ctflow train-vae``): the A-VAE objective on CT slices.

Slices are drawn at random from every volume of a CT-RATE-layout data set
(normalised HU, resized in-plane to ``image_size``), plus a few white slices so
the end-of-scan marker reconstructs cleanly. The loss is L1 + KL and, from
``disc_start`` on, a PatchGAN hinge loss with adaptive weight. At the end the
latent scale/shift are set from data statistics (unit variance, zero mean),
as FLUX's constants do for natural images.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ctflow.errors import CTFlowError, warn
from ctflow.train.checkpoint import clean_partial, list_checkpoints, restore, save_checkpoint
from ctflow.train.config import VAETrainConfig, warn_changed_settings
from ctflow.train.utils import (
    StepBar,
    append_jsonl,
    check_run_folder,
    final_weights_due,
    lr_lambda,
    resume_note,
    step_generator,
    trim_log,
)

WHITE_FRACTION = 0.02  # share of training slices that are all-white EOS slices
SHAPE_KEYS = ("in_channels", "latent_channels", "block_out_channels", "layers_per_block")


class SliceSet:
    """Slices kept as the per-volume tensors they were read into, indexed as one [N,H,W] tensor.

    Concatenating them would hold every slice twice while the copy is made, doubling the peak memory
    of a data set read whole (``configs/flux-vae.yaml`` lets it reach 8 GB)."""

    def __init__(self, parts: list[torch.Tensor]):
        self.parts = parts
        self.starts = torch.tensor([0] + [len(p) for p in parts]).cumsum(0)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index) -> torch.Tensor:
        """The slices at ``index`` (a tensor of positions, or a slice), stacked in that order."""
        if isinstance(index, slice):
            index = torch.arange(len(self))[index]
        part = torch.searchsorted(self.starts, index, right=True) - 1
        return torch.stack(
            [
                self.parts[p][i]
                for p, i in zip(part.tolist(), (index - self.starts[part]).tolist(), strict=True)
            ]
        )


def load_slices(
    data: str | Path,
    image_size: int,
    split: str = "train",
    max_volumes: int | None = None,
    window=None,
    slices_per_volume: int | None = None,
    log=None,
):
    """The slices of a data set as float16 [N,size,size] (a :class:`SliceSet`), normalised with HU ``window``:
    every slice of every volume, or of the first ``max_volumes`` readable ones, or ``slices_per_volume``
    evenly spaced slices of each. Each volume it skips (unreadable, or holding NaN) is named to ``log``."""
    from ctflow.data.ctrate import CTRateDataset
    from ctflow.train.latents import prepare_slices

    ds = CTRateDataset.open(data, split)
    slices = []
    for sample in ds:
        if max_volumes is not None and len(slices) >= max_volumes:
            break
        hu = sample.volume.hu()
        if not np.all(np.isfinite(hu)):
            ds.problems.append(f"{sample.name}: holds NaN or infinite values (the volume is skipped)")
            continue
        if slices_per_volume is not None and slices_per_volume < len(hu):
            hu = hu[np.unique(np.linspace(0, len(hu) - 1, slices_per_volume).round().astype(int))]
        slices.append(prepare_slices(hu, image_size, window).half())
    if log is not None:
        for problem in ds.problems:
            log(f"skipped {problem}")
    if not slices:
        raise CTFlowError(
            f"no readable volumes in {data} ({len(ds.problems)} problems, e.g. {ds.problems[:1]})"
        )
    return SliceSet(slices)


def sample_batch(slices: SliceSet, batch_size: int, g: torch.Generator) -> torch.Tensor:
    idx = torch.randint(len(slices), (batch_size,), generator=g)
    x = slices[idx].float()[:, None]  # [B,1,H,W]
    white = torch.rand(batch_size, generator=g) < WHITE_FRACTION
    x[white] = 1.0
    return x


@torch.no_grad()
def latent_stats(vae, slices: SliceSet, n: int = 512, seed: int = 0) -> tuple[float, float]:
    """Mean and std of unscaled posterior means over ``n`` random slices."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(slices), generator=g)[:n]
    z = torch.cat([vae.encode_posterior(slices[chunk].float()[:, None]).mean for chunk in idx.split(64)])
    return float(z.mean()), float(z.std())


def train_vae(
    data: str | Path,
    config: VAETrainConfig,
    out: str | Path,
    resume: bool = False,
    stop_at: int | None = None,
    progress: bool = True,
    slices: SliceSet | torch.Tensor | None = None,
    device: torch.device | str | None = None,
    log=None,
) -> Path | None:
    """Train and write ``out/vae`` (a diffusers folder), ``out/checkpoints`` and ``out/log.jsonl``;
    return ``out/vae`` when this call wrote it, None when it did not (stopped early, or a resume of a
    run that had already finished and written it).

    The VAE and the discriminator train on ``device`` (None: the CPU); the slices stay in CPU memory
    and each batch is drawn there (the same draws on every device) and moved. ``log`` hears about the
    volumes the data set could not give."""
    from ctflow.models.vae import SliceVAE
    from ctflow.train.vae_loss import AVAELoss

    out = check_run_folder(out, resume)
    torch.manual_seed(config.seed)
    if config.init:  # fine-tune given weights (the paper's A-VAE starts from FLUX's)
        from ctflow.models.vae import load_vae, preset_config

        # a folder brings its own config; a single FLUX file is read with the preset's layout
        preset = preset_config(config.preset)
        vae = SliceVAE(load_vae(config.init, config={**preset, **config.vae}))
        differs = any(  # the chosen preset's shape against the folder's (JSON has lists, presets tuples)
            json.dumps(preset[k]) != json.dumps(vae.vae.config.get(k)) for k in SHAPE_KEYS
        )
        if Path(config.init).is_dir() and (config.vae or (config.preset != "tiny" and differs)):
            warn(
                f"--init {config.init} is a folder: its config.json sets the VAE's shape, and the config's"
                " preset and vae keys are not used"
            )
    else:
        vae = SliceVAE.from_preset(config.preset, **config.vae)
    if config.image_size % vae.downsample_factor:  # found at the first step, once every slice was read
        raise CTFlowError(
            f"image_size {config.image_size} must be a multiple of {vae.downsample_factor}, the VAE's"
            " downsampling; set image_size in the config"
        )
    if slices is None:  # after the weights: a wrong --init is named before the data set is read
        slices = load_slices(
            data,
            config.image_size,
            window=config.hu_window,
            max_volumes=config.max_volumes,
            slices_per_volume=config.slices_per_volume,
            log=log,
        )
    vae.set_hu_window(config.hu_window)
    vae.set_slice_size(config.image_size)  # what encode resizes slices to (the preset's is 64 or 1024)
    loss_fn = AVAELoss(
        disc_start=config.disc_start,
        disc_weight=config.disc_weight,
        kl_weight=config.kl_weight,
        disc_in_channels=1,  # it judges grayscale slices: SliceVAE averages an RGB (FLUX) output
        disc_ndf=32,
        disc_layers=2,
        disc_norm="group",
    )
    vae.to(device)  # before the optimizers: their state then lives beside the weights
    loss_fn.to(device)
    o = config.optim
    # fused, as in the flow trainer: one kernel, not a Python loop over 164 tensors (tiny preset:
    # 1.5 ms against 5.5 ms a step, ~6 s of the recipe's 1500 steps); the same update up to rounding
    opt_g = torch.optim.AdamW(
        vae.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, fused=True
    )
    opt_d = torch.optim.AdamW(
        loss_fn.discriminator.parameters(), lr=config.disc_lr, betas=(0.5, 0.9), fused=True
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt_g, lr_lambda(o.warmup_steps, config.steps, o.min_lr_ratio))
    ckpt_dir, step = out / "checkpoints", 0
    modules, optims = {"vae": vae, "disc": loss_fn.discriminator}, {"opt_g": opt_g, "opt_d": opt_d}
    if resume:
        clean_partial(ckpt_dir)
        if found := list_checkpoints(ckpt_dir):
            info = restore(found[-1], modules, optims)
            step = info["step"]
            warn_changed_settings(info, config, step)
            sched.last_epoch = step
        if progress:
            print(resume_note(step, config.steps, ckpt_dir), file=sys.stderr)
        trim_log(out / "log.jsonl", step)  # steps after the checkpoint are trained (and logged) again
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(config), indent=1))
    end = min(config.steps, stop_at) if stop_at is not None else config.steps
    start = step
    bar = StepBar(progress, "train-vae", end, step)
    try:
        vae.train()
        since, logged = time.perf_counter(), step  # the interval since the last log line
        while step < end:
            g = step_generator(config.seed, step)
            x = sample_batch(slices, config.batch_size, g).to(device)
            recon, posterior = vae(x, sample=True, generator=g)
            loss, logs = loss_fn.generator_loss(
                x, recon, posterior, global_step=step, last_layer=vae.last_layer
            )
            if not torch.isfinite(loss):  # stop before a checkpoint or a log line holds it
                raise CTFlowError(
                    f"the loss became {float(loss.detach())} at step {step + 1}; lower optim.lr, or --resume from the last"
                    f" checkpoint in {ckpt_dir}"
                )
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            if o.grad_clip > 0:  # the pixel-summed loss has large gradient norms; 0 turns clipping off
                torch.nn.utils.clip_grad_norm_(vae.parameters(), o.grad_clip)
            opt_g.step()
            lr = sched.get_last_lr()[0]  # the rate this step took
            sched.step()
            opt_d.zero_grad(set_to_none=True)
            if step >= config.disc_start:
                d_loss, d_logs = loss_fn.discriminator_loss(x, recon.detach(), global_step=step)
                d_loss.backward()
                opt_d.step()
                logs.update(d_logs)
            step += 1
            if step % config.log_every == 0 or step == end:
                record = {"step": step, **{k: round(float(v), 6) for k, v in logs.items() if v.numel() == 1}}
                now = time.perf_counter()
                record.update(lr=lr, sec_per_step=round((now - since) / (step - logged), 4))
                since, logged = now, step
                append_jsonl(out / "log.jsonl", record)
                bar.update(step, float(logs["l1_loss"]))
            if step % config.checkpoint_every == 0 or step == end:
                save_checkpoint(
                    ckpt_dir, step, modules, optims, {"config": asdict(config)}, keep=config.keep_checkpoints
                )
    finally:
        bar.close()  # a stop mid-run too: the terminal gets its cursor back
    # a resume of a finished run writes nothing: its latent statistics would be taken again from
    # whatever --data is given now, and every cache encoded with the VAE would then be another VAE's
    if final_weights_due(out / "vae", step, start, config.steps):
        vae.eval()
        mean, std = latent_stats(vae, slices, seed=config.seed)
        vae.set_latent_stats(1.0 / std, mean)
        vae.save(out / "vae", overwrite=True)
        return out / "vae"
    return None
