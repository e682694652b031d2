"""A tiny latent cache written directly in the format `ctflow encode` produces."""

import json

import torch
from safetensors.torch import save_file

from ctflow.train.latents import report_keys


def make_fake_cache(
    folder,
    n=6,
    channels=4,
    size=8,
    text_dim=16,
    seed=0,
    shard_size=None,
    finding_slices=None,
    report_variants=0,
    finding_masks=False,
    reports=None,
):
    """``n`` volumes of 5, 8, 11, ... slices in shards of ``shard_size`` volumes (default: one shard);
    ``finding_slices``: {volume number: [{"type", "first", "last"}]} for the rows that have them;
    ``report_variants``: shortened reports per volume, variant j with 10 + j tokens (the full report's
    tokens: 4 to 6); ``finding_masks``: each volume's ``finding_mask`` covers the top-left quarter of the
    latent grid on the slices of its ``finding_slices`` (none without them); ``reports``: per volume, the
    report text and then its ``report_variants`` shortened versions (default ``r{i}``, ``r{i} short{j}``)."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"eos": torch.full((channels, size, size), 2.0)}, folder / "eos.safetensors")
    tensors, rows = [], []  # per volume
    for i in range(n):
        name = f"train_{i + 1}_a_1.nii.gz"
        s = 5 + 3 * i
        ramp = torch.linspace(-1, 1, s).view(1, s, 1, 1)
        t = {f"{name}.latents": (ramp + 0.1 * torch.randn(channels, s, size, size, generator=g)).half()}
        lengths = [4 + i % 3, *range(10, 10 + report_variants)]
        for key, length in zip(report_keys(report_variants), lengths, strict=True):
            for suffix in (key, key + "_nometa"):
                t[f"{name}.tokens{suffix}"] = torch.randn(length, text_dim, generator=g).half()
                t[f"{name}.pooled{suffix}"] = torch.randn(text_dim, generator=g)
        if finding_masks:
            mask = torch.zeros(s, size, size)
            for f in (finding_slices or {}).get(i, []):
                mask[f["first"] : f["last"] + 1, : size // 2, : size // 2] = 1
            t[f"{name}.finding_mask"] = mask.half()
        tensors.append(t)
        texts = reports[i] if reports else [f"r{i}", *(f"r{i} short{j}" for j in range(report_variants))]
        rows.append(
            {"name": name, "report": texts[0], "num_slices": s, "spacing": [2.0, 1.0, 1.0], "labels": None}
        )
        if report_variants:
            rows[-1]["short_reports"] = texts[1:]
        if finding_slices and i in finding_slices:
            rows[-1]["finding_slices"] = finding_slices[i]
    step = shard_size or n
    for k, start in enumerate(range(0, n, step)):
        save_file(
            {key: v for t in tensors[start : start + step] for key, v in t.items()},
            folder / f"shard_{k:05d}.safetensors",
        )
        (folder / f"shard_{k:05d}.json").write_text(json.dumps(rows[start : start + step]))
    index = {
        "image_size": size * 4,
        "latent_shape": [channels, size, size],
        "text_dim": text_dim,
        "report_variants": report_variants,
        "finding_masks": finding_masks,
        "num_volumes": n,
        "problems": [],
        "volumes": rows,
    }
    (folder / "index.json").write_text(json.dumps(index))
    return folder


TINY_TRANSFORMER = {
    "preset": "tiny",
    "hidden_size": 32,
    "depth": 2,
    "num_heads": 2,
    "chunk_slices": 4,
    "patch_size": [2, 2, 2],
    "max_chunks": 8,
}
