"""PNG plots of the benchmark results for docs/results.md (no plotting library: Pillow, which imageio needs).

Reads ``benchmarks/results/generation.json`` (``--parts depth``) and ``ablation.json`` and writes
``benchmarks/results/depth.png`` (peak RSS and time per slice vs depth, AR chunks vs whole volume)
and ``steps.png`` (FVD vs model evaluations per chunk, Euler and Heun, on the shipped model).

    python benchmarks/plots.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS  # noqa: E402

W, H, M = 420, 300, 50  # panel size and margin (px)
COLORS = {"ar": (31, 119, 180), "whole": (214, 39, 40), "euler": (31, 119, 180), "heun": (44, 160, 44)}


def panel(
    title: str, xlabel: str, series: dict[str, list[tuple[float, float]]], ylim0: bool = True
) -> Image.Image:
    """One line chart: ``series`` name -> [(x, y)], x on a log2 axis."""
    import math

    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    xs = [math.log2(x) for s in series.values() for x, _ in s]
    ys = [y for s in series.values() for _, y in s]
    x0, x1 = min(xs), max(xs)
    y0, y1 = (0.0 if ylim0 else min(ys)), max(ys) * 1.1

    def at(x, y):
        px = M + (math.log2(x) - x0) / max(x1 - x0, 1e-9) * (W - 2 * M)
        py = H - M - (y - y0) / max(y1 - y0, 1e-9) * (H - 2 * M)
        return px, py

    d.rectangle([M, M, W - M, H - M], outline="black")
    d.text((M, 15), title, fill="black")
    d.text((W // 2 - 30, H - 20), xlabel, fill="black")
    last = -1e9
    for x in sorted({x for s in series.values() for x, _ in s}):
        px, _ = at(x, y0)
        if px - last > 20:  # skip labels that would overlap
            d.text((px - 8, H - M + 5), f"{x:g}", fill="black")
            last = px
    for frac in (0, 0.5, 1):
        y = y0 + frac * (y1 - y0)
        _, py = at(2**x0, y)
        d.text((5, py - 5), f"{y:.3g}", fill="black")
    for i, (name, pts) in enumerate(series.items()):
        color = COLORS.get(name.split()[0], (0, 0, 0))
        d.line([at(x, y) for x, y in sorted(pts)], fill=color, width=2)
        for x, y in pts:
            px, py = at(x, y)
            d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
        d.text((W - M - 110, M + 8 + 14 * i), name, fill=color)
    return img


def row(*panels: Image.Image) -> Image.Image:
    out = Image.new("RGB", (W * len(panels), H), "white")
    for i, p in enumerate(panels):
        out.paste(p, (i * W, 0))
    return out


def main() -> list[Path]:
    written = []
    gen = RESULTS / "generation.json"
    if gen.exists() and "depth" in json.loads(gen.read_text()):
        modes = json.loads(gen.read_text())["depth"]["modes"]
        names = {"ar": "ar (chunks)", "whole": "whole volume"}
        mem, time = {}, {}
        for mode in ("ar", "whole"):
            ok = {int(k): v for k, v in modes[mode].items() if "failed" not in v}
            mem[names[mode]] = [(k, v["peak_rss_mb"]) for k, v in ok.items()]
            time[names[mode]] = [(k, v["seconds_per_slice"] * 1000) for k, v in ok.items()]
        img = row(panel("peak RSS (MB)", "slices", mem), panel("ms per slice", "slices", time))
        img.save(RESULTS / "depth.png")
        written.append(RESULTS / "depth.png")
    abl = RESULTS / "ablation.json"
    if abl.exists():
        rows = [r for r in json.loads(abl.read_text())["rows"] if r["kind"] == "sampler"]
        fvd = {}
        for r in rows:
            fvd.setdefault(r["variant"].split("-")[0], []).append((r["nfe"], r["fvd"]))
        img = row(panel("FVD (phantom features), shipped model", "model evaluations per chunk", fvd, False))
        img.save(RESULTS / "steps.png")
        written.append(RESULTS / "steps.png")
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args()
    main()
