"""Reconstruction quality of the embedded slice VAE on held-out phantoms (64 px, seeds 90001-90005).

PSNR over the normalised [-1, 1] range (peak-to-peak 2) of whole volumes, plus how
a white end-of-scan slice reconstructs (why EOS is detected in latent space).

    python benchmarks/vae_quality.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from ctflow.data.phantom import make_phantom, sample_spec  # noqa: E402
from ctflow.models.vae import SliceVAE  # noqa: E402
from ctflow.pipeline import DEFAULT_MODEL  # noqa: E402
from ctflow.train.latents import prepare_slices  # noqa: E402

if __name__ == "__main__":
    torch.set_num_threads(2)
    vae = SliceVAE.load(DEFAULT_MODEL / "vae").eval()
    psnr = []
    for seed in range(90001, 90006):
        volume, _ = make_phantom(sample_spec(seed, size=64, slice_range=(40, 120)))
        x = prepare_slices(volume.hu(), 64)
        r = vae.decode_volume(vae.encode_volume(x))
        psnr.append(float(10 * np.log10(4.0 / ((r - x) ** 2).mean().item())))
    white = vae.decode_slices(vae.encode_slices(torch.ones(1, 1, 64, 64))).mean().item()
    write_result(
        "vae_quality",
        {
            "psnr_db_per_volume": [round(p, 2) for p in psnr],
            "psnr_db_mean": round(float(np.mean(psnr)), 2),
            "goal_db": 32.0,
            "passed": float(np.mean(psnr)) >= 32.0,
            "white_slice_decoded_mean": round(white, 3),
        },
    )
