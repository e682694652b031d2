"""Phantom generation speed: 100 phantoms at 128x128 with 64-160 slices must take < 60 s.

Run: ``python benchmarks/phantom_speed.py [--n 100] [--size 128] [--result NAME]``

Writes ``benchmarks/results/phantom_speed.json``; another ``--n`` or ``--size`` needs ``--result NAME``
(``NAME.json``), so the stored figures stay.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, refuse_unnamed_variant  # noqa: E402

from ctflow.data.phantom import make_phantom, sample_spec  # noqa: E402

TARGET_S = 60.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument(
        "--result",
        default=None,
        help="name of the JSON in benchmarks/results (default: phantom_speed; needed with other options)",
    )
    args = ap.parse_args(argv)
    refuse_unnamed_variant(ap, args)

    specs = [sample_spec(seed=i, size=args.size, slice_range=(64, 160)) for i in range(args.n)]
    make_phantom(sample_spec(seed=10_000, size=args.size, num_slices=16))  # warm-up (imports, tables)
    per = []
    voxels = 0
    t0 = time.perf_counter()
    for spec in specs:
        t = time.perf_counter()
        vol, _ = make_phantom(spec)
        per.append(time.perf_counter() - t)
        voxels += vol.array.size
    seconds = time.perf_counter() - t0
    slices = [s.num_slices for s in specs]
    result = {
        "n": args.n,
        "size": args.size,
        "seconds": round(seconds, 3),
        "per_volume_s": round(seconds / args.n, 4),
        "max_volume_s": round(max(per), 4),
        "mean_slices": round(sum(slices) / len(slices), 1),
        "megavoxels_per_s": round(voxels / seconds / 1e6, 2),
        "target_s": TARGET_S,
        "passed": bool(seconds < TARGET_S),
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    out = RESULTS / f"{args.result or 'phantom_speed'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{args.n} phantoms {args.size}x{args.size}, {min(slices)}-{max(slices)} slices (mean {result['mean_slices']}): "
        f"{seconds:.1f} s total, {result['per_volume_s'] * 1000:.0f} ms/volume (max {result['max_volume_s'] * 1000:.0f} ms), "
        f"target < {TARGET_S:.0f} s -> {'PASS' if result['passed'] else 'FAIL'}"
    )
    print(f"wrote {out}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
