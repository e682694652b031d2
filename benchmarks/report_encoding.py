"""Report encoding in `ctflow encode`: one report at a time vs `ReportEncoder.encode_each`
(many at a time, grouped by length), on the texts a phantom latent cache stores: each report and
its shortened versions, with and without the meta line. Same texts, taking turns; also the largest
difference between the two encodings.

    python benchmarks/report_encoding.py [--n 24] [--variants 4]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import refuse_unnamed_variant, write_result  # noqa: E402

from ctflow.data.phantom import make_phantom, sample_spec  # noqa: E402
from ctflow.data.reports import phantom_report  # noqa: E402
from ctflow.models.text import ReportEncoder, format_report  # noqa: E402
from ctflow.train.latents import shortened_reports, strip_meta  # noqa: E402


def cache_texts(n: int, variants: int) -> list[str]:
    texts = []
    for seed in range(n):
        volume, truth = make_phantom(sample_spec(seed=seed, size=64, slice_range=(40, 120)))
        r = phantom_report(truth)
        report = format_report(r["Findings_EN"], r["Impressions_EN"], volume.num_slices, volume.spacing[0])
        for version in [report, *shortened_reports(report, variants, seed)]:
            texts += [version, strip_meta(version)]
    return texts


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=24, help="phantom reports")
    p.add_argument("--variants", type=int, default=4, help="shortened versions of each")
    p.add_argument("--result", default=None, help="result name (needed with other options than the defaults)")
    args = p.parse_args()
    refuse_unnamed_variant(p, args)
    torch.set_num_threads(2)
    encoder = ReportEncoder.from_pretrained()
    texts = cache_texts(args.n, args.variants)
    runs = {
        "one_at_a_time": lambda: [encoder([t]) for t in texts],
        "encode_each": lambda: encoder.encode_each(texts),
    }
    runs["encode_each"](), runs["one_at_a_time"]()  # warm up
    times = {name: [] for name in runs}
    outputs = {}
    for turn in range(4):
        for name in list(runs)[:: 1 if turn % 2 else -1]:
            start = time.perf_counter()
            outputs[name] = runs[name]()
            times[name].append(time.perf_counter() - start)
    alone = [(e.tokens[0], e.pooled[0]) for e in outputs["one_at_a_time"]]
    diff = max(
        max((a - b).abs().max().item() for a, b in zip(x, y, strict=True))
        for x, y in zip(alone, outputs["encode_each"], strict=True)
    )
    best = {name: min(t) for name, t in times.items()}
    write_result(
        args.result or "report_encoding",
        {
            "texts": len(texts),
            "one_at_a_time_s": round(best["one_at_a_time"], 3),
            "encode_each_s": round(best["encode_each"], 3),
            "ratio": round(best["encode_each"] / best["one_at_a_time"], 3),
            "max_abs_difference": diff,
        },
    )
