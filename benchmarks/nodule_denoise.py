"""Where is a named nodule lost: regenerate a phantom's nodule chunks from a partly noised latent.

``nodule_pairs.py`` finds that the embedded model draws no nodule a reader fitted through its VAE
accepts. This asks from which noise level on it stops drawing one. For each of its held-out pairs
(seeds 62000+: one phantom with a single 12–20 mm nodule, its twin without) both phantoms are
encoded; the chunks the nodule spans are noised to level t (the same noise for every variant) and
integrated back to t = 0 by the model, each chunk with the true chunk before it as context (the
first chunk with the start context), under the nodule report and under the clear one. The other
chunks stay the VAE's. Each edited volume is decoded and read for a nodule.

Per level and variant (``start`` latent nodule / clear x ``report`` nodule / clear) the result counts
nodules called by the reader's nodule rule fitted through the VAE (``common.vae_nodule_rule``) and
by the shipped rule, with the mean nodule score; ``report_shift`` is the mean paired score change
from the clear report to the nodule report on the same start latent, and ``follows`` the pairs
where it is positive. t = 0 is the VAE's reconstruction; t = 1 draws the chunks from noise, as
generation does, but after the true context. Reading them:

- the nodule start under the nodule report keeps the nodule up to some t: the model can render a
  nodule it is shown that far;
- the clear start under the nodule report shows from which t the report can add one;
- the report shift shows whether the words move the nodule at all, at each t.

In the latents, ``kept_*`` measure how much of the nodule's latent difference (nodule latent minus
clear latent, over the nodule chunks) survives regeneration from the two starts under each report
(1: all, 0: none), ``added_by_report`` how much of it the nodule report adds on the clear start, and
``chunk_error`` how far the regenerated chunks lie from the VAE's (|error|² / |latent|²), to
compare with ``nodule_energy``, the nodule's share of its chunks (|zn - zc|² / |zn|²).
``layer_shares`` says how much of the nodule's difference the network's linear ends can handle at
all: the share in the patch embedding's row space (what it sees of the noisy chunk) and in the output
layer's column space (what it can write), over the nodule chunks' whole patches.

Writes ``results/nodule_denoise.json`` (``--result NAME`` names it).

    python benchmarks/nodule_denoise.py [--model DIR] [--n 24] [--steps 20] [--guidance 2] [--levels 0.05,0.1,0.25,0.5,0.75,1]
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    decoded_hu,
    generation_settings,
    generation_setup,
    result_name,
    vae_nodule_rule,
    write_result,
)
from nodule_pairs import SEED0, pairs, read  # noqa: E402


def torch_no_grad(fn):
    """``fn`` run under ``torch.no_grad()`` (torch imported only when it runs)."""

    def wrapped(*args, **kwargs):
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapped


VARIANTS = tuple(itertools.product(("nodule", "clear"), ("nodule", "clear")))  # (start, report)
# the nodule's latent difference kept under each report from the two starts, and added by the
# nodule report on the clear start (see retention)
RETENTIONS = ("kept_nodule_report", "kept_clear_report", "added_by_report", "chunk_error")


def add_arguments(p) -> None:
    p.add_argument(
        "--levels",
        default="0.05,0.1,0.25,0.5,0.75,1",  # the stored nodule_denoise.json's
        help="noise levels t in (0, 1] to regenerate the nodule chunks from, comma-separated",
    )


def parse_levels(text: str) -> list[float]:
    """``"0.25,0.5"`` -> [0.25, 0.5]; each level must lie in (0, 1]."""
    try:
        levels = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--levels takes numbers in (0, 1] separated by commas; got {text!r}") from None
    if not levels or any(not 0 < t <= 1 for t in levels):
        raise SystemExit(f"--levels takes numbers in (0, 1] separated by commas; got {text!r}")
    return levels


def sigmas_from(scheduler, steps: int, t: float) -> list[float]:
    """The sampler's noise levels for ``steps`` steps that lie below ``t``, after ``t`` itself and ending
    at 0: the tail of the schedule a generation from noise would take from level t on."""
    scheduler.set_timesteps(steps)
    tail = [float(s) for s in scheduler.sigmas if float(s) < t - 1e-6]
    return [t, *tail] if tail and tail[-1] == 0.0 else [t, *tail, 0.0]


def nodule_chunks(truth: dict, k: int) -> list[int]:
    """The indices of the k-slice chunks a phantom's visible nodule spans."""
    from ctflow.data.phantom import finding_extents

    spans = [e for e in finding_extents(truth) if e["type"] == "nodule"]
    return sorted({i for e in spans for i in range(e["first"] // k, e["last"] // k + 1)})


@torch_no_grad
def regenerate(pipe, z, chunks, cond, uncond, guidance, t, sigmas, noises):
    """``z`` [C,S,h,w] with ``chunks`` noised to ``t`` by ``noises`` (one [C,k,h,w] each) and
    integrated back to 0 by the pipeline's transformer, in order, each after the (edited) chunk
    before it. Its own Euler loop over ``sigmas`` rather than ``ctflow.flow.sample_chunk``: that starts
    from fresh noise at the scheduler's levels, and diffusers' Heun scheduler takes no custom levels;
    teaching the library sampler both would cost it more than these lines save."""
    import torch

    from ctflow.flow import context_cache_for, guided_velocity, text_cache_for
    from ctflow.train.flow_trainer import chunk_at

    k, eos, out = pipe.chunk_slices, pipe.eos_latent(), z.clone()
    model = pipe.transformer
    for i, noise in zip(chunks, noises, strict=True):
        c = {**cond, "chunk_index": torch.tensor([i])}
        c["context"] = chunk_at(out, eos, k, i - 1)[None] if i > 0 else None
        u = None if uncond is None else {**uncond, "chunk_index": c["chunk_index"], "context": c["context"]}
        text = text_cache_for(model, c, u, guidance)
        cache = context_cache_for(model, c, u, guidance, text_cache=text)
        x = (1 - t) * chunk_at(z, eos, k, i)[None] + t * noise[None]
        for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
            v = guided_velocity(model, x, torch.tensor([s]), c, u, guidance, cache, text_cache=text)
            x = x + (s_next - s) * v.float()
        valid = min(k, z.shape[1] - i * k)
        out[:, i * k : i * k + valid] = x[0, :, :valid]
    return out


def chunk_slices(chunks, k, depth) -> list[int]:
    """The slice indices of the k-slice ``chunks`` of a volume ``depth`` slices deep."""
    return [s for i in chunks for s in range(i * k, min((i + 1) * k, depth))]


def retention(a, b, zn, zc, chunks, k) -> float:
    """How much of the nodule's latent difference ``zn - zc`` lies in ``a - b``, over the nodule
    chunks: <a - b, zn - zc> / |zn - zc|² (1: all of it, 0: none)."""
    idx = chunk_slices(chunks, k, zn.shape[1])
    d = (zn - zc)[:, idx]
    return round(float(((a - b)[:, idx] * d).sum() / d.pow(2).sum().clamp_min(1e-12)), 4)


def chunk_error(a, z, chunks, k) -> float:
    """|a - z|² / |z|² over the nodule chunks: how far the regenerated chunks are from the VAE's."""
    idx = chunk_slices(chunks, k, z.shape[1])
    return round(float((a - z)[:, idx].pow(2).sum() / z[:, idx].pow(2).sum()), 4)


def patchify(model, x):
    """A chunk [C,k,h,w] -> its patches [N, ps*ph*pw*C], in the order the transformer's
    ``unpatchify`` takes them."""
    ps, ph, pw = model.config.patch_size
    c, s, h, w = x.shape
    x = x.reshape(c, s // ps, ps, h // ph, ph, w // pw, pw).permute(1, 3, 5, 2, 4, 6, 0)
    return x.reshape(-1, ps * ph * pw * c)


def layer_bases(model):
    """Orthonormal bases [P, r] of what the transformer's first and last linear maps handle of a
    patch: the row space of the patch embedding's noisy-chunk half and the column space of the
    output layer (before ``final_conv``)."""
    import torch

    c = model.config.in_channels
    embed = model.x_embedder.weight.detach()[:, :c]  # [D, C, ps, ph, pw]: the x_t half
    embed = embed.permute(0, 2, 3, 4, 1).reshape(embed.shape[0], -1)  # [D, P] in patch order
    out = model.final_layer.linear.weight.detach()  # [P, D]
    return {"embedding": torch.linalg.qr(embed.T)[0], "output": torch.linalg.qr(out)[0]}


def layer_shares(model, bases, zn, zc, chunks, k) -> dict:
    """The share of the nodule's latent difference over its chunks that lies in each basis of
    :func:`layer_bases`: what the patch embedding can see of it and the output layer can write."""
    d = torch_cat(
        [patchify(model, (zn - zc)[:, i * k : (i + 1) * k]) for i in chunks if (i + 1) * k <= zn.shape[1]]
    )
    if d.numel() == 0 or float(d.pow(2).sum()) == 0:
        return {name: None for name in bases}
    return {name: round(float((d @ q).pow(2).sum() / d.pow(2).sum()), 4) for name, q in bases.items()}


def torch_cat(parts):
    import torch

    return torch.cat(parts) if parts else torch.zeros(0)


def summary(rows: list[dict], levels: list[float]) -> dict:
    """Per level (and 0: the reconstructions) and variant ``{start}_{report}``: nodule calls of both
    rules and the mean score; per start latent the paired score shift the nodule report makes."""
    out = {}
    for t in [0.0, *levels]:
        key = f"{t:g}"
        reads = [r["levels"][key] for r in rows]
        level = {}
        for start, report in VARIANTS if t else (("nodule", None), ("clear", None)):
            name = start if report is None else f"{start}_{report}"
            got = [x[name] for x in reads]
            scores = [g["score"] for g in got if g["score"] is not None]
            level[name] = {
                "vae_rule": sum(g["nodule_vae_rule"] for g in got),
                "shipped_rule": sum(g["nodule"] for g in got),
                "mean_score": round(float(np.mean(scores)), 3) if scores else None,
            }
        if t:
            for start in ("nodule", "clear"):
                shifts = [
                    x[f"{start}_nodule"]["score"] - x[f"{start}_clear"]["score"]
                    for x in reads
                    if None not in (x[f"{start}_nodule"]["score"], x[f"{start}_clear"]["score"])
                ]
                level[f"{start}_report_shift"] = round(float(np.mean(shifts)), 3) if shifts else None
                level[f"{start}_follows"] = [sum(s > 0 for s in shifts), len(shifts)]
            for name in RETENTIONS:
                level[name] = round(float(np.mean([r["retention"][key][name] for r in rows])), 4)
        out[key] = level
    return out


def main() -> dict:
    import torch

    from ctflow.data.volume import Volume
    from ctflow.flow import null_condition
    from ctflow.models.text import with_meta

    args, pipe = generation_setup(24, __doc__.splitlines()[0], add_arguments, first_seed=SEED0)
    levels = parse_levels(args.levels)
    rule = vae_nodule_rule(pipe)
    k = pipe.chunk_slices
    bases = layer_bases(pipe.transformer)
    rows, seeds = [], []
    for i, seed, cases in pairs(args.first_seed, args.n):
        (nod, nod_report), (clear, clear_report) = cases
        chunks = nodule_chunks(nod.ground_truth, k)
        z = {"nodule": pipe.vae.encode_volume(nod.volume), "clear": pipe.vae.encode_volume(clear.volume)}
        spacing = nod.volume.spacing
        conds = {}
        for name, report in (("nodule", nod_report), ("clear", clear_report)):
            conds[name] = pipe.text_condition([with_meta(report, None)])
        g = torch.Generator().manual_seed(seed)
        noises = [torch.randn(z["nodule"][:, :k].shape, generator=g) for _ in chunks]
        row = {"seed": seed, "chunks": chunks, "levels": {"0": {}}, "retention": {}}
        row["nodule_energy"] = chunk_error(z["clear"], z["nodule"], chunks, k)
        row["layer_shares"] = layer_shares(pipe.transformer, bases, z["nodule"], z["clear"], chunks, k)
        for start in ("nodule", "clear"):
            row["levels"]["0"][start] = read(Volume(decoded_hu(pipe, z[start]), spacing), rule)
        for t in levels:
            sigmas = sigmas_from(pipe.scheduler, args.steps, t)
            row["levels"][f"{t:g}"] = level = {}
            edited = {}
            for start, report in VARIANTS:
                cond = conds[report]
                uncond = null_condition(cond) if args.guidance != 1 else None
                out = regenerate(pipe, z[start], chunks, cond, uncond, args.guidance, t, sigmas, noises)
                level[f"{start}_{report}"] = read(Volume(decoded_hu(pipe, out), spacing), rule)
                edited[start, report] = out
            compared = {
                "kept_nodule_report": (edited["nodule", "nodule"], edited["clear", "nodule"]),
                "kept_clear_report": (edited["nodule", "clear"], edited["clear", "clear"]),
                "added_by_report": (edited["clear", "nodule"], edited["clear", "clear"]),
            }
            row["retention"][f"{t:g}"] = {
                **{
                    name: retention(a, b, z["nodule"], z["clear"], chunks, k)
                    for name, (a, b) in compared.items()
                },
                "chunk_error": chunk_error(edited["nodule", "nodule"], z["nodule"], chunks, k),
            }
        calls = {t: {v: x["nodule_vae_rule"] for v, x in lv.items()} for t, lv in row["levels"].items()}
        print(f"{i}: seed {seed} chunks {chunks} calls {calls}", flush=True)
        print(f"   retention {row['retention']}", flush=True)
        rows.append(row)
        seeds.append(seed)
    result = {
        "n": args.n,
        "seeds": seeds,
        "levels": levels,
        "summary": summary(rows, levels),
        "mean_nodule_energy": round(float(np.mean([r["nodule_energy"] for r in rows])), 4),
        "mean_layer_shares": {
            name: round(
                float(
                    np.mean([r["layer_shares"][name] for r in rows if r["layer_shares"][name] is not None])
                ),
                4,
            )
            for name in bases
        },
        **generation_settings(args),
        "rows": rows,
    }
    write_result(args.result or result_name("nodule_denoise", args.guidance), result)
    return result


if __name__ == "__main__":
    main()
