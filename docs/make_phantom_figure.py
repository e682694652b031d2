"""Regenerate docs/phantoms.png: tri-planar previews of three phantoms (seeds 1, 3, 7; 128 px).

    .venv/bin/python docs/make_phantom_figure.py
"""

from pathlib import Path

import imageio.v3 as iio
import numpy as np

from ctflow.data.phantom import make_phantom, sample_spec
from ctflow.data.preview import triplanar_image

rows = []
for seed in (1, 3, 7):
    volume, truth = make_phantom(sample_spec(seed, size=128))
    rows.append(triplanar_image(volume))
    print(seed, volume.shape, [f["type"] for f in truth["spec"]["findings"]] or ["normal"])
width = max(r.shape[1] for r in rows)
grid = np.concatenate([np.pad(r, ((0, 6), (0, width - r.shape[1]))) for r in rows])
iio.imwrite(Path(__file__).parent / "phantoms.png", grid)
