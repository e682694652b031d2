"""Whether more sampler steps converge: each sampler setting against a 400-step Euler reference.

``--n`` held-out phantom reports (seeds 71000 on) are generated at 40 slices (five chunks) by the
embedded model (or ``--model``) with guidance 2, from the same seed, by Euler at 4, 10, 20, 50 and
200 steps and Heun at 4, 10 and 25 intervals. Each is compared voxel by voxel with Euler at 400
steps: the mean absolute HU difference, which should shrink as the steps grow.

An x-prediction model (``prediction: sample``) clamps its velocity at ``MIN_T`` = 0.05, as it
trained; ``flow.skip_untrained_times`` keeps the sampler from evaluating it below. Each row is also
run without that (``unskipped``, the sampler before 2026-12-05) to show what it changes.

    python benchmarks/sampler_convergence.py [--n 2] [--model DIR] [--result NAME]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import heldout_reports, refuse_unnamed_variant, write_result  # noqa: E402

import ctflow.flow  # noqa: E402
from ctflow.flow import make_scheduler  # noqa: E402
from ctflow.pipeline import CTFlowPipeline  # noqa: E402

SEED0 = 71_000
SLICES = 40  # five chunks, the fewest of the embedded model's training scans
SETTINGS = [("euler", 4), ("euler", 10), ("euler", 20), ("euler", 50), ("euler", 200)]
SETTINGS += [("heun", 4), ("heun", 10), ("heun", 25)]
REFERENCE = ("euler", 400)


def generate(pipe, reports: list[str], sampler: str, steps: int, skip: bool) -> list[np.ndarray]:
    """The HU arrays of ``reports`` (one seed each) with ``sampler`` at ``steps``; ``skip=False`` runs
    the sampler as it was before it skipped an x-prediction model's untrained times."""
    pipe.scheduler = make_scheduler(sampler, shift=pipe.scheduler.config.get("shift", 1.0))
    own = ctflow.flow.skip_untrained_times
    if not skip:
        ctflow.flow.skip_untrained_times = lambda scheduler: None
    try:
        out = pipe(
            reports,
            num_slices=SLICES,
            num_inference_steps=steps,
            guidance_scale=2.0,
            generator=[torch.Generator().manual_seed(i) for i in range(len(reports))],
        )
        return [np.asarray(v.hu(), np.float32) for v in out.volumes]
    finally:
        ctflow.flow.skip_untrained_times = own


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2, help="held-out reports")
    p.add_argument("--model", default=None, help="pipeline folder (default: the embedded model)")
    p.add_argument("--result", default=None, help="result name (default: sampler_convergence)")
    args = p.parse_args()
    refuse_unnamed_variant(p, args)
    torch.set_num_threads(2)
    pipe = CTFlowPipeline.from_pretrained(args.model)
    reports = [text for *_, text in heldout_reports(SEED0, args.n)]
    t0 = time.perf_counter()
    reference = generate(pipe, reports, *REFERENCE, skip=True)
    rows = {}
    for sampler, steps in SETTINGS:
        row = {}
        for skip in (True, False):
            volumes = generate(pipe, reports, sampler, steps, skip)
            row["skipped" if skip else "unskipped"] = round(
                float(np.mean([np.abs(v - r).mean() for v, r in zip(volumes, reference, strict=True)])), 2
            )
        rows[f"{sampler}-{steps}"] = row
        print(f"{sampler}-{steps:<4d} mean |HU - reference|: {row}")
    write_result(
        args.result or "sampler_convergence",
        {
            "model": args.model or "embedded",
            "prediction": pipe.transformer.config.prediction,
            "n": args.n,
            "seeds": [SEED0, SEED0 + args.n - 1],
            "slices": SLICES,
            "guidance": 2.0,
            "reference": "-".join(map(str, REFERENCE)),
            "mean_abs_hu_vs_reference": rows,
            "seconds": round(time.perf_counter() - t0, 1),
        },
    )


if __name__ == "__main__":
    main()
