import pytest
import torch

from ctflow.data.ctrate import CTRateDataset
from ctflow.errors import CTFlowError
from ctflow.models.text import ReportEncoder
from ctflow.models.vae import SliceVAE
from ctflow.pipeline import DEFAULT_MODEL
from ctflow.train.latents import LatentCache, encode_dataset, strip_meta


def test_strip_meta_removes_only_the_leading_meta_line():
    assert strip_meta("Volume: 40 slices, 2.5 mm spacing. Findings: clear.") == "Findings: clear."
    assert strip_meta("Findings: clear.") == "Findings: clear."


def test_encode_writes_a_resumable_cache_with_both_report_variants(tmp_path, run_cli):
    assert (
        run_cli(
            "phantoms",
            "--n",
            2,
            "--out",
            tmp_path / "ph",
            "--size",
            64,
            "--min-slices",
            10,
            "--max-slices",
            12,
        ).code
        == 0
    )
    ds = CTRateDataset.open(tmp_path / "ph")
    vae, text = SliceVAE.load(DEFAULT_MODEL / "vae"), ReportEncoder.from_pretrained()
    encode_dataset(ds, vae, text, tmp_path / "lat", image_size=64, shard_size=1)
    cache = LatentCache(tmp_path / "lat")
    v = cache.volumes[0]
    assert len(cache) == 2 and v.latents.shape == (8, v.num_slices, 16, 16)
    assert v.tokens.shape[0] > v.tokens_nometa.shape[0]  # the meta line adds tokens
    torch.testing.assert_close(v.pooled, text([ds.load(0).report]).pooled[0])
    assert cache.eos.shape == (8, 16, 16)
    with pytest.raises(CTFlowError, match="--overwrite"):
        encode_dataset(ds, vae, text, tmp_path / "lat", image_size=64)
    (tmp_path / "lat" / "index.json").unlink()  # as if killed before the end: finished shards are kept
    stamp = (tmp_path / "lat" / "shard_00000.safetensors").stat().st_mtime_ns
    encode_dataset(ds, vae, text, tmp_path / "lat", image_size=64, shard_size=1)
    assert (tmp_path / "lat" / "shard_00000.safetensors").stat().st_mtime_ns == stamp
    assert len(LatentCache(tmp_path / "lat")) == 2
