"""The chunk flow transformer: a DiT that generates S consecutive latent slices at a time.

A chest CT is a video of axial slices. The slice VAE maps each slice to a latent [C, h, w]; this model
predicts the flow-matching velocity of a chunk of S latent slices [C, S, h, w] from the report (text
tokens for cross-attention, the pooled embedding for the adaLN conditioning vector), the chunk's
absolute depth (which chunk of the volume it is) and the previous chunk.

Three ways to see the previous chunk (``context``):

* ``"concat"``: stacked on the channel axis before patch embedding (zeros for the first chunk).
* ``"none"``: ignored (independent chunks, tied together only by the report and the depth
  embedding; the ablation baseline).
* ``"tokens"``: patchified into context tokens (a learned start context for the first chunk) that go
  through the same blocks at t = 0. Attention is block-causal: context tokens look only at context
  tokens, chunk tokens look at both. Context tokens never depend on the chunk or on t, so their
  per-block keys/values are computed once per chunk (:meth:`CTFlowTransformer.compute_context_cache`)
  and reused at every ODE step.

The report's per-block cross-attention keys/values likewise depend on neither the chunk nor t: the
sampler computes them once per chunk (:meth:`CTFlowTransformer.compute_text_cache`) and reuses them
at every ODE step, over the report's real tokens only (padding is masked out either way).

Two attention layouts (``attention``):

* ``"full"``: joint self-attention over all tokens of the chunk.
* ``"factorized"``: spatial attention within each latent slice, then temporal attention across slices
  at each spatial position (STDiT), each with its own adaLN gate.

Three parametrisations (``prediction``); :meth:`CTFlowTransformer.forward` returns the velocity in each:

* ``"velocity"``: the network outputs v = noise - x0 directly (SD3, the published setting).
* ``"sample"``: the network outputs the clean chunk x0 and the velocity is (x_t - x0) / t, with t
  clamped at ``MIN_T`` ("x-prediction", Li & He 2025, "Back to Basics: Let Denoising Generative Models
  Denoise"). When a token carries more numbers than the hidden width (the CPU-sized model: a 2x4x4
  patch of 8 channels = 256 values into 192), v-prediction must pass the noise through that
  bottleneck and its samples keep a noise texture; x-prediction only outputs the low-dimensional
  clean data.
* ``"skip"``: x-prediction with a skip connection from the input (EDM's preconditioning, Karras et al.
  2022, for x_t = (1 - t) x0 + t noise): x0 = c_skip(t) x_t + c_out(t) F with
  c_skip = (1 - t) s^2 / D^2, c_out = t / D, D^2 = (1 - t)^2 s^2 + t^2, s = ``sigma_data`` (1: the
  latents' own standard deviation). c_out is EDM's t s / D divided by s, so F keeps the scale of a
  clean chunk at every s (EDM's F has unit variance). At t = 1 it is ``"sample"``; towards t = 0 the
  input passes through and F only writes a correction of size c_out, so detail the bottleneck cannot
  carry (a nodule of a few latent pixels) is kept rather than redrawn. The skip takes over below about
  t = s / (1 + s): a smaller s treats what is to be kept as a signal of that size and lets less noise
  through. The velocity (x_t - x0) / t = (t - (1 - t) s^2) / D^2 x_t - F / D needs no clamp at t = 0.
  Measured on the phantom recipe: with s = 1 it keeps a shown nodule (97% of it from t = 0.05,
  x-prediction 41%), but the noise passes through too and F must cancel it, through the same bottleneck
  as v-prediction: generated lungs fill with a noise texture (docs/experiments.md, "A skip
  connection"). With s = 0.1 it keeps 87%, the noise stays out, and over two training seeds the model
  reads the report's findings and effusion side better than x-prediction's runs, nodules no better ("A
  smaller sigma_data").

With ``target_depth`` the model also reads the slice count of the meta line as a number: the slices
still to come from the chunk's first slice on are embedded like a timestep and added to the adaLN
conditioning (a learned null vector where training dropped the meta line; at generation a report
without one gets the pipeline's ``typical_slices`` as its count, or the null vector if that is unset). The
published model reads the count only as text; a small text encoder reads numbers poorly, and this
makes the end-of-scan chunk land where the report asks (docs/model.md).

With ``num_findings`` the model also reads a vector of finding flags parsed from the report
(:func:`ctflow.data.reports.finding_vector`: effusion left/right, cardiomegaly, nodule, emphysema,
consolidation), embedded by a small MLP and added to the adaLN conditioning (a learned null vector when
unknown: no report, classifier-free dropout, or a row of negative values). The text tower tells "left"
from "right", but a small transformer does not learn to bind that word to where it draws the fluid
(docs/experiments.md, "Side twins"); the flags give the side a direct path.

With ``finding_maps`` (needs ``num_findings``) each flag also adds a learned in-plane map to the
chunk's tokens: a [P, D] table per finding (zeros at initialisation), weighted by the flag and the same
for every slice of the chunk. The adaLN conditioning is one vector for all tokens, so a flag there says
*that* there is a left effusion but not *where*: the network has to learn to combine it with the
position embedding, which the phantom-sized model did not do in 8000 steps. A map says where: the
tokens of the left lung base can be moved by the left-effusion flag alone. Measured on the phantom
recipe it did not make generated effusions follow the side of full reports (docs/experiments.md,
"Finding maps").

With ``final_conv`` a 3x3x3 convolution (identity at initialisation) runs over the unpatchified output,
as in U-ViT. Slices of one patch come from one token and agree; slices of neighbouring patches come
from different tokens, and an undertrained model lets them disagree (horizontal stripes in coronal and
sagittal views). The convolution lets it blend across those seams for 1.7k parameters.

With ``text_pool`` k > 1 the report's tokens are averaged over runs of k neighbouring tokens
(:func:`pool_tokens`, padding left out) before the blocks read them. The text encoder's tokens already
carry their context, and a chest report has some 200 of them against 64 chunk tokens, so most of a
small model's cross-attention cost (its key/value projections in every block) is spent on the text;
k = 4 takes a phantom training step's forward and backward to 0.74x the time of projecting every
token, and 0.79x that of projecting the real tokens only, as the model does now
(``benchmarks/train_throughput.py``). The phantom model trained so drew less of a reported effusion's
fluid and found named nodules less often (docs/experiments.md, "Pooled report tokens").

With ``text_resampler`` m > 0 a Perceiver resampler (Flamingo) reads the report instead: m learned
queries attend once to the text encoder's tokens (keys and values straight from its width, so no MLP
runs over every token), and the blocks cross-attend to those m queries. The report's length is then
paid for once per forward, not in every block, and unlike ``text_pool`` the queries choose which
tokens to read rather than averaging neighbours (docs/experiments.md, "A resampler for the report").

With ``context_residual`` (``concat`` context, ``sample`` prediction) the network predicts each slice
of the chunk as a change from the previous chunk's last slice (zeros before the first chunk), so a
structure that runs on across the chunk boundary (an effusion, the heart) needs no output at all and a
thin one is not lost in the 2x4x4 patch bottleneck (docs/experiments.md, "v1, and why it read the
report weakly"). A number below 1 adds only that share of the slice: what the network gets wrong then
fades from chunk to chunk instead of adding up.

Tokens are ordered (slice, row, column); shapes in comments use S' = S / patch_s, P = (h / patch_h) *
(w / patch_w) and N = S' * P.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ctflow.errors import CTFlowError, check_whole, one_of, positive_number

TRANSFORMER_PRESETS: dict[str, dict] = {
    "ctflow-0.5b": {
        "in_channels": 16,
        "sample_size": 32,
        "chunk_slices": 16,
        "patch_size": (2, 2, 2),
        "hidden_size": 1024,
        "depth": 24,
        "num_heads": 16,
        "text_dim": 768,
        "attention": "full",
        "context": "tokens",
    },
    "tiny": {
        "in_channels": 8,
        "sample_size": 16,
        "chunk_slices": 8,
        "patch_size": (2, 2, 2),
        "hidden_size": 192,
        "depth": 6,
        "num_heads": 6,
        "text_dim": 384,
        "attention": "full",
        "context": "tokens",
    },
}
FREQUENCY_EMBEDDING_SIZE = 256
MAX_TARGET_SLICES = 4096  # target_depth: slice counts above this read as this
MIN_T = 0.05  # x-prediction divides by t; clamped so the velocity stays finite near t = 0
PREDICTIONS = ("velocity", "sample", "skip")  # what the network's output is read as (module docstring)
ATTENTIONS = ("full", "factorized")
CONTEXTS = ("concat", "tokens", "none")


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # x [B,N,D]; shift, scale [B,D]
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def pool_tokens(tokens: torch.Tensor, mask: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of each run of ``size`` neighbouring tokens, padding left out.

    tokens [B,L,D], mask [B,L] (nonzero: a real token) -> [B,ceil(L/size),D] and a bool mask of the
    runs holding a real token. ``size`` 1 returns the tokens as they are.
    """
    mask = mask.to(torch.bool)
    if size == 1:
        return tokens, mask
    b, length, d = tokens.shape
    pad = -length % size
    weight = F.pad(mask.to(tokens.dtype), (0, pad)).view(b, -1, size, 1)
    runs = (F.pad(tokens, (0, 0, 0, pad)).view(b, -1, size, d) * weight).sum(2)
    count = weight.sum(2)
    return runs / count.clamp_min(1), count.squeeze(-1) > 0


