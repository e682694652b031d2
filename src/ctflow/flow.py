"""Rectified flow: the training objective, classifier-free guidance and the chunk sampler.

Convention (t in [0, 1], 1 = pure noise; the model predicts the velocity v)::

    x_t = (1 - t) * x0 + t * noise        v = noise - x0

Sampling integrates dx/dt = v from t = 1 to t = 0 with diffusers' ``FlowMatchEulerDiscreteScheduler``
or ``FlowMatchHeunDiscreteScheduler``: their ``step`` does ``sample + (sigma_next - sigma) *
model_output``, which is this convention with t = sigma. At step i the model gets
t = ``scheduler.sigmas[i]`` and the scheduler gets ``scheduler.timesteps[i]`` (= 1000 * sigma).

A condition ``cond`` is a dict of the transformer's keyword arguments: ``encoder_hidden_states``
[B,L,text_dim], ``encoder_attention_mask`` [B,L] (1 keep, 0 pad), ``pooled_text`` [B,text_dim],
``chunk_index`` [B] long and ``context`` [B,C,S,h,w] (the previous chunk) or None for the first chunk;
optionally ``num_slices`` [B] (the meta line's slice count) and ``findings`` [B,F] (the report's finding
flags, -1 where unknown). The null condition blanks the report and its flags (part of the report) and
keeps the ``num_slices`` input and the context. The report's meta line is part of the blanked text, so
only a ``target_depth`` model, which also reads the count as a number, keeps the depth out of what
guidance pushes on; a model that reads the count as text alone is guided on it too.

Guidance: classifier-free guidance moves the velocity away from the null condition's by
``guidance_scale``. With a ``finding_scale`` (transformers that read finding flags) it is split in two,
as InstructPix2Pix splits its image and text guidance: the report text against the null condition by
``guidance_scale``, and the flags against the same report with unknown flags by ``finding_scale``::

    v = v(null) + g * (v(text) - v(null)) + f * (v(text, flags) - v(text))

``f = g`` is plain guidance. A larger ``f`` pushes harder on what the flags add (which side an
effusion is on) without pushing the rest of the report harder. On the embedded model it does not
help: the flags' own push costs the slice count (docs/experiments.md, "Finding guidance").
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from ctflow.errors import CTFlowError, check_whole, one_of

NUM_TRAIN_TIMESTEPS = 1000
TEXT_KEYS = ("encoder_hidden_states", "encoder_attention_mask", "pooled_text")
LOSS_SPACES = ("velocity", "sample")
TIME_DISTRIBUTIONS = ("logit_normal", "uniform")
SCHEDULERS = {"euler": FlowMatchEulerDiscreteScheduler, "heun": FlowMatchHeunDiscreteScheduler}


def make_scheduler(name: str = "euler", shift: float = 1.0):
    """A diffusers flow-matching scheduler ("euler" or "heun") set up for this convention."""
    if name not in SCHEDULERS:
        raise CTFlowError(f"unknown sampler {name!r}; choose {one_of(SCHEDULERS)}")
    return SCHEDULERS[name](num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # x0, noise [B,...]; t [B] -> x_t = (1 - t) * x0 + t * noise
    t = t.to(x0.dtype).view(-1, *[1] * (x0.ndim - 1))
    return (1 - t) * x0 + t * noise


def sample_time(
    batch: int,
    generator: torch.Generator | None = None,
    distribution: str = "logit_normal",
    device: torch.device | str | None = None,
    mean: float = 0.0,
    std: float = 1.0,
) -> torch.Tensor:
    """Training times t [B] in (0, 1): sigmoid(N(mean, std)) (SD3's logit-normal) or uniform."""
    rand_device = generator.device if generator is not None else device
    if distribution == "logit_normal":
        t = torch.sigmoid(mean + std * torch.randn(batch, generator=generator, device=rand_device))
    elif distribution == "uniform":
        t = torch.rand(batch, generator=generator, device=rand_device)
    else:
        raise CTFlowError(f"unknown time distribution {distribution!r}; choose {one_of(TIME_DISTRIBUTIONS)}")
    return t if device is None else t.to(device)


def model_output(out) -> torch.Tensor:
    """The velocity tensor from a model's output (a tensor or a diffusers output with ``.sample``)."""
    return out.sample if hasattr(out, "sample") else out


def flow_matching_loss(
    model: Callable,
    x0: torch.Tensor,
    cond: dict,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    distribution: str = "logit_normal",
    time_mean: float = 0.0,
    loss_space: str = "velocity",
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """MSE between the predicted and the true velocity (noise - x0) at x_t, averaged over everything.

    ``t`` [B] defaults to :func:`sample_time` with ``distribution`` (and ``time_mean`` for the
    logit-normal). ``loss_space="sample"`` weights each row by t², which is the MSE of the clean chunk
    the velocity implies (x0 = x_t - t v): the velocity MSE weights that error by 1 / t², so rows near
    pure noise, where a chunk's coarse content is decided, count little. ``weight`` (broadcast against
    ``x0``, e.g. [B,1,k,h,w]) scales each element's squared error before the mean. Returns the loss and detached
    logs: ``loss``, ``loss_per_sample`` [B] (unweighted velocity MSE) and ``t`` [B].
    """
    if loss_space not in LOSS_SPACES:
        raise CTFlowError(f"unknown loss space {loss_space!r}; choose {one_of(LOSS_SPACES)}")
    if t is None:
        t = sample_time(x0.shape[0], generator, distribution, device=x0.device, mean=time_mean)
    if noise is None:
        noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    target = noise - x0
    pred = model_output(model(interpolate(x0, noise, t), t, **cond))
    err = (pred.float() - target.float()).pow(2)
    per_sample = err.flatten(1).mean(1)
    weighted = per_sample if weight is None else (err * weight.float()).flatten(1).mean(1)
    weighted = weighted * t.float().pow(2) if loss_space == "sample" else weighted
    loss = weighted.mean()
    return loss, {"loss": loss.detach(), "loss_per_sample": per_sample.detach(), "t": t.detach()}


def context_noise(
    context: torch.Tensor | None,
    std: float | torch.Tensor = 0.05,
    generator: torch.Generator | None = None,
) -> torch.Tensor | None:
    """Training-time Gaussian noise on the context chunk [B,...], so the model tolerates its own imperfect
    chunks. ``std`` is one number or one per row [B]."""
    if context is None or (not torch.is_tensor(std) and std <= 0):
        return context
    if torch.is_tensor(std):
        std = std.to(context).view(-1, *([1] * (context.ndim - 1)))
    return context + std * randn_tensor(
        context.shape, generator=generator, device=context.device, dtype=context.dtype
    )


def null_condition(cond: dict) -> dict:
    """The unconditional version of ``cond``: zero text tokens (only the first kept), zero pooled text
    and unknown findings (-1)."""
    mask = torch.zeros_like(cond["encoder_attention_mask"])
    mask[:, 0] = 1
    out = {
        **cond,
        "encoder_hidden_states": torch.zeros_like(cond["encoder_hidden_states"]),
        "encoder_attention_mask": mask,
        "pooled_text": torch.zeros_like(cond["pooled_text"]),
    }
    if cond.get("findings") is not None:
        out["findings"] = torch.full_like(cond["findings"], -1.0)
    return out


def drop_condition(cond: dict, p: float, generator: torch.Generator | None = None) -> dict:
    """Replace the text conditioning by the null condition for a random fraction ``p`` of the batch."""
    if p <= 0:
        return cond
    pooled = cond["pooled_text"]
    rand_device = generator.device if generator is not None else pooled.device
    drop = torch.rand(pooled.shape[0], generator=generator, device=rand_device).to(pooled.device) < p  # [B]
    null = null_condition(cond)
    out = dict(cond)
    for key in TEXT_KEYS + (("findings",) if cond.get("findings") is not None else ()):
        out[key] = torch.where(drop.view(-1, *[1] * (cond[key].ndim - 1)), null[key], cond[key])
    return out


def cfg_condition(cond: dict, *others: dict) -> dict:
    """One batch [cond; others...] for a single guided forward; text of different lengths is padded."""
    others = [{**cond, **o} for o in others]
    length = max(c["encoder_hidden_states"].shape[1] for c in (cond, *others))
    out = {}
    for key, value in cond.items():
        group = [value, *(o[key] for o in others)]
        if value is None:
            out[key] = None
            continue
        if key in ("encoder_hidden_states", "encoder_attention_mask"):
            group = [_pad_length(x, length) for x in group]
        out[key] = torch.cat(group)
    return out


def _pad_length(x: torch.Tensor, length: int) -> torch.Tensor:
    # x [B,L] or [B,L,D] -> zero-padded to [B,length] or [B,length,D]
    pad = length - x.shape[1]
    return F.pad(x, (0, 0, 0, pad) if x.ndim == 3 else (0, pad))


def guidance_terms(
    cond: dict, uncond: dict | None, guidance_scale: float, finding_scale: float | None = None
) -> list[tuple[dict, float]]:
    """The conditions one guided velocity needs, with weights: v = v_last + sum_i w_i (v_i - v_last).

    ``[(cond, 1)]`` unguided; ``[(cond, g), (uncond, 0)]`` for classifier-free guidance (``uncond``
    given and ``guidance_scale`` other than 1: 0 is the unconditional velocity, between 0 and 1 a
    blend, above 1 guidance); with a ``finding_scale`` f other than the text's scale and
    ``cond`` holding finding flags, the same report with unknown flags comes between them:
    ``[(cond, f), (flagless, g - f), (uncond, 0)]``, or ``[(cond, f), (flagless, 0)]`` unguided (see
    the module docstring).
    """
    g = guidance_scale if uncond is not None else 1.0
    f = finding_scale if finding_scale is not None and cond.get("findings") is not None else g
    if f == g:  # plain guidance, or none
        return [(cond, g), (uncond, 0.0)] if g != 1.0 else [(cond, 1.0)]
    flagless = {**cond, "findings": torch.full_like(cond["findings"], -1.0)}
    if g == 1.0:  # no text guidance: the report with unknown flags is the base
        return [(cond, f), (flagless, 0.0)]
    return [(cond, f), (flagless, g - f), (uncond, 0.0)]


def _guided_batch(
    cond: dict, uncond: dict | None, guidance_scale: float, finding_scale: float | None
) -> dict:
    # the one batch guided_velocity runs the model on
    terms = guidance_terms(cond, uncond, guidance_scale, finding_scale)
    return cond if len(terms) == 1 else cfg_condition(*(c for c, _ in terms))


def text_cache_for(
    model,
    cond: dict,
    uncond: dict | None = None,
    guidance_scale: float = 1.0,
    finding_scale: float | None = None,
):
    """The report's per-block keys/values for the batch :func:`guided_velocity` runs, or None for a
    model that does not cache them: they stay the same at every ODE step."""
    if not hasattr(model, "compute_text_cache"):
        return None
    batch = _guided_batch(cond, uncond, guidance_scale, finding_scale)
    return model.compute_text_cache(batch["encoder_hidden_states"], batch["encoder_attention_mask"])


def context_cache_for(
    model,
    cond: dict,
    uncond: dict | None = None,
    guidance_scale: float = 1.0,
    finding_scale: float | None = None,
    text_cache=None,
):
    """The model's context cache for the batch :func:`guided_velocity` runs (None in concat mode);
    ``text_cache`` from :func:`text_cache_for` saves projecting the report again."""
    batch = _guided_batch(cond, uncond, guidance_scale, finding_scale)
    extra = {} if text_cache is None else {"text_cache": text_cache}
    return model.compute_context_cache(
        batch.get("context"),
        batch["encoder_hidden_states"],
        batch["encoder_attention_mask"],
        batch["pooled_text"],
        batch["chunk_index"],
        batch.get("num_slices"),
        batch.get("findings"),
        **extra,
    )


def guided_velocity(
    model: Callable,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: dict,
    uncond: dict | None = None,
    guidance_scale: float = 1.0,
    context_cache=None,
    finding_scale: float | None = None,
    text_cache=None,
) -> torch.Tensor:
    """Classifier-free guided velocity v_u + g * (v_c - v_u) from ONE forward over [cond; uncond].

    With ``guidance_scale`` 1 or no ``uncond`` it is the conditional velocity (one forward of batch B).
    A ``finding_scale`` adds the report with unknown flags to the batch (:func:`guidance_terms`).
    ``context_cache`` and ``text_cache`` must come from :func:`context_cache_for` and
    :func:`text_cache_for` with the same arguments.
    """
    t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
    terms = guidance_terms(cond, uncond, guidance_scale, finding_scale)
    extra = {} if text_cache is None else {"text_cache": text_cache}
    if len(terms) == 1:
        return model_output(model(x, t, **cond, context_cache=context_cache, **extra))
    n = len(terms)
    batch = cfg_condition(*(c for c, _ in terms))
    v = model_output(
        model(x.repeat(n, *[1] * (x.ndim - 1)), t.repeat(n), **batch, context_cache=context_cache, **extra)
    )
    *vs, last = v.chunk(n)
    out = last
    for (_, weight), vi in zip(terms, vs, strict=False):
        out = out + weight * (vi - last)
    return out


@torch.no_grad()
def skip_untrained_times(scheduler) -> None:
    """Drop the times below ``MIN_T`` (but the final 0) from ``scheduler``'s grid, for an x-prediction
    model.

    Its velocity (x_t - x0) / t is clamped at ``MIN_T``, as it trained (times below it are about 4e-5
    of its training draws). Evaluated below it, a step moves only t / MIN_T of the way, so many Euler
    steps kept about 2% of the starting noise, and Heun's correction at diffusers' last time (0.001)
    kept up to 13%. Without those times the last step runs from the last time at or above ``MIN_T``
    straight to 0 and lands on the model's clean chunk, first order, as EDM's Heun ends."""
    from ctflow.models.transformer import MIN_T

    sigmas = scheduler.sigmas
    keep = (sigmas >= MIN_T) | (sigmas == 0)
    scheduler.timesteps = scheduler.timesteps[keep[: len(scheduler.timesteps)]]
    scheduler.sigmas = sigmas[keep]


def sample_chunk(
    model: Callable,
    scheduler,
    shape: tuple[int, ...],
    cond: dict,
    num_inference_steps: int,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    uncond: dict | None = None,
    callback: Callable[[int], None] | None = None,
    finding_scale: float | None = None,
) -> torch.Tensor:
    """Generate one chunk x0 [B,C,S,h,w] from noise, integrating t: 1 -> 0 with ``scheduler``.

    The report's keys/values and the context cache are computed once and reused at every step.
    ``callback(i)`` runs after step i of ``num_inference_steps`` (Heun's two model evaluations of an
    interval count as one step, so progress reads i / num_inference_steps for either sampler).
    """
    if shape[0] != cond["pooled_text"].shape[0]:
        raise CTFlowError(
            f"sample shape {tuple(shape)} has batch {shape[0]} but cond has {cond['pooled_text'].shape[0]}"
        )
    check_whole("num_inference_steps", num_inference_steps, 1)  # 0 returned the starting noise as the chunk
    num_inference_steps = int(num_inference_steps)
    device = cond["pooled_text"].device
    x = randn_tensor(tuple(shape), generator=generator, device=device, dtype=torch.float32)
    scheduler.set_timesteps(num_inference_steps, device=device)
    if getattr(getattr(model, "config", None), "prediction", None) == "sample":
        skip_untrained_times(scheduler)
    text = text_cache_for(model, cond, uncond, guidance_scale, finding_scale)
    cache = context_cache_for(model, cond, uncond, guidance_scale, finding_scale, text)
    done, evaluations = 0, len(scheduler.timesteps)  # Heun: 2 * num_inference_steps - 1
    for i, timestep in enumerate(scheduler.timesteps):
        t = scheduler.sigmas[i].to(device=device, dtype=torch.float32).expand(shape[0])
        v = guided_velocity(model, x, t, cond, uncond, guidance_scale, cache, finding_scale, text)
        x = scheduler.step(v.float(), timestep, x, return_dict=False)[0]
        while callback is not None and done < (i + 1) * num_inference_steps // evaluations:
            callback(done)
            done += 1
    return x
