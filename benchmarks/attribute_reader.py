"""Attribute reader accuracy: 200 unseen phantoms (seeds 10000-10199, 64 px, 40-120 slices).

Target: >= 95 % per attribute. Run:
``python benchmarks/attribute_reader.py [--n 200] [--size 64] [--result NAME]``

Writes ``benchmarks/results/attribute_reader.json``; another ``--n`` or ``--size`` needs ``--result NAME``
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
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, refuse_unnamed_variant  # noqa: E402

from ctflow.data.phantom import make_phantom, sample_spec  # noqa: E402
from ctflow.eval.attributes import (  # noqa: E402
    ATTRIBUTE_KEYS,
    attribute_accuracy,
    attributes_from_ground_truth,
    read_attributes,
)

TARGET = 0.95
SEED0 = 10_000


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument(
        "--result",
        default=None,
        help="name of the JSON in benchmarks/results (default: attribute_reader; needed with other options)",
    )
    args = ap.parse_args(argv)
    refuse_unnamed_variant(ap, args)
    torch.set_num_threads(1)

    preds, truths, errors = [], [], []
    nodule_sizes: Counter = Counter()
    nodule_hits: Counter = Counter()
    read_s = 0.0
    for seed in range(SEED0, SEED0 + args.n):
        vol, gt = make_phantom(sample_spec(seed, size=args.size, slice_range=(40, 120)))
        t = time.perf_counter()
        pred = read_attributes(vol)
        read_s += time.perf_counter() - t
        truth = attributes_from_ground_truth(gt)
        preds.append(pred)
        truths.append(truth)
        wrong = [k for k in ATTRIBUTE_KEYS if pred[k] != truth[k]]
        if wrong:
            errors.append({"seed": seed, "wrong": {k: [pred[k], truth[k]] for k in wrong}})
        for f in gt["findings"]:
            if f["type"] == "nodule" and f.get("visible"):
                band = "6-10 mm" if f["size_mm"] <= 10 else "11-17 mm" if f["size_mm"] <= 17 else "18-25 mm"
                nodule_sizes[band] += 1
                nodule_hits[band] += int(pred["nodule"])
    acc = attribute_accuracy(preds, truths)
    result = {
        "n": args.n,
        "size": args.size,
        "seeds": [SEED0, SEED0 + args.n - 1],
        "accuracy": {k: round(v, 4) for k, v in acc.items()},
        "target": TARGET,
        "passed": {k: bool(v >= TARGET) for k, v in acc.items()},
        "prevalence": {
            "effusion": round(sum(t["effusion"] != "none" for t in truths) / args.n, 3),
            **{k: round(sum(t[k] for t in truths) / args.n, 3) for k in ATTRIBUTE_KEYS if k != "effusion"},
        },
        "nodule_sensitivity_by_size": {
            b: f"{nodule_hits[b]}/{nodule_sizes[b]}" for b in ("6-10 mm", "11-17 mm", "18-25 mm")
        },
        "read_s_per_volume": round(read_s / args.n, 3),
        "errors": errors,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    out = RESULTS / f"{args.result or 'attribute_reader'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.n} phantoms at {args.size} px: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    print(f"nodule sensitivity by size: {result['nodule_sensitivity_by_size']}; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
