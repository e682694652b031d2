"""What the embedded model's false consolidations are: reported effusions drawn denser than fluid?

The attribute reader calls a consolidation in most generated volumes whose report names an effusion
and no consolidation, and in few whose report names neither (``findings_table.py``, its last two
rows). This generates the volumes of ``embedded_quality.py`` again (the same held-out reports, seeds
and settings, so the same volumes on one machine) for the reports without a consolidation, and
describes each region the reader calls one (:func:`ctflow.eval.attributes.consolidation_regions`):
its median HU, its share in the posterior half of the body (where dependent fluid lies) and whether
its slices overlap the phantom's effusion (ground truth) and it lies on the reported side (most of
it on that side of the midline; either side for a bilateral effusion). A reported effusion drawn in
its place but denser than the reader's -15..22 HU fluid band reads as a posterior region at
+22..150 HU within the effusion's slices.

    python benchmarks/consolidation_probe.py [--n 50] [--model DIR] [--result NAME] [--first-seed S]

Writes ``consolidation_probe.json`` (``--result NAME``: ``NAME.json``).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    generate,
    generation_settings,
    generation_setup,
    heldout_reports,
    result_name,
    write_result,
)

SEED0 = 50000  # embedded_quality.py's held-out reports


def summary(rows: list[dict]) -> dict:
    """Per group: volumes, volumes with a consolidation read, and of their largest regions the median
    HU, the median posterior share, how many are posterior and denser than fluid, and how many overlap
    the reported effusion's slices and lie on its side."""
    from ctflow.eval.attributes import FLUID_HU

    called = [r for r in rows if r["regions"]]
    largest = [r["regions"][0] for r in called]
    return {
        "volumes": len(rows),
        "with_consolidation": len(called),
        "median_hu": round(statistics.median(g["median_hu"] for g in largest), 1) if largest else None,
        "posterior_share": round(statistics.median(g["posterior_share"] for g in largest), 3)
        if largest
        else None,
        "dense_fluid_like": sum(g["posterior_share"] > 0.8 and g["median_hu"] > FLUID_HU[1] for g in largest),
        "overlapping_the_effusion": sum(bool(r.get("overlaps_effusion")) for r in called),
        "on_the_reported_side": sum(bool(r.get("on_reported_side")) for r in called),
    }


def main():
    from ctflow.eval.attributes import consolidation_regions

    args, pipe = generation_setup(50, __doc__.splitlines()[0], first_seed=SEED0)
    rows = []
    for i, (spec, _phantom, truth, text) in enumerate(heldout_reports(args.first_seed, args.n)):
        kinds = {f["type"] for f in truth["findings"]}
        if "consolidation" in kinds:
            continue
        out = generate(pipe, args, text, i, max_slices=200)  # as embedded_quality.py: the same volume
        regions = consolidation_regions(out.volumes[0])
        row = {"seed": spec.seed, "effusion_reported": "effusion" in kinds, "regions": regions}
        # the phantom's effusion (a phantom has at most one; its slices where it is rendered)
        fluid = next((f for f in truth["findings"] if f["type"] == "effusion" and "slice_range" in f), None)
        if fluid and regions:
            (first, last), (lo, hi) = regions[0]["slices"], fluid["slice_range"]
            row["effusion_slices"] = [lo, hi]
            row["overlaps_effusion"] = first <= hi and last >= lo
            right = regions[0]["right_share"]
            row["on_reported_side"] = {"right": right > 0.5, "left": right < 0.5}.get(fluid["side"], True)
        rows.append(row)
        big = regions[0] if regions else None
        print(f"{spec.seed}: effusion reported {row['effusion_reported']}, largest consolidation read {big}")
    result = {
        "n": args.n,
        "first_seed": args.first_seed,
        **generation_settings(args),
        "effusion_reported": summary([r for r in rows if r["effusion_reported"]]),
        "no_effusion_reported": summary([r for r in rows if not r["effusion_reported"]]),
        "rows": rows,
    }
    write_result(args.result or result_name("consolidation_probe", args.guidance), result)


if __name__ == "__main__":
    main()
