"""The slice autoencoder: a FLUX-style ``diffusers.AutoencoderKL`` applied to one axial slice at a time.

Every 2D axial slice of a CT volume is encoded on its own into a 2D latent; the
flow transformer generates stacks of those latents and the VAE decodes them
back slice by slice. The VAE sees slices normalised to ``[-1, 1]`` with its own
HU window (:attr:`SliceVAE.hu_window`, saved in its config; default linear
``[-1000, 1000]``, see ``ctflow.data.hu.normalize_hu``).

Presets (``VAE_PRESETS``)
-------------------------
``"flux"``
    The FLUX.1 VAE (83,819,683 parameters): 3 image channels (a grayscale slice
    is replicated into RGB on the way in and the 3 output channels are
    averaged on the way out), 16 latent channels, block channels
    ``(128, 256, 512, 512)`` -> 3 downsamplings = **8x** spatial reduction, so a
    512x512 slice becomes a ``16 x 64 x 64`` latent. Latents are normalised with
    the FLUX constants ``(z - 0.1159) * 0.3611``.
``"tiny"``
    A small VAE for tests and quick experiments: 1 image channel, 8 latent
    channels, block channels ``(32, 64, 128)`` -> **4x** spatial reduction, so a
    64x64 slice becomes an ``8 x 16 x 16`` latent. Scale/shift start at
    ``1.0 / 0.0``; the trainer sets them from latent statistics with
    :meth:`SliceVAE.set_latent_stats`.

Weights are only ever read from ``.safetensors`` files, offline
(:func:`load_vae`): either a diffusers folder or a single original FLUX
``ae.safetensors`` (black-forest-labs key layout), converted here.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ctflow.errors import CTFlowError, one_of

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

    from ctflow.data.volume import Volume

VAE_PRESETS: dict[str, dict[str, Any]] = {
    # FLUX.1 [dev/schnell] ``vae/config.json``.
    "flux": {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 16,
        "block_out_channels": (128, 256, 512, 512),
        "layers_per_block": 2,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "mid_block_add_attention": True,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "force_upcast": True,
        "scaling_factor": 0.3611,
        "shift_factor": 0.1159,
        "sample_size": 1024,
    },
    # Same design, small: 1 channel in/out, 8 latent channels, 4x downsampling.
    "tiny": {
        "in_channels": 1,
        "out_channels": 1,
        "latent_channels": 8,
        "block_out_channels": (32, 64, 128),
        "layers_per_block": 1,
        "down_block_types": ("DownEncoderBlock2D",) * 3,
        "up_block_types": ("UpDecoderBlock2D",) * 3,
        "act_fn": "silu",
        "norm_num_groups": 16,
        "mid_block_add_attention": True,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "force_upcast": True,
        "scaling_factor": 1.0,
        "shift_factor": 0.0,
        "sample_size": 64,
    },
}

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"


def _autoencoder_cls():
    from diffusers import AutoencoderKL

    return AutoencoderKL


def preset_config(preset: str) -> dict[str, Any]:
    """A copy of the ``AutoencoderKL`` config of a preset (``VAE_PRESETS``)."""
    if preset not in VAE_PRESETS:
        raise CTFlowError(f"unknown VAE preset {preset!r}; choose {one_of(VAE_PRESETS)}")
    return copy.deepcopy(VAE_PRESETS[preset])


def check_vae_config(config: dict[str, Any]) -> None:
    """Refuse an ``AutoencoderKL`` config diffusers would reject with a traceback, quietly drop keys of
    (``from_config``: a misspelt override), or build into a model that fails at its first step."""
    import inspect

    known = set(inspect.signature(_autoencoder_cls().__init__).parameters) - {"self"}
    if unknown := sorted(k for k in config if not k.startswith("_") and k not in known):
        raise CTFlowError(f"unknown VAE config keys: {', '.join(unknown)}")
    blocks = config.get("block_out_channels", ())
    if (
        not isinstance(blocks, list | tuple)
        or not blocks
        or not all(isinstance(b, int) and b > 0 for b in blocks)
    ):
        raise CTFlowError(f"VAE block_out_channels must be a list of whole numbers > 0, got {blocks!r}")
    for key in ("down_block_types", "up_block_types"):
        if key in config and len(config[key]) != len(blocks):
            raise CTFlowError(
                f"VAE {key} has {len(config[key])} blocks, block_out_channels {len(blocks)}; give both the"
                " same number"
            )
    groups = config.get("norm_num_groups", 32)
    if not isinstance(groups, int) or groups < 1 or any(b % groups for b in blocks):
        raise CTFlowError(
            f"VAE norm_num_groups {groups!r} must divide every block_out_channels {list(blocks)}"
        )


def build_vae(preset: str = "tiny", **overrides) -> AutoencoderKL:
    """A randomly initialised ``AutoencoderKL`` from a preset, with config ``overrides``."""
    config = preset_config(preset)
    config.update(overrides)
    check_vae_config(config)
    try:
        return _autoencoder_cls()(**config)
    except (TypeError, ValueError) as e:
        raise CTFlowError(f"bad VAE config override: {e}") from None


def vae_downsample_factor(config) -> int:
    """Spatial reduction of an ``AutoencoderKL`` config: one 2x per block but the last."""
    return 2 ** (len(config["block_out_channels"]) - 1)


# --------------------------------------------------------------------------------------------------
# The slice wrapper
# --------------------------------------------------------------------------------------------------


class SliceVAE(nn.Module):
    """Encode/decode grayscale CT slices (normalised to ``[-1, 1]``) with an ``AutoencoderKL``.

    ``latents = (z - shift_factor) * scaling_factor`` where ``z`` is the posterior
    mean (or a sample); :meth:`decode_slices` inverts it. The volume methods work
    in bounded batches of slices under ``torch.no_grad`` so peak activation memory
    does not depend on the number of slices.
    """

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    # construction --------------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, preset: str = "tiny", **overrides) -> SliceVAE:
        return cls(build_vae(preset, **overrides))

    @classmethod
    def load(cls, path, preset: str | None = None, config=None) -> SliceVAE:
        return cls(load_vae(path, preset=preset, config=config))

    def save(self, path, overwrite: bool = False) -> Path:
        """Write a diffusers folder (config.json + safetensors) atomically."""
        from ctflow.files import atomic_dir

        with atomic_dir(path, overwrite=overwrite) as tmp:
            self.vae.save_pretrained(tmp, safe_serialization=True)
        return Path(path)

    # geometry and normalisation ------------------------------------------------------------------

    @property
    def downsample_factor(self) -> int:
        return vae_downsample_factor(self.vae.config)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def image_channels(self) -> int:
        return int(self.vae.config.in_channels)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        shift = self.vae.config.shift_factor
        return 0.0 if shift is None else float(shift)

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output conv weight (for the adaptive adversarial weight)."""
        return self.vae.decoder.conv_out.weight

    @property
    def hu_window(self) -> tuple[float, ...]:
        """HU knots the VAE's ``[-1, 1]`` input is mapped from (``ctflow.data.hu.normalize_hu``)."""
        from ctflow.data.hu import HU_WINDOW

        return tuple(float(v) for v in self.vae.config.get("_hu_window") or HU_WINDOW)

    def set_hu_window(self, window) -> None:
        """Set the HU window; stored in the config (a private key diffusers keeps) and saved."""
        from ctflow.data.hu import check_window

        self.vae.register_to_config(_hu_window=list(check_window(window)))

    def set_slice_size(self, size: int) -> None:
        """Set the slice size (px) this VAE is trained at: its config's ``sample_size``, saved with it,
        which ``ctflow encode`` resizes every slice to."""
        self.vae.register_to_config(sample_size=int(size))

    def normalize(self, hu):
        """HU (numpy/torch/number) -> this VAE's ``[-1, 1]`` input range."""
        from ctflow.data.hu import normalize_hu

        return normalize_hu(hu, self.hu_window)

    def denormalize(self, x, clip: bool = True):
        """This VAE's ``[-1, 1]`` output range -> HU (inverse of :meth:`normalize`)."""
        from ctflow.data.hu import denormalize_hu

        return denormalize_hu(x, self.hu_window, clip=clip)

    def set_latent_stats(self, scaling_factor: float, shift_factor: float = 0.0) -> None:
        """Set the latent normalisation; stored in the config so it is saved with the weights."""
        scaling_factor, shift_factor = float(scaling_factor), float(shift_factor)
        if not np.isfinite(scaling_factor) or scaling_factor <= 0 or not np.isfinite(shift_factor):
            raise CTFlowError(
                f"latent scaling_factor must be a positive finite number and shift_factor finite; "
                f"got {scaling_factor}, {shift_factor}"
            )
        self.vae.register_to_config(scaling_factor=scaling_factor, shift_factor=shift_factor)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """``(C, h, w)`` of one slice's latent."""
        f = self.downsample_factor
        if height % f or width % f or height <= 0 or width <= 0:
            raise CTFlowError(
                f"slice size {height}x{width} is not a multiple of the VAE's downsampling factor {f}; "
                f"resize or pad the slices to a multiple of {f}"
            )
        return self.latent_channels, height // f, width // f

    # slices --------------------------------------------------------------------------------------

    def _to_model(self, x: torch.Tensor) -> torch.Tensor:
        p = next(self.vae.parameters())
        return x.to(device=p.device, dtype=p.dtype)

    def _check_slices(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, 1, H, W] (or [N, in_channels, H, W]) -> [N, in_channels, H, W]
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] not in (1, self.image_channels):
            shape = tuple(x.shape) if hasattr(x, "shape") else type(x).__name__
            raise CTFlowError(f"slices must be a tensor [N, 1, H, W]; got {shape}")
        self.latent_shape(x.shape[-2], x.shape[-1])
        if x.shape[1] != self.image_channels:
            x = x.expand(-1, self.image_channels, -1, -1)  # grayscale -> RGB by replication
        return x

    def encode_posterior(self, x: torch.Tensor):
        """``DiagonalGaussianDistribution`` over the raw latent ``z`` of slices ``x`` [N, 1, H, W]."""
        return self.vae.encode(self._to_model(self._check_slices(x))).latent_dist

    def encode_slices(
        self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Slices [N, 1, H, W] in [-1, 1] -> normalised latents [N, C, H/f, W/f]."""
        posterior = self.encode_posterior(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return (z - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def eos_latent(self, size: int, device=None) -> torch.Tensor:
        """The latent [C, size/f, size/f] of a white ``size`` x ``size`` slice: the end-of-scan marker
        that training teaches (the latent cache stores it) and generation looks for."""
        return self.encode_slices(torch.ones(1, 1, size, size, device=device))[0]

    def decode_slices(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [N, C, h, w] -> slices [N, 1, h*f, w*f] (about [-1, 1], not clamped)."""
        if (
            not isinstance(latents, torch.Tensor)
            or latents.ndim != 4
            or latents.shape[1] != self.latent_channels
        ):
            shape = tuple(latents.shape) if hasattr(latents, "shape") else type(latents).__name__
            raise CTFlowError(f"latents must be a tensor [N, {self.latent_channels}, h, w]; got {shape}")
        z = self._to_model(latents) / self.scaling_factor + self.shift_factor
        x = self.vae.decode(z).sample  # [N, out_channels, H, W]
        if x.shape[1] != 1:
            x = x.mean(dim=1, keepdim=True)  # RGB -> grayscale
        return x

    def forward(
        self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, Any]:
        """Training pass: slices [N, 1, H, W] -> (reconstruction [N, 1, H, W], posterior)."""
        posterior = self.encode_posterior(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        recon = self.vae.decode(z).sample
        if recon.shape[1] != 1:
            recon = recon.mean(dim=1, keepdim=True)
        return recon, posterior

    # volumes -------------------------------------------------------------------------------------

    def _normalised_slices(self, volume):
        """A Volume (HU) -> normalised float32 array; arrays/tensors pass through (already in [-1, 1])."""
        from ctflow.data.volume import Volume

        if isinstance(volume, Volume):
            return np.asarray(self.normalize(volume.hu()), dtype=np.float32)
        if isinstance(volume, torch.Tensor):
            return volume.detach()
        return np.asarray(volume)

    @torch.no_grad()
    def encode_volume(
        self, volume: Volume | np.ndarray | torch.Tensor, batch_size: int = 16, progress: bool = False
    ) -> torch.Tensor:
        """A volume [S, H, W] -> latents [C, S, h, w] (float32, CPU), ``batch_size`` slices at a time.

        ``volume`` is a :class:`~ctflow.data.volume.Volume` (Hounsfield units,
        normalised here with :meth:`normalize`) or an array/tensor already
        normalised to ``[-1, 1]``.
        """
        array = self._normalised_slices(volume)
        if array.ndim != 3:
            raise CTFlowError(f"a volume is (S, H, W); got shape {tuple(array.shape)}")
        batch_size = _check_batch_size(batch_size)
        num_slices, height, width = array.shape
        channels, h, w = self.latent_shape(height, width)
        latents = torch.empty((channels, num_slices, h, w), dtype=torch.float32, device="cpu")  # the output
        with _progress_bar(progress, "encoding slices", num_slices) as advance:
            for start in range(0, num_slices, batch_size):
                chunk = _as_float_tensor(array[start : start + batch_size])  # [B, H, W]
                _check_normalised(chunk)
                z = self.encode_slices(chunk[:, None])  # [B, C, h, w]
                latents[:, start : start + len(chunk)] = z.float().cpu().permute(1, 0, 2, 3)
                advance(len(chunk))
        return latents

    @torch.no_grad()
    def decode_volume(
        self,
        latents,
        batch_size: int = 16,
        out: np.ndarray | torch.Tensor | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Latents [C, S, h, w] -> slices [S, H, W] in about [-1, 1] (CPU), ``batch_size`` slices at a time.

        Returns a new float32 tensor, or fills ``out`` (a preallocated numpy array,
        memmap or CPU tensor of shape (S, H, W)) and returns it as a tensor sharing
        its memory.
        """
        latents = torch.as_tensor(latents)
        if latents.ndim != 4 or latents.shape[0] != self.latent_channels:
            raise CTFlowError(
                f"volume latents must be [C={self.latent_channels}, S, h, w]; got {tuple(latents.shape)}"
            )
        batch_size = _check_batch_size(batch_size)
        _, num_slices, h, w = latents.shape
        f = self.downsample_factor
        shape = (num_slices, h * f, w * f)
        if out is None:
            buf = torch.empty(shape, dtype=torch.float32, device="cpu")  # the output stays in CPU memory
        else:
            buf = torch.from_numpy(out) if isinstance(out, np.ndarray) else out  # shares memory
            if not isinstance(buf, torch.Tensor) or tuple(buf.shape) != shape:
                raise CTFlowError(
                    f"out has shape {tuple(getattr(out, 'shape', ()))} but these latents decode to {shape}"
                )
            if not buf.dtype.is_floating_point:  # values in [-1, 1] cast to integers are nearly all 0
                raise CTFlowError(f"out must be a floating-point array; got {buf.dtype}")
        with _progress_bar(progress, "decoding slices", num_slices) as advance:
            for start in range(0, num_slices, batch_size):
                z = latents[:, start : start + batch_size].permute(1, 0, 2, 3)  # [B, C, h, w]
                x = self.decode_slices(z)  # [B, 1, H, W]
                buf[start : start + z.shape[0]] = x[:, 0].to(device=buf.device, dtype=buf.dtype)
                advance(z.shape[0])
        return buf


@contextlib.contextmanager
def _progress_bar(enabled: bool, description: str, total: int) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``: a rich progress bar when ``enabled``, a no-op otherwise."""
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def _check_batch_size(batch_size) -> int:
    if int(batch_size) != batch_size or batch_size < 1:
        raise CTFlowError(f"batch_size must be a positive integer; got {batch_size!r}")
    return int(batch_size)


def _as_float_tensor(chunk) -> torch.Tensor:
    if isinstance(chunk, torch.Tensor):
        return chunk.float()
    return torch.from_numpy(np.ascontiguousarray(chunk, dtype=np.float32))


def _check_normalised(chunk: torch.Tensor) -> None:
    peak = float(chunk.abs().max()) if chunk.numel() else 0.0
    if not np.isfinite(peak):
        raise CTFlowError("the slices hold NaN or infinite values; fix or mask them before encoding")
    if peak > 1.5:
        raise CTFlowError(
            f"slice values reach {peak:g}, outside [-1, 1]: they look like Hounsfield units; "
            f"pass a Volume or normalise with SliceVAE.normalize first"
        )


# --------------------------------------------------------------------------------------------------
# Offline loading: diffusers folders and original FLUX ae.safetensors files
# --------------------------------------------------------------------------------------------------

_ATTN_FLUX = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_ATTN_LINEAR = re.compile(r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$")


def _resnet_param_to_flux(param: str) -> str:
    return re.sub(r"^conv_shortcut\.", "nin_shortcut.", param)


def diffusers_key_to_flux(key: str, num_up_blocks: int) -> str:
    """One ``AutoencoderKL`` state-dict key -> its name in the original FLUX/LDM ``ae.safetensors``.

    ``encoder.down_blocks.1.resnets.0.conv_shortcut.weight`` -> ``encoder.down.1.block.0.nin_shortcut.weight``;
    decoder up blocks are numbered in reverse (``up_blocks.0`` -> ``up.{n-1}``).
    """
    part, _, rest = key.partition(".")
    if part in ("quant_conv", "post_quant_conv") or part not in ("encoder", "decoder"):
        return key
    rules = (
        (
            r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
            lambda i, j, p: f"down.{i}.block.{j}.{_resnet_param_to_flux(p)}",
        ),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", lambda i, p: f"down.{i}.downsample.conv.{p}"),
        (
            r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
            lambda i, j, p: f"up.{num_up_blocks - 1 - int(i)}.block.{j}.{_resnet_param_to_flux(p)}",
        ),
        (
            r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)",
            lambda i, p: f"up.{num_up_blocks - 1 - int(i)}.upsample.conv.{p}",
        ),
        (
            r"mid_block\.resnets\.(\d+)\.(.+)",
            lambda j, p: f"mid.block_{int(j) + 1}.{_resnet_param_to_flux(p)}",
        ),
        (
            r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)",
            lambda m, p: f"mid.attn_1.{_ATTN_FLUX[m]}.{p}",
        ),
        (r"conv_norm_out\.(.+)", lambda p: f"norm_out.{p}"),
        (r"(conv_in|conv_out)\.(.+)", lambda m, p: f"{m}.{p}"),
    )
    for pattern, fmt in rules:
        m = re.fullmatch(pattern, rest)
        if m:
            return f"{part}.{fmt(*m.groups())}"
    raise KeyError(f"no FLUX name for AutoencoderKL key {key!r}")


def _flux_shape(diffusers_key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    # attention projections are Linear in diffusers, 1x1 Conv2d in the original
    return (*shape, 1, 1) if _ATTN_LINEAR.search(diffusers_key) else tuple(shape)


def _num_up_blocks(keys) -> int:
    ids = [int(m.group(1)) for k in keys if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))]
    return max(ids) + 1 if ids else 0


def diffusers_to_flux_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An ``AutoencoderKL`` state dict -> the original FLUX ``ae.safetensors`` layout (for export/tests)."""
    n = _num_up_blocks(state_dict)
    out = {}
    for key, tensor in state_dict.items():
        out[diffusers_key_to_flux(key, n)] = tensor.reshape(
            _flux_shape(key, tuple(tensor.shape))
        ).contiguous()
    return out


def _meta_model(config: dict[str, Any]):
    cls = _autoencoder_cls()
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        with torch.device("meta"):
            return cls.from_config(config)
    except (TypeError, ValueError) as e:
        raise CTFlowError(f"bad VAE config: {e}") from None


def _fmt_shape(shape) -> str:
    return str(tuple(int(s) for s in shape))


def _check_layout(
    found: dict[str, tuple], expected: dict[str, tuple], source, alt: dict | None = None
) -> None:
    """Refuse missing/unexpected keys and wrong shapes, naming the first offender."""
    missing = [k for k in expected if k not in found]
    if missing:
        raise CTFlowError(
            f"{source} is missing weight {missing[0]!r} (expected shape {_fmt_shape(expected[missing[0]])}; "
            f"{len(missing)} missing in total); the file does not match the VAE config/preset"
        )
    unexpected = sorted(k for k in found if k not in expected)
    if unexpected:
        raise CTFlowError(
            f"{source} has unexpected weight {unexpected[0]!r} ({len(unexpected)} unexpected in total); "
            f"the file does not match the VAE config/preset"
        )
    for key, shape in expected.items():
        ok = (tuple(shape),) + ((tuple(alt[key]),) if alt and key in alt else ())
        if tuple(found[key]) not in ok:
            raise CTFlowError(
                f"{source}: weight {key!r} has shape {_fmt_shape(found[key])} but the VAE config expects "
                f"{_fmt_shape(shape)}; the file does not match the config/preset"
            )


def _flux_layout(config: dict[str, Any]) -> tuple[dict[str, str], dict[str, tuple], dict[str, tuple]]:
    """For a config: FLUX key -> diffusers key, FLUX key -> expected shape, FLUX key -> accepted 2D shape."""
    state = _meta_model(config).state_dict()
    n = _num_up_blocks(state)
    names, shapes, alt = {}, {}, {}
    for key, tensor in state.items():
        flux_key = diffusers_key_to_flux(key, n)
        names[flux_key] = key
        shapes[flux_key] = _flux_shape(key, tuple(tensor.shape))
        if shapes[flux_key] != tuple(tensor.shape):
            alt[flux_key] = tuple(tensor.shape)  # already converted to Linear: accepted too
    return names, shapes, alt


def _strip_prefix(keys) -> str:
    """The prefix to drop from a full LDM checkpoint's VAE keys ('' when keys start at encoder/decoder)."""
    keys = list(keys)
    if any(k.startswith(("encoder.", "decoder.")) for k in keys):
        return ""
    for prefix in ("first_stage_model.", "vae.", "ae."):
        if any(k.startswith(prefix + "encoder.") for k in keys):
            return prefix
    return ""


def flux_to_diffusers_state_dict(
    state_dict: dict[str, torch.Tensor], config: dict[str, Any] | None = None, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """An original FLUX ``ae.safetensors`` state dict -> ``AutoencoderKL`` keys for ``config`` (default: flux).

    Raises ``CTFlowError`` on a missing or unexpected key or a wrong shape.
    """
    config = preset_config("flux") if config is None else config
    prefix = _strip_prefix(state_dict)
    state_dict = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    names, shapes, alt = _flux_layout(config)
    _check_layout({k: tuple(v.shape) for k, v in state_dict.items()}, shapes, source, alt)
    out = {}
    for flux_key, diffusers_key in names.items():
        tensor = state_dict[flux_key]
        target = alt.get(flux_key)
        out[diffusers_key] = tensor.reshape(target).contiguous() if target else tensor
    return out


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for garbage files
        raise CTFlowError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None


def _load_config_arg(config) -> dict[str, Any]:
    if isinstance(config, dict):
        return dict(config)
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise CTFlowError(f"VAE config {path} not found; pass a dict, a config.json or a folder holding one")
    return _read_json(path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CTFlowError(f"cannot read {path}: {e}") from None


def _refuse_pickle(path: Path) -> None:
    if path.name.lower().endswith(PICKLE_SUFFIXES):
        raise CTFlowError(
            f"{path} is a pickle checkpoint; ctflow only loads .safetensors weights (it never unpickles); "
            f"convert it to safetensors first"
        )


def load_vae(
    path, preset: str | None = None, config=None, dtype: torch.dtype = torch.float32
) -> AutoencoderKL:
    """Load VAE weights offline from ``.safetensors`` only.

    * a diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors``,
      possibly sharded): its own config is used, ``preset``/``config`` are ignored;
    * a single original FLUX ``ae.safetensors`` file: converted to ``AutoencoderKL``
      keys for ``config`` (a dict, a config.json or a folder holding one) or
      ``VAE_PRESETS[preset]`` (default ``"flux"``).

    Pickle files (``.ckpt/.pt/.pth/.bin``) are refused, as are checkpoints with a
    missing or unexpected key or a wrong shape. Returns the model in eval mode.
    """
    path = Path(path)
    if not path.exists():
        raise CTFlowError(
            f"VAE weights {path} not found; pass a diffusers VAE folder or an ae.safetensors file"
        )
    if path.is_dir():
        return _load_diffusers_folder(path, dtype)
    _refuse_pickle(path)
    if config is not None:
        config = _load_config_arg(config)
    else:
        config = preset_config(preset or "flux")
    check_vae_config(config)
    shapes = _safetensors_shapes(path)
    prefix = _strip_prefix(shapes)
    shapes = {k[len(prefix) :]: v for k, v in shapes.items() if k.startswith(prefix)}
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in shapes):
        raise CTFlowError(
            f"{path} holds a diffusers VAE's weights (encoder.down_blocks...), not FLUX's original"
            " ae.safetensors; pass the folder that holds it with its config.json"
        )
    names, expected, alt = _flux_layout(config)
    try:
        _check_layout(shapes, expected, path, alt)  # cheap: headers only, before reading tensors
    except CTFlowError as e:
        blocks = list(config.get("block_out_channels", ()))
        if blocks == list(VAE_PRESETS["flux"]["block_out_channels"]):
            raise
        raise CTFlowError(  # the usual slip: FLUX's file with the default (tiny) preset
            f"{e}, whose block_out_channels are {blocks}; FLUX's own ae.safetensors needs the flux preset"
            " (train-vae --config configs/flux-vae.yaml)"
        ) from None

    from safetensors.torch import load_file

    state = flux_to_diffusers_state_dict(load_file(str(path)), config, source=str(path))
    model = _meta_model(config)  # no random init: the checkpoint's tensors are assigned
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    if config.get("_hu_window") is not None:  # ctflow's own key, which from_config leaves out
        model.register_to_config(_hu_window=list(config["_hu_window"]))
    return model.eval()


def _load_diffusers_folder(path: Path, dtype: torch.dtype):
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CTFlowError(
            f"{path} has no config.json; a diffusers VAE folder holds config.json and {DIFFUSERS_WEIGHTS}"
        )
    config = _read_json(config_path)
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise CTFlowError(f"{config_path} describes a {config['_class_name']}, not an AutoencoderKL")
    if (path / DIFFUSERS_INDEX).is_file():
        files = sorted(set(_read_json(path / DIFFUSERS_INDEX).get("weight_map", {}).values()))
    elif (path / DIFFUSERS_WEIGHTS).is_file():
        files = [DIFFUSERS_WEIGHTS]
    else:
        for pickled in sorted(path.iterdir()):
            _refuse_pickle(pickled)
        raise CTFlowError(
            f"{path} has no {DIFFUSERS_WEIGHTS}; a diffusers VAE folder needs safetensors weights"
        )
    shapes: dict[str, tuple] = {}
    for name in files:
        file = path / name
        if not file.is_file():
            raise CTFlowError(f"{path / DIFFUSERS_INDEX} lists {name}, which is missing")
        shapes.update(_safetensors_shapes(file))
    expected = {k: tuple(v.shape) for k, v in _meta_model(config).state_dict().items()}
    _check_layout(shapes, expected, path)
    model = _autoencoder_cls().from_pretrained(
        path, local_files_only=True, use_safetensors=True, torch_dtype=dtype
    )
    return model.eval()
