"""Train the shipped evaluation networks and calibrate the attribute reader on fresh phantoms.

Run::

    python -m ctflow.eval.train_features --out src/ctflow/eval/weights

It writes ``attribute_reader.safetensors`` (lung-cavity atlases + nodule rule,
see :func:`ctflow.eval.attributes.calibrate_reader`) and ``features.safetensors``
(:class:`ctflow.eval.features.Features`) plus ``features.json`` (the recipe and
final training losses). Everything is seeded: the same command gives the same
files. It uses one CPU thread and takes about 6 minutes.

The encoders learn by supervised prediction on 64-px phantoms (40-120 slices):
the 3D encoder predicts the five findings, contrast and the scanned extent and,
through two linear projections, matches each volume to its report's frozen
MiniLM embedding (symmetric InfoNCE); the 2D encoder predicts the plane, the
slice position, contrast, emphysema and the slice's lung fraction. Inputs are
randomly corrupted (noise, HU offset, slice blur) and both encoders also predict
the corruption strengths, which makes FID/FVD respond to image quality.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ctflow.data.phantom import make_phantom, sample_spec
from ctflow.data.reports import phantom_report
from ctflow.eval.attributes import (
    EFFUSION_VALUES,
    WEIGHTS_PATH,
    attributes_from_ground_truth,
    calibrate_reader,
)
from ctflow.eval.features import (
    FEATURES_FILE,
    PLANES,
    Features,
    plane_slices,
    save_features,
    text_pooled,
    volume_tensor,
)
from ctflow.models.text import format_report

CALIBRATION_SEEDS = range(20_000, 20_200)
TRAIN_SEED0 = 40_000
SLICES_PER_PLANE = 8


def phantom_text(gt: dict, seed: int, with_meta: bool) -> str:
    """The conditioning text of a phantom (as the CT-RATE reader builds it), with or without the meta line."""
    rep = phantom_report(gt, seed)
    n, sp = (gt["num_slices"], gt["spacing"][0]) if with_meta else (None, None)
    return format_report(rep["Findings_EN"], rep["Impressions_EN"], n, sp)


def volume_targets(gt: dict) -> dict[str, float]:
    a = attributes_from_ground_truth(gt)
    return {
        "effusion": float(EFFUSION_VALUES.index(a["effusion"])),
        "cardiomegaly": float(a["cardiomegaly"]),
        "nodule": float(a["nodule"]),
        "emphysema": float(a["emphysema"]),
        "consolidation": float(a["consolidation"]),
        "contrast": float(gt["contrast"]),
        "extent": float(np.log(gt["num_slices"] * gt["spacing"][0] / 300.0)),
    }


def build_data(n: int, log=print) -> dict[str, torch.Tensor]:
    """Render ``n`` phantoms and precompute network inputs and targets."""
    vols, vt, slices, st, texts = [], [], [], [], []
    for i in range(n):
        seed = TRAIN_SEED0 + i
        vol, gt = make_phantom(sample_spec(seed, size=64, slice_range=(40, 120)))
        vols.append(volume_tensor(vol).half())
        vt.append(volume_targets(gt))
        texts += [phantom_text(gt, seed, True), phantom_text(gt, seed, False)]
        hu = vol.hu()
        body = hu > -500
        for p, plane in enumerate(PLANES):
            x = plane_slices(vol, plane, SLICES_PER_PLANE, margin=0.05)  # (8, 1, 64, 64)
            length = hu.shape[p]
            pos = np.linspace(0.05, 0.95, SLICES_PER_PLANE)
            idx = np.rint(pos * (length - 1)).astype(int)
            for j in range(SLICES_PER_PLANE):
                sl = np.take(hu, idx[j], axis=p)
                b = np.take(body, idx[j], axis=p)
                lung = float(((sl < -500) & b).sum() / max(b.sum(), 1)) if b.any() else 0.0
                slices.append(x[j].half())
                st.append([p, pos[j], float(gt["contrast"]), vt[-1]["emphysema"], lung])
        if (i + 1) % 100 == 0:
            log(f"phantoms: {i + 1}/{n}")
    log("encoding reports with MiniLM")
    pooled = text_pooled(texts).view(n, 2, -1)
    return {
        "volumes": torch.stack(vols),  # (n, 1, 32, 64, 64) fp16
        "volume_targets": torch.tensor([[t[k] for k in t] for t in vt], dtype=torch.float32),
        "slices": torch.stack(slices),  # (n * 24, 1, 64, 64) fp16
        "slice_targets": torch.tensor(st, dtype=torch.float32),
        "text": pooled.float(),  # (n, 2, 384)
    }


def corrupt(x: torch.Tensor, g: torch.Generator, blur: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Random image-quality corruptions of a batch in [0, 1] units (1 unit = 2000 HU).

    Half the samples get Gaussian noise (0-120 HU), 30 % an HU offset (+-120 HU) and,
    for slices, 30 % a Gaussian blur (0.5-1.5 px). Returns the batch and the targets
    ``(B, 3)``: noise / 100 HU, offset / 100 HU, blur sigma in pixels.
    """
    b = x.shape[0]
    noise = torch.where(torch.rand(b, generator=g) < 0.5, torch.rand(b, generator=g) * 120.0, torch.zeros(b))
    offset = torch.where(
        torch.rand(b, generator=g) < 0.3, (torch.rand(b, generator=g) * 2 - 1) * 120.0, torch.zeros(b)
    )
    sigma = torch.where(torch.rand(b, generator=g) < 0.3, 0.5 + torch.rand(b, generator=g), torch.zeros(b))
    shape = (b,) + (1,) * (x.dim() - 1)
    if blur:
        out = []
        for i in range(b):
            s = float(sigma[i])
            if s > 0:
                r = torch.arange(-3, 4, dtype=torch.float32)
                k = torch.exp(-0.5 * (r / s) ** 2)
                k = k / k.sum()
                xi = F.conv2d(F.pad(x[i : i + 1], (3, 3, 0, 0), mode="replicate"), k.view(1, 1, 1, 7))
                xi = F.conv2d(F.pad(xi, (0, 0, 3, 3), mode="replicate"), k.view(1, 1, 7, 1))
                out.append(xi)
            else:
                out.append(x[i : i + 1])
        x = torch.cat(out)
    else:
        sigma = torch.zeros(b)
    x = x + torch.randn(x.shape, generator=g) * (noise / 2000.0).view(shape) + (offset / 2000.0).view(shape)
    return x.clamp(0.0, 1.0), torch.stack([noise / 100.0, offset / 100.0, sigma], 1)


