"""PatchGAN discriminator (pix2pix / taming-transformers ``NLayerDiscriminator``).

It scores overlapping patches of a slice as real or reconstructed: for a
256x256 input and ``n_layers=3`` the output is a ``[N, 1, 30, 30]`` map of
logits, each seeing a 70x70 receptive field.
"""

from __future__ import annotations

import math

from torch import nn

from ctflow.errors import CTFlowError, one_of

NORMS = ("batch", "group", "none")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)  # 32 groups when the channels allow
    return nn.Identity()


class PatchDiscriminator(nn.Module):
    """``n_layers`` 4x4 stride-2 convs (channels ``ndf * min(2**i, 8)``) + a stride-1 conv + a 1-channel head.

    Args:
        in_channels: image channels (1 for grayscale CT slices).
        ndf: channels of the first layer.
        n_layers: number of stride-2 downsampling convs.
        norm: ``"batch"`` (taming default), ``"group"`` (batch-size independent) or ``"none"``.
    """

    def __init__(self, in_channels: int = 1, ndf: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        if norm not in NORMS:
            raise CTFlowError(f"unknown discriminator norm {norm!r}; choose {one_of(NORMS)}")
        if n_layers < 1 or ndf < 1 or in_channels < 1:
            raise CTFlowError(
                f"discriminator needs n_layers, ndf, in_channels >= 1; got {n_layers}, {ndf}, {in_channels}"
            )
        use_bias = norm != "batch"  # BatchNorm has its own affine shift
        kw, padw = 4, 1
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, ndf, kernel_size=kw, stride=2, padding=padw),
            nn.LeakyReLU(0.2, True),
        ]
        mult = 1
        for n in range(1, n_layers):  # gradually increase the number of filters
            prev, mult = mult, min(2**n, 8)
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, kernel_size=kw, stride=2, padding=padw, bias=use_bias),
                _norm(norm, ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [
            nn.Conv2d(ndf * prev, ndf * mult, kernel_size=kw, stride=1, padding=padw, bias=use_bias),
            _norm(norm, ndf * mult),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * mult, 1, kernel_size=kw, stride=1, padding=padw),  # patch logits
        ]
        self.main = nn.Sequential(*layers)
        self.apply(_weights_init)

    def forward(self, x):
        # x: [N, in_channels, H, W] -> logits [N, 1, H', W']
        return self.main(x)


def _weights_init(m: nn.Module) -> None:
    """DCGAN/taming init: conv ~ N(0, 0.02); norm scale ~ N(1, 0.02), shift 0."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
