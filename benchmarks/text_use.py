"""Does the embedded model read the findings in the report? Same phantom, with and without findings.

For each held-out seed (60500+, never trained on) two phantoms share all anatomy: one with no
findings, one with cardiomegaly and a bilateral pleural effusion, each with its own generated report.

* Prediction: the transformer's clean-chunk estimate x̂0 for a chunk in the lower chest (60% of the
  depth, where heart and effusions are), from pure noise (t = 1) and t = 0.9, with the same previous
  chunk (from the normal phantom) and the two reports. ``report_effect`` is RMS(x̂0 with findings −
  x̂0 without) ÷ RMS(x0 with findings − x0 without), the change the report makes to the prediction
  over the change the findings make to the true latents: 1 means the report moves the prediction as
  much as the findings move the anatomy, 0 means the report is ignored. ``null_effect``:
  the same for report vs no report (classifier-free guidance's unconditional branch).
* Generation: both reports generated with the same seed; the phantom reader's heart/thorax ratio,
  the share of fluid-density voxels in the posterior lower chest and the reader's effusion volume
  (ml, both sides), generated vs the two phantoms through the VAE (what the findings should change).

Writes ``results/text_use.json`` and ``results/text_use.png``: for the first two pairs, axial
slices at 50/60/70% of the depth (mediastinal window), one row per volume: generated without
findings, generated with them, then the two phantoms through the VAE. Another guidance writes
``text_use_guidance{G}.json``/``.png``; ``--result NAME`` names them.

    python benchmarks/text_use.py [--model DIR] [--n 6] [--guidance 2]
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    RESULTS,
    axial_strip,
    generate,
    generation_settings,
    generation_setup,
    rendered_case,
    result_name,
    rms,
    through_vae,
    write_result,
)

SEED0 = 60500
FINDINGS = [{"type": "cardiomegaly"}, {"type": "effusion", "side": "bilateral"}]
MEASURES = ("cardio_ratio", "fluid_share", "effusion_ml")


def pair(seed: int):
    """(normal, abnormal) phantoms of one seed: (volume, report, label map) each."""
    from ctflow.data.phantom import sample_spec

    spec = sample_spec(seed, size=64, slice_range=(64, 120))
    out = []
    for findings in ([], FINDINGS):
        r, text = rendered_case(dataclasses.replace(spec, findings=findings))
        out.append((r.volume, text, r.labels))
    return out


def fluid_share(hu: np.ndarray) -> float:
    """Share of fluid/soft-tissue density voxels (-30..40 HU) in the posterior lower chest."""
    s, h = hu.shape[0], hu.shape[1]
    region = hu[s // 2 :, int(0.56 * h) : int(0.94 * h)]
    return float(((region > -30) & (region < 40)).mean())


def measures(volume) -> dict:
    from ctflow.eval.attributes import attribute_scores

    scores = attribute_scores(volume)
    return {
        # None: unreadable (no lungs found, or 0: no slices at mid-heart depth below the apex)
        "cardio_ratio": scores.get("cardio_ratio") or None,
        "fluid_share": fluid_share(volume.hu()),
        # the reader's dependent pleural fluid, both sides (ml, scaled to body size); None: no lungs
        "effusion_ml": (
            round(scores["effusion_right_ml"] + scores["effusion_left_ml"], 1)
            if "effusion_right_ml" in scores
            else None
        ),
    }


def main() -> dict:
    args, pipe = generation_setup(6, __doc__.splitlines()[0])
    from ctflow.data.phantom import LABEL_IDS
    from ctflow.flow import null_condition

    tr, k = pipe.transformer.eval(), pipe.chunk_slices
    effects = {t: {"report": [], "null": []} for t in (1.0, 0.9)}
    gen, real = {"normal": [], "findings": []}, {"normal": [], "findings": []}
    strips = []
    effusion_hu = {"phantom": [], "through_vae": []}
    for i in range(args.n):
        (vol_n, rep_n, _), (vol_f, rep_f, labels_f) = pair(SEED0 + i)
        (z_n, recon_n), (z_f, recon_f) = through_vae(pipe, vol_n), through_vae(pipe, vol_f)  # z [C,S,h,w]
        real["normal"].append(measures(recon_n))
        real["findings"].append(measures(recon_f))
        fluid = labels_f == LABEL_IDS["effusion"]  # the effusion's HU before and after the VAE
        effusion_hu["phantom"].append(vol_f.hu()[fluid])
        effusion_hu["through_vae"].append(recon_f.hu()[fluid])
        c = int(0.6 * z_n.shape[1]) // k
        x0_n, x0_f = z_n[None, :, c * k : (c + 1) * k], z_f[None, :, c * k : (c + 1) * k]
        ctx = z_n[None, :, (c - 1) * k : c * k]
        cond = pipe.text_condition([rep_n, rep_f])
        null = null_condition(cond)
        noise = torch.randn(x0_n.shape, generator=torch.Generator().manual_seed(i)).expand(2, -1, -1, -1, -1)
        true = rms(x0_f - x0_n)
        with torch.no_grad():
            for t in effects:
                x_t = (1 - t) * x0_n.expand(2, -1, -1, -1, -1) + t * noise
                tt = torch.full((2,), t)
                common = {"context": ctx.expand(2, -1, -1, -1, -1), "chunk_index": torch.full((2,), c)}
                x0_hat = x_t - t * tr(x_t, tt, **common, **cond).sample
                x0_null = x_t - t * tr(x_t, tt, **common, **null).sample
                effects[t]["report"].append(rms(x0_hat[1] - x0_hat[0]) / true)
                effects[t]["null"].append(rms(x0_hat[0] - x0_null[0]) / true)
        for key, rep in (("normal", rep_n), ("findings", rep_f)):
            out = generate(pipe, args, rep, i)  # with every generation option the run was given
            gen[key].append(measures(out.volumes[0]))
            if i < 2:
                strips.append(axial_strip(out.volumes[0]))
        if i < 2:
            strips += [axial_strip(recon_n), axial_strip(recon_f)]
        print(
            f"{i}: report effect t=1 {effects[1.0]['report'][-1]:.3f}  generated {gen['findings'][-1]} vs "
            f"{gen['normal'][-1]}  real {real['findings'][-1]} vs {real['normal'][-1]}",
            flush=True,
        )

    def shift(rows: dict) -> dict:
        # mean (with findings - without) over the pairs the reader could read on both sides
        out = {}
        for m in MEASURES:
            d = [
                f[m] - n[m]
                for f, n in zip(rows["findings"], rows["normal"], strict=True)
                if None not in (f[m], n[m])
            ]
            out[m] = round(float(np.mean(d)), 4) if d else None
            out[f"{m}_pairs"] = len(d)
        return out

    result = {
        "n": args.n,
        "seeds": [SEED0, SEED0 + args.n - 1],
        "findings_added": FINDINGS,
        "report_effect": {str(t): round(float(np.mean(e["report"])), 4) for t, e in effects.items()},
        "null_effect": {str(t): round(float(np.mean(e["null"])), 4) for t, e in effects.items()},
        "generated_shift": shift(gen),
        "real_shift_through_vae": shift(real),
        **generation_settings(args),
        # the attribute reader calls fluid at -15..22 HU: what the VAE does to the effusion's HU
        "effusion_hu_p10_p50_p90": {
            k: [round(float(q), 1) for q in np.percentile(np.concatenate(v), [10, 50, 90])]
            for k, v in effusion_hu.items()
        },
        "rows": [
            {
                "seed": SEED0 + i,
                **{f"{src}_{key}": d[key][i] for src, d in (("generated", gen), ("real", real)) for key in d},
            }
            for i in range(args.n)
        ],
    }
    name = args.result or result_name("text_use", args.guidance)
    write_result(name, result)
    import imageio.v3 as iio

    grid = np.concatenate([np.pad(s, ((0, 4), (0, 0))) for s in strips])
    iio.imwrite(RESULTS / f"{name}.png", grid.repeat(2, 0).repeat(2, 1))  # 2x, nearest
    return result


if __name__ == "__main__":
    main()
