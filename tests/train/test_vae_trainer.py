"""The slice-VAE trainer end to end on a few tiny phantoms: outputs, resume, HU window."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from ctflow.errors import CTFlowError, CTFlowWarning
from ctflow.train.config import VAETrainConfig
from ctflow.train.vae_trainer import load_slices, train_vae

SOFT = (-1000.0, -150.0, 150.0, 1000.0)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    import io

    from ctflow.cli import console, main

    out = tmp_path_factory.mktemp("vae") / "ph"
    args = [
        "phantoms",
        "--n",
        "2",
        "--out",
        str(out),
        "--size",
        "32",
        "--min-slices",
        "6",
        "--max-slices",
        "8",
    ]
    old, console.file = console.file, io.StringIO()  # pytest's capture file is per test
    try:
        assert main(args) == 0
    finally:
        console.file = old
    return out


def _config(**kw) -> VAETrainConfig:
    base = dict(
        vae={"block_out_channels": [8, 8, 16], "norm_num_groups": 4},
        image_size=32,
        hu_window=SOFT,
        steps=4,
        batch_size=2,
        disc_start=2,  # the adversarial term runs in the last two steps
        log_every=2,
        checkpoint_every=2,
    )
    return VAETrainConfig(**{**base, **kw})


def test_slices_are_normalised_with_the_configured_window(phantoms):
    from ctflow.data.ctrate import CTRateDataset
    from ctflow.data.hu import normalize_hu

    x = load_slices(phantoms, 32, window=SOFT)
    hu = CTRateDataset.open(phantoms).load(0).volume.hu()
    first = torch.from_numpy(normalize_hu(hu, SOFT)).float()
    torch.testing.assert_close(x[: len(hu)].float(), first, atol=2e-3, rtol=0)  # float16, same size
    assert not torch.allclose(load_slices(phantoms, 32)[: len(hu)].float(), first, atol=2e-3)


def test_training_writes_a_vae_with_its_window_and_latent_stats_and_resumes_exactly(phantoms, tmp_path):
    from ctflow.models.vae import SliceVAE

    assert train_vae(phantoms, _config(), tmp_path / "a", progress=False) == tmp_path / "a" / "vae"
    vae = SliceVAE.load(tmp_path / "a" / "vae")
    assert vae.hu_window == SOFT
    # the slice size it trained at, which encode resizes to (the tiny preset's own is 64)
    assert vae.vae.config.sample_size == 32
    assert vae.scaling_factor != 1.0 and vae.shift_factor != 0.0  # set from latent statistics
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4] and "disc_loss" in log[-1]
    # the rate each logged step took and its time (the log had neither)
    from ctflow.train.utils import lr_lambda

    cfg = _config()
    rate = lr_lambda(cfg.optim.warmup_steps, cfg.steps, cfg.optim.min_lr_ratio)
    assert [r["lr"] for r in log] == pytest.approx([cfg.optim.lr * rate(1), cfg.optim.lr * rate(3)])
    assert all(r["sec_per_step"] > 0 for r in log)
    with pytest.raises(CTFlowError, match="--resume"):
        train_vae(phantoms, _config(), tmp_path / "a", progress=False)
    # a resume of the finished run rewrites nothing: its latent statistics came from its own data
    written = (tmp_path / "a" / "vae" / "config.json").read_bytes()
    assert train_vae(phantoms, _config(), tmp_path / "a", progress=False, resume=True) is None
    assert (tmp_path / "a" / "vae" / "config.json").read_bytes() == written
    # stopped after 2 steps, then resumed: the same weights as the uninterrupted run
    train_vae(phantoms, _config(), tmp_path / "b", progress=False, stop_at=2)
    assert not (tmp_path / "b" / "vae").exists()
    train_vae(phantoms, _config(), tmp_path / "b", progress=False, resume=True)
    resumed = SliceVAE.load(tmp_path / "b" / "vae")
    for (k, a), b in zip(vae.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=k)
    # a resume with other settings goes on, naming them
    train_vae(phantoms, _config(), tmp_path / "c", progress=False, stop_at=2)
    with pytest.warns(CTFlowWarning, match=r"resuming from step 2 with settings other than the checkpoint's: "
                      r"batch_size 2 -> 3"):  # fmt: skip
        train_vae(phantoms, _config(batch_size=3), tmp_path / "c", progress=False, resume=True)


def test_a_bad_window_in_the_config_is_refused():
    with pytest.raises(CTFlowError, match="increasing"):
        VAETrainConfig(hu_window=(100.0, -100.0))
    with pytest.raises(CTFlowError, match="vae.sample_size is 32 but image_size is 64"):
        VAETrainConfig(vae={"sample_size": 32})


def test_a_named_device_trains_the_same_weights(phantoms, tmp_path):
    """The device path (models moved before their optimizers, batches moved after the CPU draw) leaves
    the CPU run's numbers as they were, so the recipe's VAE is still reproduced."""
    from ctflow.models.vae import SliceVAE

    train_vae(phantoms, _config(), tmp_path / "a", progress=False)
    train_vae(phantoms, _config(), tmp_path / "b", progress=False, device=torch.device("cpu"))
    a, b = (SliceVAE.load(tmp_path / n / "vae").state_dict() for n in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _generator_weights(folder):
    from ctflow.models.vae import SliceVAE

    return SliceVAE.load(folder).state_dict()


def test_training_starts_from_init_weights_a_folder_or_a_flux_file(phantoms, tmp_path, run_cli, monkeypatch):
    """With the learning rate at 0 the trained VAE is the one it started from: a diffusers folder, or
    the same weights in FLUX's original single-file layout (read with the preset's layout)."""
    from safetensors.torch import save_file

    from ctflow.models.vae import VAE_PRESETS, SliceVAE, diffusers_to_flux_state_dict
    from ctflow.train.config import OptimConfig

    flux = {"block_out_channels": [8, 16, 16, 16], "norm_num_groups": 4}
    start = SliceVAE.from_preset("flux", **flux)
    start.save(tmp_path / "start")
    save_file(diffusers_to_flux_state_dict(start.vae.state_dict()), tmp_path / "ae.safetensors")
    with pytest.warns(CTFlowWarning, match="optim.lr is 0"):  # frozen on purpose: the weights are compared
        frozen = dict(preset="flux", vae=flux, optim=OptimConfig(lr=0.0, warmup_steps=0, ema_decay=0.0))
    want = start.state_dict()
    for name, init in (("folder", tmp_path / "start"), ("file", tmp_path / "ae.safetensors")):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            train_vae(phantoms, _config(**frozen, init=str(init)), tmp_path / name, progress=False)
        # a folder's own config.json sets the shape, and the YAML's vae keys are said to be unused
        assert any("preset and vae keys are not used" in str(w.message) for w in seen) == (name == "folder")
        got = _generator_weights(tmp_path / name / "vae")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name
    # a folder of the config's own preset's shape, with no vae keys: nothing goes unused, no warning
    import ctflow.models.vae

    monkeypatch.setitem(ctflow.models.vae.VAE_PRESETS, "flux", {**VAE_PRESETS["flux"], **flux})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_vae(phantoms, _config(**{**frozen, "vae": {}}, init=str(tmp_path / "start")), tmp_path / "same")
    # a random start is not that one, and the CLI takes --init
    train_vae(phantoms, _config(**frozen), tmp_path / "random", progress=False)
    assert not torch.equal(
        _generator_weights(tmp_path / "random" / "vae")["vae.encoder.conv_in.weight"],
        want["vae.encoder.conv_in.weight"],
    )
    r = run_cli("train-vae", "--data", phantoms, "--out", tmp_path / "cli", "--init", tmp_path / "missing")
    assert r.code != 0 and "--init" in r.err and not (tmp_path / "cli").exists()
    # FLUX's diffusers file (vae/diffusion_pytorch_model.safetensors) alone: name its folder, before
    # the data set (here none) is read
    start.vae.save_pretrained(tmp_path / "diffusers", safe_serialization=True)
    single = tmp_path / "diffusers" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(CTFlowError, match="holds a diffusers VAE's weights .* pass the folder"):
        train_vae(tmp_path / "no-data", _config(**frozen, init=str(single)), tmp_path / "x", progress=False)


def test_slices_are_capped_per_volume_and_in_volumes_and_skipped_volumes_named(phantoms, tmp_path):
    import shutil

    every = load_slices(phantoms, 32)
    assert len(load_slices(phantoms, 32, max_volumes=1)) < len(every)
    assert len(load_slices(phantoms, 32, slices_per_volume=3)) == 2 * 3
    broken = shutil.copytree(phantoms, tmp_path / "ph")
    next((broken / "dataset").rglob("*.nii.gz")).write_bytes(b"broken")
    lines = []
    assert len(load_slices(broken, 32, log=lines.append)) < len(every)
    assert len(lines) == 1 and lines[0].startswith("skipped train_1_a_1.nii.gz")
    with pytest.raises(CTFlowError, match="slices_per_volume must be 1 or more"):
        VAETrainConfig(slices_per_volume=0)


def test_a_loss_that_is_not_finite_stops_the_run_before_it_is_logged_or_saved(
    phantoms, tmp_path, monkeypatch
):
    from ctflow.train.vae_loss import AVAELoss

    real = AVAELoss.generator_loss

    def nan_from_step_3(self, *args, global_step, **kwargs):
        loss, logs = real(self, *args, global_step=global_step, **kwargs)
        return (loss * float("nan") if global_step >= 2 else loss), logs

    monkeypatch.setattr(AVAELoss, "generator_loss", nan_from_step_3)
    with pytest.raises(CTFlowError, match="the loss became nan at step 3; lower optim.lr, or --resume"):
        train_vae(phantoms, _config(), tmp_path / "run", progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2]  # valid JSON, no NaN line


def test_slice_set_indexes_like_the_concatenated_tensor():
    from ctflow.train.vae_trainer import SliceSet

    parts = [torch.randn(n, 4, 4).half() for n in (3, 1, 5)]
    whole, held = torch.cat(parts), SliceSet(parts)
    assert len(held) == len(whole) == 9
    idx = torch.tensor([8, 0, 3, 2, 3, 4, 7])
    assert torch.equal(held[idx], whole[idx])
    assert torch.equal(held[2:6], whole[2:6]) and torch.equal(held[:], whole)
    assert held.parts[0].data_ptr() == parts[0].data_ptr()  # kept, not copied


def test_an_image_size_the_vae_cannot_take_is_refused_before_anything_is_written(phantoms, tmp_path):
    """It was found at the first step, after config.json was written, so the corrected rerun was refused."""
    with pytest.raises(CTFlowError, match="image_size 30 must be a multiple of 4"):
        train_vae(phantoms, _config(image_size=30), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