def scatter_real(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """values [T,C], one row per real token of ``mask`` [B,L] (bool) in order -> [B,L,C], zeros at padding.

    Projections of a report run over its real tokens only (a batch of phantom reports is a quarter
    padding), then take their place here; attention masks the zero rows out as it masked the projected
    padding, so outputs and gradients are the same."""
    rows, cols = mask.nonzero(as_tuple=True)
    return values.new_zeros(*mask.shape, values.shape[-1]).index_put((rows, cols), values)


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Sin-cos embedding of positions [L] -> [L, dim] (as in MAE / DiT)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double()[:, None] * omega[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).float()


def sincos_2d(dim: int, rows: int, cols: int) -> torch.Tensor:
    """Sin-cos embedding of a rows x cols grid -> [rows * cols, dim]: half the channels per axis."""
    row, col = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, row.flatten()), sincos_1d(dim // 2, col.flatten())], dim=1)


@dataclass
class ContextCache:
    """Per-block keys/values of the context tokens, for the attention where chunk tokens see them.

    ``kv[i]`` is block i's (key, value), each [B, heads, N, head_dim] for full attention or
    [B * P, heads, S', head_dim] for factorized (temporal) attention.
    """

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    batch_size: int


@dataclass
class TextCache:
    """The report's keys/values for every block's cross-attention, reusable at every ODE step.

    ``kv[i]`` is block i's (key, value), each [B, heads, L, head_dim]; ``mask`` [B, L] bool marks the
    real tokens (keys and values of padding are zero, and masked out). From
    :meth:`CTFlowTransformer.compute_text_cache`.
    """

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    mask: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]


