"""Does the model put a reported pleural effusion on the side the report names?

For each held-out seed (61500+, never trained on) two phantoms share all anatomy: one with a left
pleural effusion, one with a right one, and no other finding; each has its own generated report, and
the two reports differ only in the side. Both are generated with the same seed, so the noise is the
same and only the side word differs.

The attribute reader measures each volume's dependent pleural fluid per side (ml); a volume *draws*
fluid when the reader calls an effusion (10 ml or more on a side), and draws it *on the named side*
when that is the only side it calls. Per pair, ``side_shift_ml`` = (left − right fluid) under the
left report − the same under the right report: positive when the fluid follows the side word, about
0 when the model ignores it. The two phantoms through the VAE give what a generator can reach.

``side_effect`` looks inside one step. At the chunk in the middle of the effusion, with the chunk
before it taken from the same phantom without an effusion (so the context shows no side) and from
pure noise (t = 1), the transformer's clean-chunk estimate x̂0 is computed under the left report,
the right report and the report without the effusion. ``side_effect`` = RMS(x̂0 left − x̂0 right) ÷
RMS(x0 left − x0 right), the change the side word makes to the prediction over the change the side
makes to the true latents; ``effusion_effect`` = the same for the left report against the report
without the effusion. 1: read fully; 0: ignored.

Writes ``results/laterality.json`` and ``results/laterality.png``: for the first three pairs, axial
slices at 60/70/80% of the depth (mediastinal window, patient left on the image right); rows
generated from the left report, from the right report, then the two phantoms through the VAE.
``--result NAME`` names them. ``--short`` (writes ``laterality_short``) replaces each template report by a short typed one, its
meta line and "Findings: There is a left pleural effusion. Impressions: Left pleural effusion." (or
"There is no pleural effusion."), so the side is a larger part of the text.

    python benchmarks/laterality.py [--model DIR] [--n 12] [--steps 20] [--guidance 2] [--short] [--first-seed S --result NAME]
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

SEED0 = 61500
SIDES = ("left", "right")
DEPTHS = (0.6, 0.7, 0.8)  # effusions lie in the lower chest


def twins(seed: int, short: bool = False):
    """{side: (render, report)}: the seed's phantom with only a pleural effusion on that side, and
    (key "none") with no finding. ``short``: the report is only the meta line and one sentence."""
    from ctflow.data.phantom import sample_spec
    from ctflow.data.reports import NORMAL_IMPRESSION
    from ctflow.models.text import format_report

    spec = sample_spec(seed, size=64, slice_range=(40, 120))
    out = {}
    for side in (*SIDES, "none"):
        findings = [{"type": "effusion", "side": side}] if side in SIDES else []
        render, report = rendered_case(dataclasses.replace(spec, findings=findings))
        if short:
            said = (
                f"There is a {side} pleural effusion." if side in SIDES else "There is no pleural effusion."
            )
            impression = f"{side.capitalize()} pleural effusion." if side in SIDES else NORMAL_IMPRESSION
            report = format_report(said, impression, spec.num_slices, spec.slice_spacing)
        out[side] = (render, report)
    return out


def one_step_effects(pipe, cases: dict, latents: dict, seed: int) -> dict:
    """``side_effect`` and ``effusion_effect`` (module docstring) at the effusion's middle chunk."""
    from ctflow.data.phantom import finding_extents

    k = pipe.chunk_slices
    extent = finding_extents(cases["left"][0].ground_truth)[0]
    c = max(1, (extent["first"] + extent["last"]) // 2 // k)
    keys = ("left", "right", "none")
    x0 = {key: latents[key][None, :, c * k : (c + 1) * k] for key in keys}
    context = latents["none"][None, :, (c - 1) * k : c * k].expand(3, -1, -1, -1, -1)
    cond = pipe.text_condition([cases[key][1] for key in keys])
    noise = torch.randn(x0["none"].shape, generator=torch.Generator().manual_seed(seed)).expand(
        3, -1, -1, -1, -1
    )
    with torch.no_grad():
        v = pipe.transformer(
            noise, torch.ones(3), context=context, chunk_index=torch.full((3,), c), **cond
        ).sample
    est = dict(zip(keys, noise - v, strict=True))  # x̂0 = x_t − t·v at t = 1
    return {
        "side_effect": rms(est["left"] - est["right"]) / rms(x0["left"] - x0["right"]),
        "effusion_effect": rms(est["left"] - est["none"]) / rms(x0["left"] - x0["none"]),
    }


def fluid(volume) -> dict:
    """The reader's pleural fluid per side (ml; None: no lungs found) and its effusion call."""
    from ctflow.eval.attributes import attribute_scores, attributes_from_scores

    scores = attribute_scores(volume)
    if "effusion_left_ml" not in scores:
        return {"left_ml": None, "right_ml": None, "effusion": "none"}
    return {
        "left_ml": round(float(scores["effusion_left_ml"]), 1),
        "right_ml": round(float(scores["effusion_right_ml"]), 1),
        "effusion": attributes_from_scores(scores)["effusion"],
    }


def summary(rows: list[dict]) -> dict:
    """Counts over the 2n volumes (drawn, on the named side) and the paired side shift."""
    calls = [r[side]["effusion"] for r in rows for side in SIDES]
    named = [r[side]["effusion"] == side for r in rows for side in SIDES]
    shifts = []
    for r in rows:
        if None in (r["left"]["left_ml"], r["right"]["left_ml"]):
            continue
        lean = {side: r[side]["left_ml"] - r[side]["right_ml"] for side in SIDES}
        shifts.append(lean["left"] - lean["right"])
    return {
        "volumes": len(calls),
        "drawn": sum(c != "none" for c in calls),
        "on_named_side": sum(named),
        "on_other_side": sum(c in SIDES and not ok for c, ok in zip(calls, named, strict=True)),
        "bilateral": sum(c == "bilateral" for c in calls),
        "side_shift_ml": round(float(np.mean(shifts)), 1) if shifts else None,
        "pairs_following_side": sum(s > 0 for s in shifts),
        "pairs_read": len(shifts),
    }


def main() -> dict:
    args, pipe = generation_setup(
        12,
        __doc__.splitlines()[0],
        lambda p: p.add_argument(
            "--short",
            action="store_true",
            help="short typed reports: the meta line and the effusion sentence",
        ),
        first_seed=SEED0,
    )
    seed0 = args.first_seed
    pipe.transformer.eval()
    rows = {"generated": [], "real": []}
    effects = {"side_effect": [], "effusion_effect": []}
    strips = []
    for i in range(args.n):
        cases = twins(seed0 + i, args.short)
        gen, real, latents = {}, {}, {}
        for side, (render, report) in cases.items():
            latents[side], recon = through_vae(pipe, render.volume)
            if side not in SIDES:
                continue
            out = generate(pipe, args, report, i)
            gen[side], real[side] = fluid(out.volumes[0]), fluid(recon)
            if i < 3:
                strips.append((axial_strip(out.volumes[0], DEPTHS), axial_strip(recon, DEPTHS)))
        for key, value in one_step_effects(pipe, cases, latents, i).items():
            effects[key].append(value)
        rows["generated"].append(gen)
        rows["real"].append(real)
        print(
            f"{i}: generated {gen}  through VAE {real}  side effect {effects['side_effect'][-1]:.3f}",
            flush=True,
        )

    result = {
        "n": args.n,
        "seeds": [seed0, seed0 + args.n - 1],
        "generated": summary(rows["generated"]),
        "real_through_vae": summary(rows["real"]),
        **{key: round(float(np.mean(v)), 4) for key, v in effects.items()},
        **generation_settings(args),
        "short_reports": args.short,
        "rows": [
            {"seed": seed0 + i, "generated": g, "real": r}
            for i, (g, r) in enumerate(zip(rows["generated"], rows["real"], strict=True))
        ],
    }
    name = args.result or result_name("laterality_short" if args.short else "laterality", args.guidance)
    write_result(name, result)
    import imageio.v3 as iio

    blocks = []
    for j in range(0, len(strips), 2):  # one pair: generated left, generated right, real left, real right
        (gl, rl), (gr, rr) = strips[j], strips[j + 1]
        blocks += [np.pad(s, ((0, 4), (0, 0))) for s in (gl, gr, rl, rr)] + [
            np.zeros((8, gl.shape[1]), np.uint8)
        ]
    iio.imwrite(RESULTS / f"{name}.png", np.concatenate(blocks).repeat(2, 0).repeat(2, 1))  # 2x, nearest
    return result


if __name__ == "__main__":
    main()
