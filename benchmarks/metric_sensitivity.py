"""What the evaluation metrics detect, and what they miss: FID (3 planes), FVD, CLIP score and the
memorisation audit on held-out phantoms against changed copies of themselves.

``--n`` held-out phantoms (seeds 70000 on, 64 px, 40-120 slices) are one set; each change below is
applied to every volume and the changed set is scored against the unchanged one, so a score that
does not move did not see the change:

* Gaussian voxel noise (50, 150, 300 HU), an HU offset (+50, +100), an in-plane Gaussian blur
  (sigma 0.75, 1.5 px), a 2-voxel in-plane shift, every other slice dropped (half the count at
  twice the spacing), the field of view padded with air to 1.5x;
* the floor they must rise above: the set's first half against its second (two samples of one
  distribution), and the CLIP score of matched against shuffled reports;
* the memorisation audit of each changed copy against the originals: how many it flags.

    python benchmarks/metric_sensitivity.py [--n 16] [--result NAME]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import refuse_unnamed_variant, write_result  # noqa: E402

from ctflow.data.phantom import make_phantom, sample_spec  # noqa: E402
from ctflow.data.reports import phantom_report  # noqa: E402
from ctflow.eval.features import load_features  # noqa: E402
from ctflow.eval.metrics import clip_score, fid_planes, fvd, memorization  # noqa: E402
from ctflow.models.text import format_report  # noqa: E402

SEED0 = 70_000


def changes(rng: np.random.Generator) -> dict:
    """name -> function of one (S, H, W) HU array, giving the changed copy."""

    def noise(sigma):
        return lambda v: v + rng.normal(0.0, sigma, v.shape).astype(np.float32)

    def pad(v):
        h, w = v.shape[1:]
        ph, pw = h // 4, w // 4
        return np.pad(v, ((0, 0), (ph, ph), (pw, pw)), constant_values=-1000.0)

    return {
        "noise 50 HU": noise(50.0),
        "noise 150 HU": noise(150.0),
        "noise 300 HU": noise(300.0),
        "offset +50 HU": lambda v: v + 50.0,
        "offset +100 HU": lambda v: v + 100.0,
        "blur 0.75 px": lambda v: gaussian_filter(v, (0, 0.75, 0.75)),
        "blur 1.5 px": lambda v: gaussian_filter(v, (0, 1.5, 1.5)),
        "shift 2 px": lambda v: np.roll(v, 2, axis=2),
        "every other slice": lambda v: v[::2],
        "field of view 1.5x": pad,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16, help="held-out phantoms (at least 4)")
    p.add_argument("--result", default=None, help="result name (default: metric_sensitivity)")
    args = p.parse_args()
    refuse_unnamed_variant(p, args)
    if args.n < 4:
        p.error("--n must be at least 4 (the half-set floor needs 2 volumes a side)")
    torch.set_num_threads(2)
    model = load_features()
    volumes, reports = [], []
    for seed in range(SEED0, SEED0 + args.n):
        vol, gt = make_phantom(sample_spec(seed, size=64, slice_range=(40, 120)))
        rep = phantom_report(gt, seed)
        volumes.append(vol.hu())
        reports.append(format_report(rep["Findings_EN"], rep["Impressions_EN"], vol.num_slices))

    def scores(fake: list[np.ndarray]) -> dict:
        fid = fid_planes(volumes, fake, model=model)
        audit = memorization(fake, volumes, model=model)
        return {
            "fid": {k: round(v, 3) for k, v in fid.items()},
            "fvd": round(fvd(volumes, fake, model=model), 3),
            "copies_flagged": len(audit["flagged"]),
            "detail_correlation_min": min(audit["nearest_correlation"]),
        }

    half = args.n // 2
    floor = {
        "fid": {k: round(v, 3) for k, v in fid_planes(volumes[:half], volumes[half:], model=model).items()},
        "fvd": round(fvd(volumes[:half], volumes[half:], model=model), 3),
    }
    shuffled = reports[1:] + reports[:1]
    clip = {
        "matched": round(clip_score(volumes, reports, model=model), 2),
        "shuffled": round(clip_score(volumes, shuffled, model=model), 2),
    }
    rng = np.random.default_rng(0)
    rows = {"unchanged copy": scores([v.copy() for v in volumes])}
    for name, change in changes(rng).items():
        rows[name] = scores([change(v) for v in volumes])
        print(f"{name:20s} {rows[name]}")
    write_result(
        args.result or "metric_sensitivity",
        {
            "n": args.n,
            "seeds": [SEED0, SEED0 + args.n - 1],
            "size": 64,
            "half_set_floor": floor,
            "clip_score": clip,
            "changed_copies": rows,
        },
    )
    print("\n| change | FID axial | FID coronal | FID sagittal | FVD | copies flagged |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        f = r["fid"]
        print(
            f"| {name} | {f['axial']} | {f['coronal']} | {f['sagittal']} | {r['fvd']} |"
            f" {r['copies_flagged']}/{args.n} |"
        )
    f = floor["fid"]
    print(
        f"| first half vs second half | {f['axial']} | {f['coronal']} | {f['sagittal']} | {floor['fvd']} | |"
    )
    print(f"\nCLIP score: matched reports {clip['matched']}, shuffled {clip['shuffled']}")


if __name__ == "__main__":
    main()