class TimestepEmbedder(nn.Module):
    """Flow time t in [0, 1] -> [B, D]: sinusoidal embedding of t * 1000, then an MLP (DiT)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = FREQUENCY_EMBEDDING_SIZE):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        # t [B] -> [B, dim]
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = self.timestep_embedding(t * 1000, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class Attention(nn.Module):
    """Multi-head self-attention whose queries may also look at a prefix of extra keys/values."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, prefix: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        # x [B,L,D]; prefix (k, v) each [B,heads,Lp,hd] -> out [B,L,D] and own (k, v) each [B,heads,L,hd]
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        keys, values = (
            (k, v) if prefix is None else (torch.cat([prefix[0], k], 2), torch.cat([prefix[1], v], 2))
        )
        out = F.scaled_dot_product_attention(q, keys, values)
        return self.proj(out.transpose(1, 2).reshape(b, n, d)), (k, v)


class CrossAttention(nn.Module):
    """Tokens attend to the report's text tokens; padded text tokens are masked out."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, text_dim: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(text_dim or dim, dim * 2)
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        # x [B,N,D]; text [B,L,text_dim]; text_mask [B,L] bool (True = real token) -> [B,N,D]
        return self.attend(x, *self.heads(self.kv(text)), text_mask)

    def heads(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # kv [B,L,2D] (this layer's kv projection of the text) -> k, v each [B,heads,L,head_dim]
        return kv.view(*kv.shape[:2], 2, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)

    def attend(
        self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_mask: torch.Tensor
    ) -> torch.Tensor:
        # x [B,N,D]; k, v [B,heads,L,head_dim] (this layer's kv projection of the text) -> [B,N,D]
        b, n, d = x.shape
        q = self.q_norm(self.q(x).view(b, n, self.num_heads, -1).transpose(1, 2))
        out = F.scaled_dot_product_attention(q, self.k_norm(k), v, attn_mask=text_mask[:, None, None, :])
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class TextResampler(nn.Module):
    """A Perceiver resampler (Flamingo): ``num_latents`` learned queries read the report's tokens once
    (cross-attention straight from the text encoder's width, then an MLP, pre-norm residuals); the
    blocks then cross-attend to those queries instead of the tokens."""

    def __init__(self, dim: int, text_dim: int, num_latents: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(num_latents, dim))
        self.norm_latents = nn.LayerNorm(dim, eps=1e-6)
        self.norm_text = nn.LayerNorm(text_dim, eps=1e-6)
        self.attn = CrossAttention(dim, num_heads, text_dim=text_dim)
        self.norm_mlp = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        # text [B,L,text_dim]; text_mask [B,L] bool -> [B,num_latents,D]; keys and values are projected
        # over the real tokens only (scatter_real)
        x = self.latents.expand(text.shape[0], -1, -1)
        kv = scatter_real(self.attn.kv(self.norm_text(text[text_mask])), text_mask)
        x = x + self.attn.attend(self.norm_latents(x), *self.attn.heads(kv), text_mask)
        return x + self.mlp(self.norm_mlp(x))


class CTFlowBlock(nn.Module):
    """adaLN-Zero DiT block: self-attention (full, or spatial then temporal), cross-attention, MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, factorized: bool, qk_norm: bool):
        super().__init__()
        self.factorized = factorized
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm)
        if factorized:
            self.norm_temporal = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.temporal_attn = Attention(hidden_size, num_heads, qk_norm)
        self.norm_cross = nn.LayerNorm(hidden_size, eps=1e-6)
        self.cross_attn = CrossAttention(hidden_size, num_heads, qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_hidden),
            nn.GELU(approximate="tanh"),
            nn.Linear(mlp_hidden, hidden_size),
        )
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), nn.Linear(hidden_size, (9 if factorized else 6) * hidden_size)
        )

    def spatial_attention(self, h: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        # h [B,N,D], grid (S', P) -> [B,N,D]; a token sees only the tokens of its own latent slice
        b, n, d = h.shape
        out, _ = self.attn(h.reshape(b * grid[0], grid[1], d))
        return out.reshape(b, n, d)

    def temporal_attention(
        self, h: torch.Tensor, grid: tuple[int, int], prefix: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        # h [B,N,D], grid (S', P) -> [B,N,D] and own (k, v) each [B*P,heads,S',hd];
        # a token sees only the tokens at its own spatial position (and the prefix there)
        b, n, d = h.shape
        slices, positions = grid
        h = h.reshape(b, slices, positions, d).transpose(1, 2).reshape(b * positions, slices, d)
        out, kv = self.temporal_attn(h, prefix)
        return out.reshape(b, positions, slices, d).transpose(1, 2).reshape(b, n, d), kv

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        text_k: torch.Tensor,
        text_v: torch.Tensor,
        text_mask: torch.Tensor,
        grid: tuple[int, int],
        prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        # x [B,N,D]; c [B,D]; text_k, text_v [B,heads,L,head_dim] (this block's projection of the report,
        # TextCache); text_mask [B,L]; prefix: the context's (k, v) for the attention that crosses streams
        # (full: self-attention, factorized: temporal) -> x [B,N,D] and own (k, v) there
        if self.factorized:
            (shift_s, scale_s, gate_s, shift_t, scale_t, gate_t, shift_mlp, scale_mlp, gate_mlp) = (
                self.adaLN_modulation(c).chunk(9, dim=1)
            )
            x = x + gate_s.unsqueeze(1) * self.spatial_attention(
                modulate(self.norm1(x), shift_s, scale_s), grid
            )
            out, kv = self.temporal_attention(modulate(self.norm_temporal(x), shift_t, scale_t), grid, prefix)
            x = x + gate_t.unsqueeze(1) * out
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(
                6, dim=1
            )
            out, kv = self.attn(modulate(self.norm1(x), shift_msa, scale_msa), prefix)
            x = x + gate_msa.unsqueeze(1) * out
        x = x + self.cross_attn.attend(self.norm_cross(x), text_k, text_v, text_mask)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x, kv


class FinalLayer(nn.Module):
    """adaLN + linear to the patch values (DiT)."""

    def __init__(self, hidden_size: int, out_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x [B,N,D]; c [B,D] -> [B,N,out_dim]
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def skip_velocity(x_t: torch.Tensor, out: torch.Tensor, t: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """The velocity (x_t - x0) / t of ``prediction="skip"``'s clean chunk x0 = c_skip x_t + c_out out."""
    s2 = sigma**2
    d2 = (1 - t) ** 2 * s2 + t**2
    return (t - (1 - t) * s2) / d2 * x_t - out / d2.sqrt()


class CTFlowTransformer(ModelMixin, ConfigMixin):
    """Predicts the velocity of a chunk of latent slices; see the module docstring."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 16,
        sample_size: int = 32,
        chunk_slices: int = 16,
        patch_size: tuple[int, int, int] = (2, 2, 2),
        hidden_size: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        text_dim: int = 384,
        max_chunks: int = 64,
        attention: str = "factorized",
        context: str = "concat",
        qk_norm: bool = False,
        depth_embedding: bool = True,
        prediction: str = "velocity",
        target_depth: bool = False,
        final_conv: bool = False,
        context_residual: float = 0.0,
        num_findings: int = 0,
        finding_maps: bool = False,
        text_pool: int = 1,
        text_resampler: int = 0,
        sigma_data: float = 1.0,
    ):
        super().__init__()
        sizes = dict(in_channels=in_channels, sample_size=sample_size, chunk_slices=chunk_slices)
        sizes.update(hidden_size=hidden_size, depth=depth, num_heads=num_heads, text_dim=text_dim)
        for name, value in {**sizes, "max_chunks": max_chunks}.items():
            check_whole(name, value, 1)
        if isinstance(patch_size, str) or not isinstance(patch_size, Sequence) or len(patch_size) != 3:
            raise CTFlowError(
                f"patch_size must be three whole numbers (slices, rows, columns), got {patch_size!r}"
            )
        for value in patch_size:
            check_whole("patch_size", value, 1)
        if not positive_number(mlp_ratio):
            raise CTFlowError(f"mlp_ratio must be a number > 0, got {mlp_ratio!r}")
        patch_size = tuple(patch_size)
        _check_config(sample_size, chunk_slices, patch_size, hidden_size, num_heads, attention, context)
        if prediction not in PREDICTIONS:
            raise CTFlowError(f"prediction must be {one_of(PREDICTIONS)}, not {prediction!r}")
        if not 0.0 <= float(context_residual) <= 1.0:
            raise CTFlowError(f"context_residual must be between 0 and 1 (true: 1), got {context_residual!r}")
        if not isinstance(num_findings, int) or num_findings < 0:
            raise CTFlowError(f"num_findings must be a whole number >= 0 (0: off), got {num_findings!r}")
        if not isinstance(text_pool, int) or text_pool < 1:
            raise CTFlowError(f"text_pool must be a whole number >= 1 (1: off), got {text_pool!r}")
        if not (math.isfinite(float(sigma_data)) and float(sigma_data) > 0):
            raise CTFlowError(
                f"sigma_data must be a number > 0 (1: the latents' standard deviation), got {sigma_data!r}"
            )
        if not isinstance(text_resampler, int) or text_resampler < 0:
            raise CTFlowError(f"text_resampler must be a whole number >= 0 (0: off), got {text_resampler!r}")
        if text_resampler and text_pool > 1:
            raise CTFlowError(
                "text_resampler and text_pool both shorten the report's tokens: set one of them"
            )
        if finding_maps and not num_findings:
            raise CTFlowError("finding_maps needs finding flags to weight the maps: set num_findings too")
        if context_residual and (context != "concat" or prediction != "sample"):
            raise CTFlowError(
                "context_residual needs context='concat' and prediction='sample' "
                f"(got context={context!r}, prediction={prediction!r})"
            )
        ps, ph, pw = patch_size
        self.grid = (chunk_slices // ps, sample_size // ph, sample_size // pw)  # (S', H', W')
        slices, rows, cols = self.grid

        self.x_embedder = nn.Conv3d(
            in_channels * (2 if context == "concat" else 1),
            hidden_size,
            kernel_size=patch_size,
            stride=patch_size,
        )
        if context == "tokens":
            self.context_embedder = nn.Conv3d(
                in_channels, hidden_size, kernel_size=patch_size, stride=patch_size
            )
            self.start_context = nn.Parameter(torch.zeros(1, slices, rows * cols, hidden_size))  # [1,S',P,D]
        # fixed 2D sin-cos position within a slice [1,1,P,D]; learned slice-in-chunk position [1,S',1,D]
        self.register_buffer("pos_embed", sincos_2d(hidden_size, rows, cols)[None, None], persistent=False)
        self.slice_embed = nn.Parameter(sincos_1d(hidden_size, torch.arange(slices))[None, :, None])
        self.depth_embed = nn.Embedding(max_chunks, hidden_size) if depth_embedding else None
        self.t_embedder = TimestepEmbedder(hidden_size)
        if target_depth:  # slices still to come, read from the meta line; a learned vector when unknown
            self.target_embedder = TimestepEmbedder(hidden_size)
            self.target_null = nn.Parameter(torch.zeros(hidden_size))
        if num_findings:  # finding flags parsed from the report; a learned vector when unknown
            self.finding_embedder = nn.Sequential(
                nn.Linear(num_findings, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
            )
            self.finding_null = nn.Parameter(torch.zeros(hidden_size))
        if finding_maps:  # per finding, a learned in-plane map added to the chunk's tokens [n,P,D]
            self.finding_map = nn.Parameter(torch.zeros(num_findings, rows * cols, hidden_size))
        # the report's tokens reach the blocks through an MLP, or through the resampler's queries
        self.text_embedder = (
            None
            if text_resampler
            else nn.Sequential(
                nn.Linear(text_dim, hidden_size),
                nn.GELU(approximate="tanh"),
                nn.Linear(hidden_size, hidden_size),
            )
        )
        self.pooled_embedder = nn.Sequential(
            nn.Linear(text_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.resampler = (
            TextResampler(hidden_size, text_dim, text_resampler, num_heads, mlp_ratio)
            if text_resampler
            else None
        )
        # per-dimension (mean, std) of the training reports' token and pooled features; identity until
        # set_text_statistics. Saved with the weights, like a VAE's latent scaling factor.
        self.register_buffer("token_stats", torch.stack([torch.zeros(text_dim), torch.ones(text_dim)]))
        self.register_buffer("pooled_stats", torch.stack([torch.zeros(text_dim), torch.ones(text_dim)]))
        self.blocks = nn.ModuleList(
            CTFlowBlock(hidden_size, num_heads, mlp_ratio, attention == "factorized", qk_norm)
            for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, ps * ph * pw * in_channels)
        # a 3x3x3 convolution over the unpatchified output (U-ViT's final conv): neighbouring patches,
        # across slices too, are predicted by different tokens, and this lets the model smooth their seams
        self.output_conv = nn.Conv3d(in_channels, in_channels, 3, padding=1) if final_conv else None
        self.gradient_checkpointing = False
        self.initialize_weights()

    @classmethod
    def from_preset(cls, name: str, **overrides) -> CTFlowTransformer:
        return cls(**preset_config(name, **overrides))

    @torch.no_grad()
    def set_text_statistics(self, tokens: torch.Tensor, pooled: torch.Tensor) -> None:
        """Standardise report features per dimension with the training set's statistics.

        ``tokens`` [N,text_dim] (all real tokens of all training reports), ``pooled`` [B,text_dim]. Reports
        written from one template differ little (phantom reports: mean pooled cosine similarity 0.92), so
        raw features hide what varies between them; standardised, the differences are O(1) and the
        text pathways learn at the rate of the rest of the network. Stds are floored at a tenth of
        their mean so near-constant dimensions are not blown up.
        """
        moments = []
        for x in (tokens, pooled):
            x = x.to(self.token_stats)
            moments.append((x.mean(0), x.std(0) if len(x) > 1 else torch.ones_like(x[0])))
        self.set_text_moments(*moments)

    @torch.no_grad()
    def set_text_moments(
        self, tokens: tuple[torch.Tensor, torch.Tensor], pooled: tuple[torch.Tensor, torch.Tensor]
    ):
        """``set_text_statistics`` from precomputed per-dimension (mean, std) pairs (a training set too large
        to hold its features at once: ``LatentCache.text_moments``)."""
        for buffer, (mean, std) in ((self.token_stats, tokens), (self.pooled_stats, pooled)):
            std = std.to(buffer)
            buffer.copy_(torch.stack([mean.to(buffer), std.clamp_min(float(std.mean()) * 0.1)]))

    def initialize_weights(self) -> None:
        """DiT initialisation: xavier linears, zeroed adaLN modulations, cross-attention outputs and final layer."""

        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        embedders = [self.x_embedder] + ([self.context_embedder] if self.config.context == "tokens" else [])
        for embedder in embedders:
            nn.init.xavier_uniform_(embedder.weight.data.view(embedder.weight.shape[0], -1))
            nn.init.zeros_(embedder.bias)
        if self.config.context == "tokens":
            nn.init.normal_(self.start_context, std=0.02)
        if self.depth_embed is not None:
            nn.init.normal_(self.depth_embed.weight, std=0.02)
        mlps = [self.t_embedder.mlp, self.pooled_embedder]
        mlps += [self.text_embedder] if self.text_embedder is not None else []
        if self.config.target_depth:
            mlps.append(self.target_embedder.mlp)
        if self.config.num_findings:
            mlps.append(self.finding_embedder)
        for mlp in mlps:
            nn.init.normal_(mlp[0].weight, std=0.02)
            nn.init.normal_(mlp[2].weight, std=0.02)
        if self.resampler is not None:
            nn.init.normal_(self.resampler.latents, std=0.02)
        if self.output_conv is not None:  # starts as the identity
            nn.init.dirac_(self.output_conv.weight)
            nn.init.zeros_(self.output_conv.bias)
        zeroed = [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for block in self.blocks:
            zeroed += [block.adaLN_modulation[-1], block.cross_attn.proj]
        for linear in zeroed:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def compute_text_cache(
        self, encoder_hidden_states: torch.Tensor, encoder_attention_mask: torch.Tensor
    ) -> TextCache:
        """The report's keys/values for every block's cross-attention, reusable at every ODE step.

        They depend only on the report's tokens [B,L,text_dim] and mask [B,L] (1 keep, 0 pad), not on
        the chunk or t; :meth:`forward` with ``text_cache=`` skips computing them again.
        """
        dtype = self.x_embedder.weight.dtype
        tm, ts = self.token_stats.to(encoder_hidden_states.device)
        text, mask = pool_tokens(
            (encoder_hidden_states - tm) / ts,
            encoder_attention_mask.to(encoder_hidden_states.device),
            self.config.text_pool,
        )
        if self.resampler is None:  # the MLP runs over the real tokens only: [T,D]
            real = self.text_embedder(text[mask].to(dtype))
        else:  # the blocks read the resampler's queries, all of them real
            text = self.resampler(text.to(dtype), mask)
            mask = mask.new_ones(text.shape[:2])
            real = text.flatten(0, 1)
        return TextCache(kv=self._text_kv(real, mask), mask=mask)

    def _text_kv(self, real: torch.Tensor, mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # real [T,D]: the embedded real tokens of mask [B,L] in order -> per block (k, v) [B,heads,L,hd],
        # projected over the real tokens only (scatter_real): a phantom training step takes 0.93 to 0.96x
        # the time of projecting the padding too (benchmarks/train_throughput.py)
        return [
            block.cross_attn.heads(scatter_real(block.cross_attn.kv(real), mask)) for block in self.blocks
        ]

    def compute_context_cache(
        self,
        context: torch.Tensor | None,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor,
        pooled_text: torch.Tensor,
        chunk_index: torch.Tensor,
        num_slices: torch.Tensor | None = None,
        findings: torch.Tensor | None = None,
        text_cache: TextCache | None = None,
    ) -> ContextCache | None:
        """The context tokens' per-block keys/values, reusable at every ODE step of one chunk.

        ``context`` [B,C,S,h,w] is the previous chunk (None: the learned start context). Returns None
        for ``context="concat"`` or ``"none"``, where there is nothing to cache.
        """
        if self.config.context != "tokens":
            return None
        text, y, depth = self._condition(
            encoder_hidden_states,
            encoder_attention_mask,
            pooled_text,
            chunk_index,
            num_slices,
            findings,
            text_cache,
        )
        return self._context_cache(context, text, y, depth)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor,
        pooled_text: torch.Tensor,
        chunk_index: torch.Tensor,
        context: torch.Tensor | None = None,
        context_cache: ContextCache | None = None,
        num_slices: torch.Tensor | None = None,
        findings: torch.Tensor | None = None,
        text_cache: TextCache | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Velocity [B,C,S,h,w] of the noisy chunk ``hidden_states`` [B,C,S,h,w] at flow time ``timestep`` [B].

        ``encoder_hidden_states`` [B,L,text_dim] with ``encoder_attention_mask`` [B,L] (1 keep, 0 pad),
        ``pooled_text`` [B,text_dim], ``chunk_index`` [B] (absolute depth, clamped to max_chunks - 1),
        ``context`` [B,C,S,h,w] the previous chunk or None for the first. In tokens mode a
        ``context_cache`` from :meth:`compute_context_cache` replaces ``context``. ``num_slices`` [B] is
        the volume's slice count from the meta line (0 or None: unknown); only ``target_depth`` models
        read it. ``findings`` [B,num_findings] are the report's finding flags (None, or a row with a
        negative value: unknown); only ``num_findings`` models read them. A ``text_cache`` from
        :meth:`compute_text_cache` of the same report tokens saves projecting them again.
        """
        b = self._check_chunk(hidden_states, "hidden_states")
        dtype = self.x_embedder.weight.dtype
        text, y, depth = self._condition(
            encoder_hidden_states,
            encoder_attention_mask,
            pooled_text,
            chunk_index,
            num_slices,
            findings,
            text_cache,
        )
        x = hidden_states.to(dtype)
        if self.config.context != "tokens" and context_cache is not None:
            raise CTFlowError(
                f"context_cache is only for context='tokens' models, not {self.config.context!r}"
            )
        if self.config.context == "concat":
            if context is None:
                context = torch.zeros_like(x)
            else:
                self._check_chunk(context, "context", b)
            x = torch.cat([x, context.to(dtype)], dim=1)  # [B,2C,S,h,w]
        elif self.config.context == "none":
            pass  # independent chunks: the previous chunk is not seen
        elif context_cache is None:
            context_cache = self._context_cache(context, text, y, depth)
        elif context_cache.batch_size != b:
            raise CTFlowError(f"context_cache was computed for batch {context_cache.batch_size}, not {b}")

        x = self._tokens(self.x_embedder(x), depth)  # [B,N,D]
        if self.config.finding_maps and findings is not None:
            x = x + self._finding_tokens(findings, b).to(x.dtype)
        t = torch.as_tensor(timestep, device=x.device, dtype=torch.float32).reshape(-1).expand(b)
        c = self.t_embedder(t) + y  # [B,D]
        for i, block in enumerate(self.blocks):
            prefix = None if context_cache is None else context_cache.kv[i]
            x, _ = self._block(block, x, c, text, i, prefix)
        out = self.unpatchify(self.final_layer(x, c))  # [B,C,S,h,w]
        if self.output_conv is not None:
            out = self.output_conv(out)
        if self.config.context_residual:  # the network gave x0 minus (a share of) the previous last slice
            out = out + float(self.config.context_residual) * context[:, :, -1:].to(out.dtype)
        if self.config.prediction == "sample":  # the network gave x0: turn it into the velocity
            out = (hidden_states.to(out.dtype) - out) / t.clamp_min(MIN_T).view(-1, 1, 1, 1, 1).to(out.dtype)
        elif self.config.prediction == "skip":  # x0 = c_skip x_t + c_out F: its velocity, exactly
            t = t.view(-1, 1, 1, 1, 1).to(out.dtype)
            out = skip_velocity(hidden_states.to(out.dtype), out, t, float(self.config.sigma_data))
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        # x [B,N,ps*ph*pw*C] -> [B,C,S,h,w]
        slices, rows, cols = self.grid
        ps, ph, pw = self.config.patch_size
        c = self.config.in_channels
        x = x.reshape(x.shape[0], slices, rows, cols, ps, ph, pw, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(x.shape[0], c, slices * ps, rows * ph, cols * pw)

    def _condition(
        self,
        encoder_hidden_states,
        encoder_attention_mask,
        pooled_text,
        chunk_index,
        num_slices,
        findings=None,
        text_cache=None,
    ):
        # -> the report's TextCache, pooled embedding y [B,D] (plus the slices still to come for
        # target_depth models and the finding flags for num_findings models), depth embedding [B,D]
        dtype = self.x_embedder.weight.dtype
        b = pooled_text.shape[0]
        if text_cache is None:
            text_cache = self.compute_text_cache(encoder_hidden_states, encoder_attention_mask)
        elif text_cache.batch_size != b:
            raise CTFlowError(f"text_cache was computed for batch {text_cache.batch_size}, not {b}")
        pm, ps = self.pooled_stats.to(pooled_text.device)
        y = self.pooled_embedder(((pooled_text - pm) / ps).to(dtype))
        if self.config.target_depth:
            y = y + self._target(num_slices, chunk_index.to(y.device), y.shape[0]).to(y.dtype)
        if self.config.num_findings:
            y = y + self._findings(findings, y.shape[0]).to(y.dtype)
        if self.depth_embed is None:
            depth = y.new_zeros(y.shape)
        else:
            index = chunk_index.to(y.device, torch.long).clamp(0, self.config.max_chunks - 1)
            depth = self.depth_embed(index)
        return text_cache, y, depth

    def _target(self, num_slices: torch.Tensor | None, chunk_index: torch.Tensor, b: int) -> torch.Tensor:
        # [B,D]: embedding of the slices left from this chunk's first slice on, or the null vector
        null = self.target_null.expand(b, -1)
        if num_slices is None:
            return null
        num_slices = torch.as_tensor(num_slices, device=null.device).reshape(-1).expand(b)
        k = self.config.chunk_slices
        left = (num_slices - chunk_index.long() * k).clamp(-k, MAX_TARGET_SLICES).float()
        emb = self.target_embedder(left / 1000)  # TimestepEmbedder scales by 1000: integer slice phases
        return torch.where((num_slices > 0)[:, None], emb, null)

    def _findings(self, findings: torch.Tensor | None, b: int) -> torch.Tensor:
        # [B,D]: embedding of the finding flags, or the null vector where they are unknown
        null = self.finding_null.expand(b, -1)
        if findings is None:
            return null
        flags, known = self._flags(findings, b)
        return torch.where(known, self.finding_embedder(flags), null)

    def _finding_tokens(self, findings: torch.Tensor, b: int) -> torch.Tensor:
        # [B,N,D]: the finding maps weighted by each row's flags, repeated over the chunk's slices
        flags, known = self._flags(findings, b)
        maps = torch.einsum("bn,npd->bpd", flags * known, self.finding_map)  # unknown rows: no map
        return maps.repeat(1, self.grid[0], 1)

    def _flags(self, findings: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        # -> flags [B,n] (negatives clamped to 0) and whether each row is known [B,1]
        n = self.config.num_findings
        findings = torch.as_tensor(findings, device=self.finding_null.device, dtype=self.finding_null.dtype)
        if findings.ndim != 2 or findings.shape != (b, n):
            raise CTFlowError(f"findings has shape {tuple(findings.shape)}; this transformer expects {b}x{n}")
        return findings.clamp_min(0), (findings >= 0).all(dim=1, keepdim=True)

    def _tokens(self, patches: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        # patches [B,D,S',H',W'] (or [1,S',P,D] start context) -> tokens [B,N,D] with positions and depth added
        if patches.ndim == 5:
            patches = patches.flatten(3).permute(0, 2, 3, 1)  # [B,S',P,D]
        tokens = patches + self.pos_embed + self.slice_embed
        return tokens.reshape(tokens.shape[0], -1, tokens.shape[-1]) + depth[:, None]

    def _context_cache(self, context, text, y, depth) -> ContextCache:
        b = y.shape[0]
        if context is None:
            ctx = self._tokens(self.start_context, depth)  # [B,N,D]
        else:
            self._check_chunk(context, "context", b)
            ctx = self._tokens(self.context_embedder(context.to(self.x_embedder.weight.dtype)), depth)
        c = self.t_embedder(y.new_zeros(b)) + y  # context tokens are clean: t = 0
        kv = []
        for i, block in enumerate(self.blocks):
            ctx, block_kv = self._block(block, ctx, c, text, i)
            kv.append(block_kv)
        return ContextCache(kv=kv, batch_size=b)

    def _block(self, block, x, c, text: TextCache, i: int, prefix=None):
        grid = (self.grid[0], self.grid[1] * self.grid[2])
        k, v = text.kv[i]
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, x, c, k, v, text.mask, grid, prefix)
        return block(x, c, k, v, text.mask, grid, prefix)

    def _check_chunk(self, x: torch.Tensor, name: str, batch: int | None = None) -> int:
        cfg = self.config
        expected = (cfg.in_channels, cfg.chunk_slices, cfg.sample_size, cfg.sample_size)
        if x.ndim != 5 or tuple(x.shape[1:]) != expected or (batch is not None and x.shape[0] != batch):
            want = "x".join(map(str, ((batch or "B"), *expected)))
            raise CTFlowError(
                f"{name} has shape {tuple(x.shape)}; this transformer expects [B,C,S,h,w] = {want}"
            )
        return x.shape[0]


def _check_config(sample_size, chunk_slices, patch_size, hidden_size, num_heads, attention, context) -> None:
    if attention not in ATTENTIONS:
        raise CTFlowError(f"attention must be {one_of(ATTENTIONS)}, not {attention!r}")
    if context not in CONTEXTS:
        raise CTFlowError(f"context must be {one_of(CONTEXTS)}, not {context!r}")
    if (
        len(patch_size) != 3
        or chunk_slices % patch_size[0]
        or sample_size % patch_size[1]
        or sample_size % patch_size[2]
    ):
        raise CTFlowError(
            f"patch_size {patch_size} (slice, h, w) must divide chunk_slices {chunk_slices} and sample_size {sample_size}"
        )
    if hidden_size % num_heads or hidden_size % 4:
        raise CTFlowError(f"hidden_size {hidden_size} must be a multiple of 4 and of num_heads {num_heads}")


def preset_config(name: str, **overrides) -> dict:
    """The full constructor arguments of a preset, with overrides applied."""
    if name not in TRANSFORMER_PRESETS:
        raise CTFlowError(f"unknown transformer preset {name!r}; choose {one_of(TRANSFORMER_PRESETS)}")
    return full_config({**TRANSFORMER_PRESETS[name], **overrides})


def full_config(config: str | Mapping) -> dict:
    """Constructor arguments from a preset name, a partial dict or a model's ``config``, defaults filled in."""
    if isinstance(config, str):
        return preset_config(config)
    params = inspect.signature(CTFlowTransformer.__init__).parameters
    defaults = {name: p.default for name, p in params.items() if name != "self"}
    given = {k: v for k, v in config.items() if not k.startswith("_")}
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise CTFlowError(f"unknown transformer config keys: {', '.join(unknown)}")
    out = {**defaults, **given}
    out["patch_size"] = tuple(out["patch_size"])
    return out


def count_params(config: str | Mapping) -> int:
    """Number of parameters, counted on a model built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = CTFlowTransformer(**full_config(config))
    return sum(p.numel() for p in model.parameters())


def forward_flops(
    config: str | Mapping, batch: int = 1, text_len: int = 256, context_stream: bool = True
) -> int:
    """Analytic FLOPs of one forward pass (2 per multiply-add; linear layers and attention matmuls).

    ``context_stream``: in tokens mode, also count the context tokens' pass through the blocks, as in
    training or a forward without a cache; False counts one ODE step that reuses the context cache.
    """
    cfg = full_config(config)
    d, c, text_dim = cfg["hidden_size"], cfg["in_channels"], cfg["text_dim"]
    m = cfg["text_resampler"]
    pooled_len = m or -(-text_len // cfg["text_pool"])  # the text tokens the blocks see
    ps, ph, pw = cfg["patch_size"]
    slices, positions = cfg["chunk_slices"] // ps, (cfg["sample_size"] // ph) * (cfg["sample_size"] // pw)
    n, patch_dim = slices * positions, ps * ph * pw * c
    mlp_hidden = int(d * cfg["mlp_ratio"])
    factorized, tokens_mode = cfg["attention"] == "factorized", cfg["context"] == "tokens"

    def block(sees_context: bool) -> int:
        prefix = 2 if sees_context else 1  # chunk tokens also attend to the context's keys
        attn_linear = 2 * n * d * 4 * d * (2 if factorized else 1)  # qkv + proj (spatial and temporal)
        if factorized:
            attn_matmul = 4 * n * d * positions + 4 * n * d * slices * prefix
        else:
            attn_matmul = 4 * n * d * n * prefix
        cross = 2 * n * d * 2 * d + 2 * pooled_len * d * 2 * d + 4 * n * d * pooled_len
        mlp = 4 * n * d * mlp_hidden
        ada = 2 * d * (9 if factorized else 6) * d
        return attn_linear + attn_matmul + cross + mlp + ada

    conditioning = 2 * (FREQUENCY_EMBEDDING_SIZE * d + d * d) + 2 * (text_dim * d + d * d)
    if m:  # the resampler: keys/values of every report token, then m queries (attention, MLP)
        conditioning += 2 * text_len * text_dim * 2 * d + 2 * m * d * 2 * d + 4 * m * d * text_len
        conditioning += 4 * m * d * mlp_hidden
    else:
        conditioning += 2 * pooled_len * (text_dim * d + d * d)
    patch_in = 2 * n * d * patch_dim * (2 if cfg["context"] == "concat" else 1)
    final = 2 * d * 2 * d + 2 * n * d * patch_dim
    if cfg.get("final_conv"):
        final += 2 * c * c * 27 * cfg["chunk_slices"] * cfg["sample_size"] ** 2
    total = conditioning + patch_in + final + cfg["depth"] * block(tokens_mode)
    if tokens_mode and context_stream:
        total += (
            2 * (FREQUENCY_EMBEDDING_SIZE * d + d * d) + 2 * n * d * patch_dim + cfg["depth"] * block(False)
        )
    return batch * total
