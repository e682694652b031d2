"""Reconstruction quality of the embedded slice VAE on held-out phantoms (64 px, seeds 90001-90005).

PSNR in HU over the [-1000, 1000] range (peak-to-peak 2000 HU; the same number as over
a linear [-1, 1] normalisation, whatever HU window the VAE uses), the mean absolute HU
error on soft tissue (-200..200 HU in the phantom: fat, fluid, muscle, unenhanced blood),
plus how a white end-of-scan slice reconstructs (why EOS is detected in latent space).

    python benchmarks/vae_quality.py [--model DIR --result NAME]

Writes ``vae_quality.json``; with ``--model`` pass ``--result NAME`` too (``NAME.json``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import refuse_unnamed_variant, write_result  # noqa: E402

from ctflow.data.phantom import make_phantom, sample_spec  # noqa: E402
from ctflow.models.vae import SliceVAE  # noqa: E402
from ctflow.pipeline import DEFAULT_MODEL  # noqa: E402
from ctflow.train.latents import prepare_slices  # noqa: E402

if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="pipeline folder (default: embedded)")
    p.add_argument(
        "--result",
        default=None,
        help="name of the JSON written to benchmarks/results (default: vae_quality; needed with --model)",
    )
    args = p.parse_args()
    refuse_unnamed_variant(p, args)
    torch.set_num_threads(2)
    vae = SliceVAE.load(args.model / "vae").eval()
    psnr, soft_mae = [], []
    for seed in range(90001, 90006):
        volume, _ = make_phantom(sample_spec(seed, size=64, slice_range=(40, 120)))
        hu = volume.hu().clip(-1000, 1000)
        r = vae.denormalize(vae.decode_volume(vae.encode_volume(prepare_slices(hu, 64, vae.hu_window))))
        err = r.numpy() - hu
        psnr.append(float(10 * np.log10(2000.0**2 / (err**2).mean())))
        soft_mae.append(float(np.abs(err[(hu > -200) & (hu < 200)]).mean()))
    white = vae.decode_slices(vae.encode_slices(torch.ones(1, 1, 64, 64))).mean().item()
    write_result(
        args.result or "vae_quality",
        {
            "psnr_db_per_volume": [round(p, 2) for p in psnr],
            "psnr_db_mean": round(float(np.mean(psnr)), 2),
            "goal_db": 32.0,
            "passed": float(np.mean(psnr)) >= 32.0,
            "soft_tissue_mae_hu_per_volume": [round(e, 1) for e in soft_mae],
            "soft_tissue_mae_hu_mean": round(float(np.mean(soft_mae)), 1),
            "hu_window": list(vae.hu_window),
            "model": "embedded" if args.model == DEFAULT_MODEL else str(args.model),
            "white_slice_decoded_mean": round(white, 3),
        },
    )
