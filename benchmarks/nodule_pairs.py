"""Does the model draw a lung nodule where the report names one, and leave it out where it does not?

For each held-out seed (62000+, never trained on) two phantoms share all anatomy: one with a single
lung nodule (lobes in turn, 12, 16 or 20 mm: one to two voxels across at 64 px and up) and no other
finding, one with no finding; each has its own generated report, so the two differ only in the
nodule's sentence. Both are generated with the same seed, so the noise is the same and only the
words differ. Seeds whose nodule the phantom could not place are passed over.

The attribute reader scores each volume's most nodule-like spot in the lungs (``nodule_score``;
0 and above: it calls a nodule). Per pair, ``score_shift`` = the score under the nodule report −
the score under the clear one: positive when the nodule follows the words, about 0 when the model
ignores them. ``found`` counts nodule reports whose volume the reader calls a nodule, ``false``
clear reports whose volume it calls one anyway; ``found_vae_rule`` and ``false_vae_rule`` count the
calls of the reader's nodule rule fitted through this VAE (``common.vae_nodule_rule``), which
calls fewer nodules where there are none. The two phantoms through the VAE give what a
generator can reach. Paired and from one-finding reports, this reads the nodule more directly than
``embedded_quality.py``'s 14 reported nodules among other findings.

Writes ``results/nodule_pairs.json`` (``--result NAME`` names it).

    python benchmarks/nodule_pairs.py [--model DIR] [--n 24] [--steps 20] [--guidance 2] [--first-seed S --result NAME]
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    generate,
    generation_settings,
    generation_setup,
    rendered_case,
    result_name,
    through_vae,
    vae_nodule_rule,
    write_result,
)

SEED0 = 62000
SIZES_MM = (12.0, 16.0, 20.0)


def pair(seed: int, i: int):
    """(nodule case, clear case) for ``seed``, each (render, report); None if the nodule was not placed."""
    from ctflow.data.phantom import LOBES, sample_spec

    spec = sample_spec(seed, size=64, slice_range=(40, 120))
    nodule = {"type": "nodule", "lobe": LOBES[i % len(LOBES)], "size_mm": SIZES_MM[i % len(SIZES_MM)]}
    with_nodule = rendered_case(dataclasses.replace(spec, findings=[nodule]))
    if not with_nodule[0].ground_truth["labels"]["Lung nodule"]:
        return None
    return with_nodule, rendered_case(dataclasses.replace(spec, findings=[]))


def pairs(first_seed: int, n: int):
    """The first ``n`` seeds from ``first_seed`` whose nodule was placed: (index, seed, cases of :func:`pair`)."""
    i = 0
    for seed in itertools.count(first_seed):
        if i == n:
            return
        cases = pair(seed, i)
        if cases is not None:
            yield i, seed, cases
            i += 1


def read(volume, vae_rule: dict | None = None) -> dict:
    """The reader's nodule score (None: no lungs found) and call; with ``vae_rule`` also the call of
    the nodule rule fitted through the VAE (``nodule_vae_rule``), from the same read."""
    from ctflow.eval.attributes import attribute_scores, attributes_from_scores

    scores = attribute_scores(volume, nodule_rules=None if vae_rule is None else {"vae_rule": vae_rule})
    score = round(float(scores["nodule_score"]), 3) if "nodule_score" in scores else None
    out = {"score": score, "nodule": attributes_from_scores(scores)["nodule"]}
    if vae_rule is not None:
        out["nodule_vae_rule"] = attributes_from_scores(scores, "nodule_score_vae_rule")["nodule"]
    return out


def summary(rows: list[dict]) -> dict:
    """Calls over the n pairs and the paired score shift."""
    shifts = [
        r["nodule"]["score"] - r["clear"]["score"]
        for r in rows
        if None not in (r["nodule"]["score"], r["clear"]["score"])
    ]
    return {
        "pairs": len(rows),
        "found": sum(r["nodule"]["nodule"] for r in rows),
        "false": sum(r["clear"]["nodule"] for r in rows),
        "pairs_following_report": sum(s > 0 for s in shifts),
        "pairs_read": len(shifts),
        "mean_score_shift": round(float(np.mean(shifts)), 3) if shifts else None,
        **(
            {
                "found_vae_rule": sum(r["nodule"]["nodule_vae_rule"] for r in rows),
                "false_vae_rule": sum(r["clear"]["nodule_vae_rule"] for r in rows),
            }
            if rows and "nodule_vae_rule" in rows[0]["nodule"]
            else {}
        ),
    }


def main() -> dict:
    args, pipe = generation_setup(24, __doc__.splitlines()[0], first_seed=SEED0)
    vae_rule = vae_nodule_rule(pipe)
    rows = {"generated": [], "real": []}
    seeds = []
    for i, seed, cases in pairs(args.first_seed, args.n):
        gen, real = {}, {}
        for key, (render, report) in zip(("nodule", "clear"), cases, strict=True):
            out = generate(pipe, args, report, i)
            gen[key] = read(out.volumes[0], vae_rule)
            real[key] = read(through_vae(pipe, render.volume)[1], vae_rule)
        print(f"{i}: seed {seed} generated {gen}  through VAE {real}", flush=True)
        seeds.append(seed)
        rows["generated"].append(gen)
        rows["real"].append(real)
    result = {
        "n": args.n,
        "seeds": seeds,
        "generated": summary(rows["generated"]),
        "real_through_vae": summary(rows["real"]),
        **generation_settings(args),
        "rows": [
            {"seed": s, "generated": g, "real": r}
            for s, g, r in zip(seeds, rows["generated"], rows["real"], strict=True)
        ],
    }
    write_result(args.result or result_name("nodule_pairs", args.guidance), result)
    print(result["generated"], result["real_through_vae"])
    return result


if __name__ == "__main__":
    main()