def volume_loss(model: Features, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, q: torch.Tensor):
    feats = model.volume.features(x)
    h = model.volume.heads
    loss = F.cross_entropy(h["effusion"](feats), t[:, 0].long())
    for j, name in enumerate(("cardiomegaly", "nodule", "emphysema", "consolidation", "contrast"), start=1):
        loss = loss + F.binary_cross_entropy_with_logits(h[name](feats)[:, 0], t[:, j])
    loss = loss + F.mse_loss(h["extent"](feats)[:, 0], t[:, 6]) * 4.0
    loss = loss + F.mse_loss(h["noise"](feats)[:, 0], q[:, 0]) + F.mse_loss(h["offset"](feats)[:, 0], q[:, 1])
    img = F.normalize(model.clip.image_proj(feats), dim=-1)
    txt = model.clip.embed_text(text)
    logits = img @ txt.t() * model.clip.logit_scale.exp().clamp(max=100.0)
    labels = torch.arange(len(x))
    clip = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    return loss, clip


def slice_loss(model: Features, x: torch.Tensor, t: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    feats = model.slice.features(x)
    h = model.slice.heads
    loss = F.cross_entropy(h["plane"](feats), t[:, 0].long())
    loss = loss + F.mse_loss(torch.sigmoid(h["position"](feats)[:, 0]), t[:, 1]) * 10.0
    loss = loss + F.binary_cross_entropy_with_logits(h["contrast"](feats)[:, 0], t[:, 2])
    loss = loss + F.binary_cross_entropy_with_logits(h["emphysema"](feats)[:, 0], t[:, 3])
    loss = loss + F.mse_loss(torch.sigmoid(h["lung_fraction"](feats)[:, 0]), t[:, 4]) * 10.0
    for j, name in enumerate(("noise", "offset", "blur")):
        loss = loss + F.mse_loss(h[name](feats)[:, 0], q[:, j])
    return loss


def train(data: dict, steps: int, seed: int = 0, log=print) -> tuple[Features, dict]:
    torch.manual_seed(seed)
    model = Features()
    flat = data["text"].flatten(0, 1)
    model.clip.text_mean.copy_(flat.mean(0))
    model.clip.text_std.copy_(flat.std(0).clamp(min=1e-4))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    n, ns = len(data["volumes"]), len(data["slices"])
    hist: dict[str, list[float]] = {"volume": [], "clip": [], "slice": []}
    start = time.perf_counter()
    for step in range(steps):
        vi = torch.randperm(n, generator=g)[:16]
        si = torch.randint(ns, (32,), generator=g)
        variant = torch.randint(2, (len(vi),), generator=g)
        x, qv = corrupt(data["volumes"][vi].float(), g, blur=False)
        vl, cl = volume_loss(model, x, data["volume_targets"][vi], data["text"][vi, variant], qv)
        xs, qs = corrupt(data["slices"][si].float(), g, blur=True)
        sl = slice_loss(model, xs, data["slice_targets"][si], qs)
        loss = vl + cl + sl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()
        sched.step()
        for k, v in (("volume", vl), ("clip", cl), ("slice", sl)):
            hist[k].append(float(v.detach()))
        if (step + 1) % 50 == 0 or step == 0:
            log(
                f"step {step + 1}/{steps}  volume {np.mean(hist['volume'][-50:]):.3f}  clip "
                f"{np.mean(hist['clip'][-50:]):.3f}  slice {np.mean(hist['slice'][-50:]):.3f}  "
                f"({time.perf_counter() - start:.0f} s)"
            )
    summary = {k: round(float(np.mean(v[-50:])), 4) for k, v in hist.items()}
    return model.eval(), summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(WEIGHTS_PATH.parent), help="output folder for the weights")
    ap.add_argument("--phantoms", type=int, default=320, help="training phantoms for the networks")
    ap.add_argument("--steps", type=int, default=450, help="optimizer steps")
    ap.add_argument("--skip-reader", action="store_true", help="keep the existing attribute reader file")
    ap.add_argument("--skip-features", action="store_true", help="only calibrate the attribute reader")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not args.skip_reader:
        from safetensors.numpy import save_file

        from ctflow.files import atomic_path

        params = calibrate_reader(CALIBRATION_SEEDS, log=print)
        with atomic_path(out / WEIGHTS_PATH.name, overwrite=True) as tmp:
            save_file(
                params,
                str(tmp),
                metadata={"seeds": f"{CALIBRATION_SEEDS.start}-{CALIBRATION_SEEDS.stop - 1}"},
            )
        print(f"attribute reader calibrated ({time.perf_counter() - t0:.0f} s)")
        (out / WEIGHTS_PATH.name).chmod(0o644)
    if args.skip_features:
        return 0
    data = build_data(args.phantoms)
    print(f"data ready ({time.perf_counter() - t0:.0f} s)")
    model, summary = train(data, args.steps)
    save_features(model, out / FEATURES_FILE, metadata={"recipe": "ctflow.eval.train_features"})
    recipe = {
        "phantoms": args.phantoms,
        "train_seeds": [TRAIN_SEED0, TRAIN_SEED0 + args.phantoms - 1],
        "steps": args.steps,
        "final_losses": summary,
        "seconds": round(time.perf_counter() - t0, 1),
        "torch": torch.__version__,
    }
    from ctflow.files import write_text_atomic

    write_text_atomic(out / "features.json", json.dumps(recipe, indent=1) + "\n", overwrite=True)
    for p in out.glob("*"):
        if p.is_file():
            p.chmod(0o644)  # shipped package data (atomic writes create 0600 files)
    print(f"wrote {out / FEATURES_FILE} in {recipe['seconds']} s: {summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
