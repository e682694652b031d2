"""Adversarial VAE loss for the slice autoencoder (taming-transformers ``LPIPSWithDiscriminator`` without LPIPS).

Generator (autoencoder) step::

    nll   = sum over pixels of (l1_weight * |x - x_hat| + l2_weight * (x - x_hat)^2), averaged over the batch
    kl    = KL(q(z|x) || N(0, I)) summed over latent elements, averaged over the batch
    g     = -mean(D(x_hat))
    loss  = nll + kl_weight * kl + d_weight * disc_factor * g

``d_weight`` is taming's adaptive weight: ``||grad nll|| / (||grad g|| + 1e-4)``
w.r.t. the decoder's last layer, clamped to ``[0, max_adaptive_weight]``,
detached and multiplied by ``disc_weight``. Before ``disc_start`` the
adversarial terms are off (``disc_factor = 0``) and the discriminator is not
even run in the generator step.

Discriminator step::

    loss = disc_factor * 0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat))))   # hinge

Use :meth:`AVAELoss.generator_loss` with the autoencoder's optimizer and
:meth:`AVAELoss.discriminator_loss` with the discriminator's optimizer (zero the
discriminator's gradients before its step: the generator step also reaches its
parameters). ``forward(..., optimizer_idx, ...)`` dispatches like taming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ctflow.errors import CTFlowError, one_of
from ctflow.models.discriminator import PatchDiscriminator


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


DISC_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def adopt_weight(weight: float, global_step: int, threshold: int = 0, value: float = 0.0) -> float:
    """``weight`` from step ``threshold`` on, ``value`` before it."""
    return weight if global_step >= threshold else value


class AVAELoss(nn.Module):
    """Reconstruction (L1 + optional L2) + KL + PatchGAN adversarial loss with an adaptive weight.

    Args:
        discriminator: the discriminator; default ``PatchDiscriminator(disc_in_channels, disc_ndf,
            disc_layers, disc_norm)``.
        disc_start: first global step with adversarial terms (both steps); 0 before it.
        disc_weight: multiplies the adaptive weight.
        disc_factor: multiplies both adversarial terms once active.
        disc_loss: ``"hinge"`` or ``"vanilla"`` (non-saturating BCE).
        l1_weight, l2_weight: per-pixel reconstruction weights.
        kl_weight: weight of the KL term.
        max_adaptive_weight: clamp of the adaptive weight.
    """

    def __init__(
        self,
        discriminator: nn.Module | None = None,
        *,
        disc_start: int = 0,
        disc_weight: float = 0.5,
        disc_factor: float = 1.0,
        disc_loss: str = "hinge",
        l1_weight: float = 1.0,
        l2_weight: float = 0.0,
        kl_weight: float = 1e-6,
        max_adaptive_weight: float = 1e4,
        disc_in_channels: int = 1,
        disc_ndf: int = 64,
        disc_layers: int = 3,
        disc_norm: str = "batch",
    ):
        super().__init__()
        if disc_loss not in DISC_LOSSES:
            raise CTFlowError(f"unknown disc_loss {disc_loss!r}; choose {one_of(DISC_LOSSES)}")
        if min(l1_weight, l2_weight, kl_weight, disc_weight, disc_factor) < 0 or l1_weight + l2_weight <= 0:
            raise CTFlowError("loss weights must be >= 0, with l1_weight + l2_weight > 0")
        if discriminator is None:
            discriminator = PatchDiscriminator(
                in_channels=disc_in_channels, ndf=disc_ndf, n_layers=disc_layers, norm=disc_norm
            )
        self.discriminator = discriminator
        self.disc_start = int(disc_start)
        self.disc_weight = float(disc_weight)
        self.disc_factor = float(disc_factor)
        self.disc_loss_name = disc_loss
        self.disc_loss = DISC_LOSSES[disc_loss]
        self.l1_weight = float(l1_weight)
        self.l2_weight = float(l2_weight)
        self.kl_weight = float(kl_weight)
        self.max_adaptive_weight = float(max_adaptive_weight)

    # pieces ---------------------------------------------------------------------------------------

    def reconstruction_loss(self, inputs: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """Per-pixel loss map [N, C, H, W]."""
        if inputs.shape != recon.shape:
            raise CTFlowError(
                f"inputs {tuple(inputs.shape)} and reconstructions {tuple(recon.shape)} differ in shape"
            )
        diff = inputs.contiguous() - recon.contiguous()
        rec = self.l1_weight * diff.abs()
        if self.l2_weight:
            rec = rec + self.l2_weight * diff.square()
        return rec

    def calculate_adaptive_weight(
        self, nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor
    ) -> torch.Tensor:
        """``disc_weight * clamp(||d nll/d W|| / (||d g/d W|| + 1e-4), 0, max)`` with ``W = last_layer``."""
        nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True, allow_unused=True)[0]
        g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True, allow_unused=True)[0]
        if nll_grads is None or g_grads is None:
            raise CTFlowError(
                "last_layer is not in the graph of the reconstruction; pass the decoder's output conv "
                "weight (SliceVAE.last_layer)"
            )
        d_weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
        return torch.clamp(d_weight, 0.0, self.max_adaptive_weight).detach() * self.disc_weight

    # the two steps --------------------------------------------------------------------------------

    def generator_loss(
        self,
        inputs: torch.Tensor,
        recon: torch.Tensor,
        posterior=None,
        global_step: int = 0,
        last_layer: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Autoencoder loss for inputs/recon [N, C, H, W] and the posterior (``.kl() -> [N]``, or None).

        With ``last_layer`` the adversarial weight is adaptive; without it, it is
        ``disc_weight``. Under ``torch.no_grad`` (validation) it is 0, as in taming.
        """
        batch = inputs.shape[0]
        rec = self.reconstruction_loss(inputs, recon)  # [N, C, H, W]
        nll_loss = rec.sum() / batch
        if posterior is not None:
            kl_loss = posterior.kl().sum() / batch
        else:
            kl_loss = rec.new_zeros(())
        loss = nll_loss + self.kl_weight * kl_loss

        disc_factor = adopt_weight(self.disc_factor, global_step, self.disc_start)
        g_loss = rec.new_zeros(())
        d_weight = rec.new_zeros(())
        if disc_factor > 0:
            logits_fake = self.discriminator(recon.contiguous())
            g_loss = -logits_fake.mean()
            if not torch.is_grad_enabled():
                d_weight = rec.new_zeros(())
            elif last_layer is not None:
                d_weight = self.calculate_adaptive_weight(nll_loss, g_loss, last_layer)
            else:
                d_weight = rec.new_tensor(self.disc_weight)
            loss = loss + d_weight * disc_factor * g_loss

        logs = {
            "total_loss": loss.detach(),
            "nll_loss": nll_loss.detach(),
            "rec_loss": rec.detach().mean(),  # per pixel
            "l1_loss": (inputs.detach() - recon.detach()).abs().mean(),
            "kl_loss": kl_loss.detach(),
            "g_loss": g_loss.detach(),
            "d_weight": d_weight.detach(),
            "disc_factor": rec.new_tensor(disc_factor),
        }
        return loss, logs

    def discriminator_loss(
        self, inputs: torch.Tensor, recon: torch.Tensor, global_step: int = 0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Discriminator loss on real ``inputs`` vs ``recon`` (both detached here)."""
        if inputs.shape != recon.shape:
            raise CTFlowError(
                f"inputs {tuple(inputs.shape)} and reconstructions {tuple(recon.shape)} differ in shape"
            )
        logits_real = self.discriminator(inputs.detach().contiguous())
        logits_fake = self.discriminator(recon.detach().contiguous())
        disc_factor = adopt_weight(self.disc_factor, global_step, self.disc_start)
        d_loss = disc_factor * self.disc_loss(logits_real, logits_fake)  # 0 (with zero grads) before start
        logs = {
            "disc_loss": d_loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
            "disc_factor": logits_real.new_tensor(disc_factor).detach(),
        }
        return d_loss, logs

    def forward(
        self,
        inputs: torch.Tensor,
        recon: torch.Tensor,
        posterior,
        optimizer_idx: int,
        global_step: int,
        last_layer: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Taming-style entry point: ``optimizer_idx`` 0 = autoencoder, 1 = discriminator."""
        if optimizer_idx == 0:
            return self.generator_loss(inputs, recon, posterior, global_step, last_layer)
        if optimizer_idx == 1:
            return self.discriminator_loss(inputs, recon, global_step)
        raise CTFlowError(
            f"optimizer_idx must be 0 (autoencoder) or 1 (discriminator); got {optimizer_idx!r}"
        )
