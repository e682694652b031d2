"""Where does the model lose a reported pleural effusion: where it begins, or after?

For held-out phantoms (seeds 61000+, never trained on) with a one-sided effusion, one chunk is
generated with the true previous chunk (through the VAE) as context, at two places:

* **onset**: the chunk holding the effusion's first slice; its context has no fluid, so only the
  report can say that fluid begins here;
* **continuation**: the chunk at the middle of the effusion's slice range; its context already
  shows the fluid, which the model may carry on.

Each chunk is generated with the phantom's own report and with the report of the same phantom
without the effusion (same noise). The measure is the share of the effusion's voxels (from the
phantom's label map, in that chunk) whose generated HU, after a 3x3x3 median, lies in the attribute
reader's fluid band (and their median HU); the same share in the phantom's own reconstruction is the most a generator can
reach through this VAE, and the no-effusion report shows what the context alone gives.

``prediction_by_t``: for the continuation chunk and the effusion report, the same measures on the
model's one-step estimate of the clean chunk from the true chunk noised to t (x̂0 = x_t − t·v),
without guidance: where along the noise scale the model knows (or loses) the fluid.
``matched_noise``: the true chunk decoded after adding Gaussian noise of the same RMS as the model's
error at t = 0.1 (``x0_error_rms_t0.1``, per chunk): if the VAE decoder turned any small latent error
into HU outside the fluid band, this would fall as far as ``prediction_by_t["0.1"]``; if the model's
error is aimed at the fluid, it stays near the reconstruction's share.

    python benchmarks/effusion_probe.py [--model DIR] [--n 12] [--steps 20] [--guidance 2]

Writes ``results/effusion_probe.json`` (another guidance: ``effusion_probe_guidance{G}.json``;
``--result NAME``: ``NAME.json``).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    decoded_hu,
    generation_settings,
    generation_setup,
    rendered_case,
    result_name,
    rms,
    through_vae,
    write_result,
)

SEED0 = 61000
NOISE_LEVELS = (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
MATCHED_T = 0.1  # the model's error at this time sets the noise added to the true chunk (matched_noise)


def effusion_case(seed: int, side: str):
    """(volume, label map, report with effusion, report without, effusion slice range) of one seed."""
    from ctflow.data.phantom import sample_spec

    spec = sample_spec(seed, size=64, slice_range=(64, 120))
    others = [f for f in spec.findings if f["type"] != "effusion"]
    with_eff, text_eff = rendered_case(
        dataclasses.replace(spec, findings=[*others, {"type": "effusion", "side": side}])
    )
    _, text_none = rendered_case(dataclasses.replace(spec, findings=others))
    ext = next(f for f in with_eff.ground_truth["findings"] if f["type"] == "effusion")
    return with_eff.volume, with_eff.labels, text_eff, text_none, ext.get("slice_range")


def fluid_measures(hu: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """(share of ``mask`` voxels whose 3x3x3-median HU lies in the fluid band, their median HU)."""
    from scipy import ndimage as ndi

    from ctflow.eval.attributes import FLUID_HU

    med = ndi.median_filter(hu, size=3)
    inside = ((med >= FLUID_HU[0]) & (med <= FLUID_HU[1]))[mask]
    return float(inside.mean()), float(np.median(med[mask]))


def main() -> dict:
    args, pipe = generation_setup(12, __doc__.splitlines()[0])
    from ctflow.data.phantom import LABEL_IDS
    from ctflow.eval.attributes import FLUID_HU
    from ctflow.flow import null_condition, sample_chunk

    tr, k = pipe.transformer.eval(), pipe.chunk_slices
    kinds = ("report", "no_effusion_report", "reconstruction")
    shares = {p: {key: [] for key in kinds} for p in ("onset", "continuation")}
    median_hu = {p: {key: [] for key in kinds} for p in ("onset", "continuation")}
    by_t = {t: [] for t in NOISE_LEVELS}
    matched = []  # (fluid share, median HU, RMS of the model's error) of the true chunk + matched noise
    used = 0
    for i in range(args.n):
        vol, labels, text_eff, text_none, rng = effusion_case(SEED0 + i, ("right", "left")[i % 2])
        if rng is None:
            continue
        first, last = rng
        onset = first // k
        middle = max(onset + 1, (first + last) // 2 // k)
        if onset == 0 or (middle + 1) * k > vol.num_slices:
            continue  # starts in the first chunk, or too short to have a continuation chunk
        used += 1
        z, recon = through_vae(pipe, vol)
        recon_hu, fluid = recon.hu(), labels == LABEL_IDS["effusion"]
        cond = pipe.text_condition([text_eff, text_none])
        uncond = null_condition(cond) if args.guidance != 1.0 else None
        for place, c in (("onset", onset), ("continuation", middle)):
            chunk = slice(c * k, (c + 1) * k)
            cond_c = {**cond, "chunk_index": torch.full((2,), c)}
            cond_c["context"] = z[None, :, (c - 1) * k : c * k].expand(2, -1, -1, -1, -1)
            decoded = []
            for row in (0, 1):  # the effusion report, then the one without: the same noise (seed i)
                pick = slice(row, row + 1)
                with torch.no_grad():
                    x0 = sample_chunk(
                        tr,
                        pipe.scheduler,
                        (1, z.shape[0], k, *z.shape[2:]),
                        {key: v[pick] for key, v in cond_c.items()},
                        args.steps,
                        args.guidance,
                        torch.Generator().manual_seed(i),
                        None if uncond is None else {key: v[pick] for key, v in uncond.items()},
                        finding_scale=args.finding_guidance,
                    )
                decoded.append(decoded_hu(pipe, x0[0]))
            mask = fluid[chunk]
            if not mask.any():
                continue
            for key, hu in zip(kinds, [*decoded, recon_hu[chunk]], strict=True):
                share, med = fluid_measures(hu, mask)
                shares[place][key].append(share)
                median_hu[place][key].append(med)
            if place == "continuation":
                x0_true = z[None, :, chunk]
                noise = torch.randn(x0_true.shape, generator=torch.Generator().manual_seed(i))
                one = {key: v[:1] for key, v in cond_c.items()}
                for t in NOISE_LEVELS:
                    x_t = (1 - t) * x0_true + t * noise
                    with torch.no_grad():
                        x0_hat = x_t - t * tr(x_t, torch.full((1,), t), **one).sample
                    hu = decoded_hu(pipe, x0_hat[0])
                    by_t[t].append(fluid_measures(hu, mask))
                    if t == MATCHED_T:
                        err = float(rms(x0_hat - x0_true))
                        other = torch.randn(
                            x0_true.shape, generator=torch.Generator().manual_seed(10_000 + i)
                        )
                        hu = decoded_hu(pipe, (x0_true + err * other)[0])
                        matched.append((*fluid_measures(hu, mask), err))
        print(
            f"{i}: "
            + "  ".join(f"{p} {[round(v[-1], 3) for v in s.values() if v]}" for p, s in shares.items()),
            flush=True,
        )
    result = {
        "n": used,
        "seeds": [SEED0, SEED0 + args.n - 1],
        **generation_settings(args),
        "fluid_band_hu": list(FLUID_HU),
        "fluid_recall": {
            place: {key: round(float(np.mean(v)), 3) if v else None for key, v in s.items()}
            for place, s in shares.items()
        },
        "median_hu_in_effusion": {
            place: {key: round(float(np.mean(v)), 1) if v else None for key, v in s.items()}
            for place, s in median_hu.items()
        },
        "prediction_by_t": {
            f"{t:g}": {
                "fluid_recall": round(float(np.mean([v[0] for v in rows])), 3),
                "median_hu": round(float(np.mean([v[1] for v in rows])), 1),
            }
            for t, rows in by_t.items()
            if rows
        },
        "matched_noise": {
            "fluid_recall": round(float(np.mean([m[0] for m in matched])), 3),
            "median_hu": round(float(np.mean([m[1] for m in matched])), 1),
            f"x0_error_rms_t{MATCHED_T:g}": round(float(np.mean([m[2] for m in matched])), 3),
        }
        if matched
        else None,
        "chunks": {place: len(s["reconstruction"]) for place, s in shares.items()},
    }
    write_result(args.result or result_name("effusion_probe", args.guidance), result)
    return result


if __name__ == "__main__":
    main()
