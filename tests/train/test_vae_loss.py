"""The adversarial VAE loss and the PatchGAN discriminator."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ctflow.errors import CTFlowError
from ctflow.models.discriminator import PatchDiscriminator
from ctflow.train.vae_loss import AVAELoss, hinge_d_loss, vanilla_d_loss


class _FixedPosterior:
    def __init__(self, kl):
        self._kl = torch.as_tensor(kl, dtype=torch.float32)

    def kl(self):
        return self._kl  # [N]


class _NoDiscriminator(nn.Module):
    def forward(self, x):
        raise AssertionError("the discriminator must not run before disc_start")


# --------------------------------------------------------------------------------------------------
# discriminator
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_patch_discriminator_gives_a_30x30_logit_map_for_256px_with_3_layers(norm):
    disc = PatchDiscriminator(in_channels=1, ndf=8, n_layers=3, norm=norm)
    assert disc(torch.zeros(2, 1, 256, 256)).shape == (2, 1, 30, 30)
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16, 32, 64, 1]
    assert [c.stride for c in convs] == [(2, 2)] * 3 + [(1, 1)] * 2
    assert all(c.kernel_size == (4, 4) for c in convs)


def test_patch_discriminator_refuses_unknown_norm():
    with pytest.raises(CTFlowError, match="norm"):
        PatchDiscriminator(norm="layer")


# --------------------------------------------------------------------------------------------------
# loss values
# --------------------------------------------------------------------------------------------------


def test_hinge_and_vanilla_discriminator_losses_on_known_logits():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - real) = [0, 0.5, 2] -> 5/6
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + fake) = [0, 1, 2] -> 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    expected = 0.5 * (sum(sp(-r) for r in real.tolist()) / 3 + sum(sp(f) for f in fake.tolist()) / 3)
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected)


def test_discriminator_loss_is_the_hinge_of_the_discriminator_logits_after_disc_start():
    loss_fn = AVAELoss(nn.Identity(), disc_start=10)  # logits = the images themselves
    real = torch.tensor([2.0, 0.5, -1.0]).view(3, 1, 1, 1)
    fake = torch.tensor([-2.0, 0.0, 1.0]).view(3, 1, 1, 1)
    d_loss, logs = loss_fn.discriminator_loss(real, fake, global_step=10)
    assert d_loss.item() == pytest.approx(0.5 * (5 / 6 + 1))
    assert logs["logits_real"].item() == pytest.approx(0.5)
    d_loss, _ = loss_fn.discriminator_loss(real, fake, global_step=9)
    assert d_loss.item() == 0.0


def test_generator_loss_is_l1_sum_per_sample_plus_weighted_kl_before_disc_start():
    loss_fn = AVAELoss(_NoDiscriminator(), disc_start=100, kl_weight=1e-2)
    x = torch.zeros(2, 1, 4, 4)
    recon = torch.full((2, 1, 4, 4), 0.5, requires_grad=True)
    loss, logs = loss_fn.generator_loss(x, recon, _FixedPosterior([3.0, 5.0]), global_step=99)
    # nll = 16 px * 0.5 per sample; kl = mean(3, 5) = 4
    assert loss.item() == pytest.approx(8.0 + 1e-2 * 4.0)
    assert logs["g_loss"].item() == 0.0 and logs["d_weight"].item() == 0.0
    assert logs["l1_loss"].item() == pytest.approx(0.5)
    loss.backward()
    assert recon.grad is not None


def test_l2_term_is_added_when_weighted():
    loss_fn = AVAELoss(_NoDiscriminator(), disc_start=1, l1_weight=1.0, l2_weight=2.0)
    x, recon = torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 0.5)
    loss, _ = loss_fn.generator_loss(x, recon, None, global_step=0)
    assert loss.item() == pytest.approx(4 * (0.5 + 2.0 * 0.25))


def test_generator_adversarial_term_uses_disc_weight_without_last_layer():
    loss_fn = AVAELoss(nn.Identity(), disc_start=0, disc_weight=0.5, kl_weight=0.0)
    x, recon = torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 0.5, requires_grad=True)
    loss, logs = loss_fn.generator_loss(x, recon, None, global_step=0)
    assert logs["g_loss"].item() == pytest.approx(-0.5)  # -mean(D(recon))
    assert loss.item() == pytest.approx(4 * 0.5 + 0.5 * -0.5)


# --------------------------------------------------------------------------------------------------
# with the tiny slice VAE
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vae():
    from ctflow.models.vae import SliceVAE

    torch.manual_seed(0)
    return SliceVAE.from_preset("tiny")


def _batch(n=4, size=32, seed=0):
    """Synthetic 'slices': a bright disc of random radius and centre on a dark background, in [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    imgs = []
    for _ in range(n):
        cy, cx = (torch.rand(2, generator=gen) * size / 2 + size / 4).tolist()
        r = float(torch.rand(1, generator=gen)) * size / 4 + size / 8
        imgs.append(torch.where((yy - cy) ** 2 + (xx - cx) ** 2 < r * r, 0.6, -0.8))
    return torch.stack(imgs)[:, None].float()  # [N, 1, H, W]


def test_adaptive_weight_is_finite_positive_and_the_clamped_grad_norm_ratio(tiny_vae):
    torch.manual_seed(0)
    loss_fn = AVAELoss(disc_ndf=8, disc_start=0, disc_weight=0.5)
    x = _batch(2)
    recon, posterior = tiny_vae(x)
    loss, logs = loss_fn.generator_loss(x, recon, posterior, global_step=0, last_layer=tiny_vae.last_layer)
    d_weight = logs["d_weight"].item()
    assert math.isfinite(d_weight) and d_weight > 0

    nll = (x - recon).abs().sum() / 2
    g = -loss_fn.discriminator(recon).mean()
    (gn,) = torch.autograd.grad(nll, tiny_vae.last_layer, retain_graph=True)
    (gg,) = torch.autograd.grad(g, tiny_vae.last_layer, retain_graph=True)
    assert d_weight == pytest.approx(0.5 * min(gn.norm().item() / (gg.norm().item() + 1e-4), 1e4), rel=1e-4)
    loss.backward()  # the graph survives the adaptive-weight grads


def test_adaptive_weight_needs_last_layer_in_the_graph_and_is_zero_under_no_grad(tiny_vae):
    loss_fn = AVAELoss(disc_ndf=8, disc_start=0)
    x = _batch(2)
    recon, posterior = tiny_vae(x)
    with pytest.raises(CTFlowError, match="last_layer"):
        loss_fn.generator_loss(x, recon, posterior, 0, last_layer=nn.Parameter(torch.ones(1)))
    with torch.no_grad():
        recon, posterior = tiny_vae(x)
        _, logs = loss_fn.generator_loss(x, recon, posterior, 0, last_layer=tiny_vae.last_layer)
    assert logs["d_weight"].item() == 0.0


def test_forward_dispatches_on_optimizer_idx():
    loss_fn = AVAELoss(nn.Identity(), disc_start=0)
    x, recon = torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 0.5)
    g, g_logs = loss_fn(x, recon, None, 0, 5)
    d, d_logs = loss_fn(x, recon, None, 1, 5)
    assert "nll_loss" in g_logs and "disc_loss" in d_logs
    with pytest.raises(CTFlowError, match="optimizer_idx"):
        loss_fn(x, recon, None, 2, 5)
    with pytest.raises(CTFlowError, match="differ in shape"):
        loss_fn.generator_loss(x, recon[..., :1], None, 0)


def test_a_few_adversarial_training_steps_reduce_the_tiny_vae_l1(tiny_vae):
    torch.manual_seed(0)
    vae = type(tiny_vae).from_preset("tiny")
    loss_fn = AVAELoss(disc_ndf=8, disc_norm="group", disc_start=20, kl_weight=1e-6)
    opt_ae = torch.optim.Adam(vae.parameters(), lr=2e-3)
    opt_d = torch.optim.Adam(loss_fn.discriminator.parameters(), lr=2e-4)
    x = _batch(2)
    l1 = []
    for step in range(30):
        recon, posterior = vae(x)
        loss, logs = loss_fn.generator_loss(x, recon, posterior, step, last_layer=vae.last_layer)
        opt_ae.zero_grad()
        loss.backward()
        opt_ae.step()
        d_loss, _ = loss_fn.discriminator_loss(x, recon, step)
        opt_d.zero_grad()
        d_loss.backward()
        opt_d.step()
        l1.append(logs["l1_loss"].item())
        assert all(math.isfinite(v.item()) for v in logs.values())
    assert logs["disc_factor"].item() == 1.0 and logs["d_weight"].item() > 0
    assert min(l1[-5:]) < 0.5 * l1[0], l1
