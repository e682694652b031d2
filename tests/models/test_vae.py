"""The slice VAE: presets, slice/volume encoding, and offline weight loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ctflow.errors import CTFlowError
from ctflow.models.vae import (
    VAE_PRESETS,
    SliceVAE,
    build_vae,
    diffusers_to_flux_state_dict,
    flux_to_diffusers_state_dict,
    load_vae,
)

# The FLUX structure (4 blocks, 16 latent channels, 3 image channels, attention mid block) at tiny width.
SMALL_FLUX = dict(VAE_PRESETS["flux"], block_out_channels=(8, 16, 16, 16), norm_num_groups=4)


def _perturbed(model):
    """Nudge every parameter so norms/biases differ too and a mis-mapped key changes the output."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def small_flux():
    torch.manual_seed(0)
    return _perturbed(build_vae("flux", block_out_channels=(8, 16, 16, 16), norm_num_groups=4))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return SliceVAE(build_vae("tiny").eval())


def _outputs(vae, x):
    with torch.no_grad():
        return vae(x, sample_posterior=False).sample


# --------------------------------------------------------------------------------------------------
# presets
# --------------------------------------------------------------------------------------------------


def test_flux_preset_is_the_83_8m_parameter_flux1_vae_with_16_channels_and_8x_downsampling():
    with torch.device("meta"):
        vae = build_vae("flux")
    n = sum(p.numel() for p in vae.parameters())
    assert n == 83_819_683
    assert abs(n - 83.8e6) / 83.8e6 < 0.01
    cfg = vae.config
    assert (cfg.in_channels, cfg.out_channels, cfg.latent_channels) == (3, 3, 16)
    assert tuple(cfg.block_out_channels) == (128, 256, 512, 512)
    assert not cfg.use_quant_conv and not cfg.use_post_quant_conv
    assert (cfg.scaling_factor, cfg.shift_factor) == (0.3611, 0.1159)
    svae = SliceVAE(vae)
    assert svae.downsample_factor == 8 and svae.latent_channels == 16
    assert svae.latent_shape(512, 512) == (16, 64, 64)


def test_flux_structure_maps_a_16x16_slice_to_a_16_channel_2x2_latent_and_back(small_flux):
    svae = SliceVAE(small_flux)
    with torch.no_grad():
        z = svae.encode_slices(torch.zeros(2, 1, 16, 16))
        x = svae.decode_slices(z)
    assert z.shape == (2, 16, 2, 2)
    assert x.shape == (2, 1, 16, 16)


def test_tiny_preset_is_single_channel_with_8_latent_channels_and_4x_downsampling(tiny):
    assert tiny.image_channels == 1 and tiny.latent_channels == 8 and tiny.downsample_factor == 4
    assert (tiny.scaling_factor, tiny.shift_factor) == (1.0, 0.0)
    with torch.no_grad():
        z = tiny.encode_slices(torch.rand(3, 1, 32, 48) * 2 - 1)
        x = tiny.decode_slices(z)
    assert z.shape == (3, 8, 8, 12) == (3, *tiny.latent_shape(32, 48))
    assert x.shape == (3, 1, 32, 48)


def test_unknown_preset_and_bad_override_are_refused():
    with pytest.raises(CTFlowError, match="unknown VAE preset"):
        build_vae("huge")
    with pytest.raises(CTFlowError, match="unknown VAE config keys: no_such_option"):
        build_vae("tiny", no_such_option=1)
    # a block list longer than the block types built, then failed at the first training step
    with pytest.raises(CTFlowError, match="down_block_types has 3 blocks, block_out_channels 4"):
        build_vae("tiny", block_out_channels=[16, 32, 64, 64])
    with pytest.raises(CTFlowError, match="norm_num_groups 7 must divide"):  # diffusers: a ValueError
        build_vae("tiny", norm_num_groups=7)


def test_a_misspelt_key_in_the_config_of_a_flux_file_is_refused(small_flux, tmp_path):
    """from_config dropped it: the VAE trained with the preset's value as though the key were not there."""
    from safetensors.torch import save_file

    from ctflow.models.vae import preset_config

    config = preset_config("flux") | {"block_out_channels": (8, 16, 16, 16), "norm_num_groups": 4}
    save_file(diffusers_to_flux_state_dict(small_flux.state_dict()), tmp_path / "ae.safetensors")
    assert load_vae(tmp_path / "ae.safetensors", config=config)
    with pytest.raises(CTFlowError, match="unknown VAE config keys: latent_chanels"):
        load_vae(tmp_path / "ae.safetensors", config=config | {"latent_chanels": 4})
    # read with another preset's layout (train-vae --init without --config): the fix is named
    with pytest.raises(CTFlowError, match=r"block_out_channels are \[32, 64, 128\]; .*configs/flux-vae.yaml"):
        load_vae(tmp_path / "ae.safetensors", preset="tiny")


def test_slice_size_not_a_multiple_of_the_downsampling_is_refused(tiny):
    with pytest.raises(CTFlowError, match="multiple of 4"):
        tiny.latent_shape(30, 32)
    with pytest.raises(CTFlowError, match=r"\[N, 1, H, W\]"):
        tiny.encode_slices(torch.zeros(1, 32, 32))


# --------------------------------------------------------------------------------------------------
# slices: grayscale in/out, scale and shift
# --------------------------------------------------------------------------------------------------


def test_grayscale_is_replicated_into_rgb_and_rgb_output_is_averaged(small_flux, monkeypatch):
    svae = SliceVAE(small_flux)
    seen = {}
    encode, decode = small_flux.encode, small_flux.decode

    def spy_encode(x, *a, **k):
        seen["enc"] = x.clone()
        return encode(x, *a, **k)

    def spy_decode(z, *a, **k):
        out = decode(z, *a, **k)
        seen["dec"] = out.sample.clone()
        return out

    monkeypatch.setattr(small_flux, "encode", spy_encode)
    monkeypatch.setattr(small_flux, "decode", spy_decode)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        y = svae.decode_slices(svae.encode_slices(x))
    assert seen["enc"].shape == (2, 3, 16, 16)
    for c in range(3):
        assert torch.equal(seen["enc"][:, c : c + 1], x)
    assert not torch.allclose(seen["dec"][:, 0], seen["dec"][:, 1])  # channels do differ
    torch.testing.assert_close(y, seen["dec"].mean(dim=1, keepdim=True))


def test_latent_scale_and_shift_are_applied_on_encode_and_inverted_on_decode(small_flux):
    svae = SliceVAE(build_vae("flux", block_out_channels=(8, 16, 16, 16), norm_num_groups=4))
    svae.vae.load_state_dict(small_flux.state_dict())
    svae.set_latent_stats(2.0, 0.5)
    assert svae.vae.config.scaling_factor == 2.0 and svae.vae.config.shift_factor == 0.5
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        z = svae.vae.encode(x.expand(-1, 3, -1, -1)).latent_dist.mean
        latents = svae.encode_slices(x)
        torch.testing.assert_close(latents, (z - 0.5) * 2.0)
        torch.testing.assert_close(
            svae.decode_slices(latents), svae.vae.decode(z).sample.mean(1, keepdim=True), rtol=1e-5, atol=1e-5
        )
    with pytest.raises(CTFlowError, match="positive"):
        svae.set_latent_stats(0.0)


def test_encode_slices_uses_the_posterior_mean_unless_sampling_is_asked(tiny):
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        a, b = tiny.encode_slices(x), tiny.encode_slices(x)
        s = tiny.encode_slices(x, sample=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert not torch.allclose(a, s)


def test_forward_returns_grayscale_reconstruction_and_posterior(tiny):
    recon, posterior = tiny(torch.zeros(2, 1, 16, 16))
    assert recon.shape == (2, 1, 16, 16)
    assert posterior.kl().shape == (2,)
    assert tiny.last_layer is tiny.vae.decoder.conv_out.weight


# --------------------------------------------------------------------------------------------------
# volumes
# --------------------------------------------------------------------------------------------------


def _volume(slices=7, size=16, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (slices, size, size)).astype(np.float32)


def test_encode_and_decode_volume_in_batches_equal_one_big_batch(tiny):
    vol = _volume()
    small = tiny.encode_volume(vol, batch_size=3)
    big = tiny.encode_volume(vol, batch_size=64)
    assert small.shape == (8, 7, 4, 4) and small.dtype == torch.float32
    torch.testing.assert_close(small, big, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        direct = tiny.encode_slices(torch.from_numpy(vol)[:, None]).permute(1, 0, 2, 3)
    torch.testing.assert_close(small, direct, rtol=1e-5, atol=1e-5)

    decoded = tiny.decode_volume(small, batch_size=64)
    assert (
        isinstance(decoded, torch.Tensor) and decoded.shape == (7, 16, 16) and decoded.dtype == torch.float32
    )
    out = np.full((7, 16, 16), np.nan, dtype=np.float32)  # e.g. a memmap for a long scan
    filled = tiny.decode_volume(small, batch_size=2, out=out)
    assert np.shares_memory(filled.numpy(), out) and np.isfinite(out).all()
    np.testing.assert_allclose(out, decoded.numpy(), rtol=1e-5, atol=1e-5)


def test_volume_methods_never_run_the_model_on_more_than_batch_size_slices(tiny, monkeypatch):
    sizes = {"enc": [], "dec": []}
    encode, decode = tiny.vae.encode, tiny.vae.decode

    def spy_encode(x, *a, **k):
        sizes["enc"].append(x.shape[0])
        assert not torch.is_grad_enabled()
        return encode(x, *a, **k)

    def spy_decode(z, *a, **k):
        sizes["dec"].append(z.shape[0])
        assert not torch.is_grad_enabled()
        return decode(z, *a, **k)

    monkeypatch.setattr(tiny.vae, "encode", spy_encode)
    monkeypatch.setattr(tiny.vae, "decode", spy_decode)
    latents = tiny.encode_volume(_volume(slices=10), batch_size=4, progress=True)
    tiny.decode_volume(latents, batch_size=4, progress=True)
    assert sizes == {"enc": [4, 4, 2], "dec": [4, 4, 2]}


def test_encode_volume_normalises_a_hu_volume_and_refuses_a_raw_hu_array(tiny):
    from ctflow.data.hu import normalize_hu
    from ctflow.data.volume import Volume

    hu = np.random.default_rng(0).uniform(-1200, 1500, (3, 16, 16)).astype(np.float32)
    torch.testing.assert_close(tiny.encode_volume(Volume(hu)), tiny.encode_volume(normalize_hu(hu)))
    with pytest.raises(CTFlowError, match="Hounsfield"):
        tiny.encode_volume(hu)


def test_hu_window_is_used_for_volumes_and_saved_with_the_weights(tiny, tmp_path):
    from ctflow.data.hu import HU_WINDOW, normalize_hu
    from ctflow.data.volume import Volume

    svae = SliceVAE(build_vae("tiny"))
    svae.vae.load_state_dict(tiny.vae.state_dict())
    assert svae.hu_window == HU_WINDOW  # weights saved before the window existed read as linear
    soft = (-1000.0, -150.0, 150.0, 1000.0)
    svae.set_hu_window(soft)
    hu = np.random.default_rng(1).uniform(-1100, 1100, (2, 16, 16)).astype(np.float32)
    z = svae.encode_volume(Volume(hu))
    torch.testing.assert_close(z, svae.encode_volume(normalize_hu(hu, soft)))
    assert not torch.allclose(z, svae.encode_volume(normalize_hu(hu)))
    np.testing.assert_allclose(svae.denormalize(svae.normalize(hu)), np.clip(hu, -1000, 1000), atol=1e-3)
    svae.save(tmp_path / "vae")
    again = SliceVAE.load(tmp_path / "vae")
    assert again.hu_window == soft
    torch.testing.assert_close(again.encode_volume(Volume(hu)), z)
    with pytest.raises(CTFlowError, match="increasing"):
        svae.set_hu_window((0, -10))


def test_volume_methods_refuse_bad_shapes(tiny):
    with pytest.raises(CTFlowError, match=r"\(S, H, W\)"):
        tiny.encode_volume(np.zeros((16, 16), np.float32))
    with pytest.raises(CTFlowError, match="C=8"):
        tiny.decode_volume(torch.zeros(4, 2, 4, 4))
    with pytest.raises(CTFlowError, match="out has shape"):
        tiny.decode_volume(torch.zeros(8, 2, 4, 4), out=np.zeros((2, 8, 8), np.float32))
    with pytest.raises(CTFlowError, match="batch_size"):
        tiny.encode_volume(_volume(), batch_size=0)
    with pytest.raises(CTFlowError, match="floating-point"):  # int16 would hold [-1, 1] as nearly all 0
        tiny.decode_volume(torch.zeros(8, 2, 4, 4), out=np.zeros((2, 16, 16), np.int16))
    with pytest.raises(CTFlowError, match="NaN or infinite"):  # not "they look like Hounsfield units"
        tiny.encode_volume(np.full((2, 32, 32), np.nan, np.float32))


# --------------------------------------------------------------------------------------------------
# offline loading
# --------------------------------------------------------------------------------------------------


def test_diffusers_folder_loads_to_identical_outputs(small_flux, tmp_path):
    small_flux.save_pretrained(tmp_path / "vae", safe_serialization=True)
    loaded = load_vae(tmp_path / "vae")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert not loaded.training
    assert torch.equal(_outputs(loaded, x), _outputs(small_flux, x))


def test_original_flux_single_file_converts_to_identical_weights_and_outputs(small_flux, tmp_path):
    flux_sd = diffusers_to_flux_state_dict(small_flux.state_dict())
    # the black-forest-labs layout: reversed decoder blocks, nin_shortcut, 1x1-conv attention
    assert flux_sd["encoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)
    assert torch.equal(
        flux_sd["decoder.up.3.block.0.norm1.weight"],
        small_flux.state_dict()["decoder.up_blocks.0.resnets.0.norm1.weight"],
    )
    assert "encoder.down.1.block.0.nin_shortcut.weight" in flux_sd
    assert "encoder.norm_out.weight" in flux_sd and "decoder.mid.block_2.conv2.bias" in flux_sd
    save_file(flux_sd, tmp_path / "ae.safetensors")

    loaded = load_vae(tmp_path / "ae.safetensors", config=SMALL_FLUX)
    reference = small_flux.state_dict()
    assert loaded.state_dict().keys() == reference.keys()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, reference[key]), key
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(_outputs(loaded, x), _outputs(small_flux, x))

    # a config folder works too, and a full LDM checkpoint's prefix is dropped
    small_flux.save_config(tmp_path / "cfg")
    save_file({f"first_stage_model.{k}": v for k, v in flux_sd.items()}, tmp_path / "full.safetensors")
    again = load_vae(tmp_path / "full.safetensors", config=tmp_path / "cfg")
    assert torch.equal(_outputs(again, x), _outputs(small_flux, x))
    # a config folder's HU window comes along (from_config drops ctflow's underscore keys)
    small_flux.save_config(tmp_path / "soft")  # then the window added by hand: the fixture stays as it is
    config = json.loads((tmp_path / "soft" / "config.json").read_text())
    (tmp_path / "soft" / "config.json").write_text(
        json.dumps({**config, "_hu_window": [-1000, -150, 150, 1000]})
    )
    assert SliceVAE(load_vae(tmp_path / "ae.safetensors", config=tmp_path / "soft")).hu_window == (
        -1000.0,
        -150.0,
        150.0,
        1000.0,
    )


def test_flux_conversion_round_trips_and_accepts_linear_attention(small_flux):
    flux_sd = diffusers_to_flux_state_dict(small_flux.state_dict())
    flux_sd["decoder.mid.attn_1.k.weight"] = flux_sd["decoder.mid.attn_1.k.weight"][:, :, 0, 0]
    back = flux_to_diffusers_state_dict(flux_sd, SMALL_FLUX)
    assert all(torch.equal(back[k], v) for k, v in small_flux.state_dict().items())


@pytest.mark.parametrize("name", ["ae.ckpt", "ae.pt", "ae.pth", "vae.bin"])
def test_pickle_checkpoints_are_refused_without_unpickling(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CTFlowError, match="only loads .safetensors"):
        load_vae(path)


def test_folder_with_only_pickled_weights_is_refused(small_flux, tmp_path):
    small_flux.save_config(tmp_path)
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CTFlowError, match="only loads .safetensors"):
        load_vae(tmp_path)


def test_wrong_shape_is_refused_naming_the_key_and_both_shapes(small_flux, tmp_path):
    flux_sd = diffusers_to_flux_state_dict(small_flux.state_dict())
    flux_sd["encoder.conv_in.weight"] = torch.zeros(8, 3, 5, 5)
    save_file(flux_sd, tmp_path / "ae.safetensors")
    with pytest.raises(
        CTFlowError, match=r"'encoder.conv_in.weight' has shape \(8, 3, 5, 5\).*\(8, 3, 3, 3\)"
    ):
        load_vae(tmp_path / "ae.safetensors", config=SMALL_FLUX)
    # the real flux preset (the default) does not fit the small file either
    with pytest.raises(CTFlowError, match="does not match the VAE config"):
        load_vae(tmp_path / "ae.safetensors")


def test_missing_and_unexpected_keys_are_refused(small_flux, tmp_path):
    flux_sd = diffusers_to_flux_state_dict(small_flux.state_dict())
    missing = {k: v for k, v in flux_sd.items() if k != "decoder.up.0.block.1.conv2.bias"}
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(CTFlowError, match=r"missing weight 'decoder.up.0.block.1.conv2.bias' .*\(8,\)"):
        load_vae(tmp_path / "missing.safetensors", config=SMALL_FLUX)
    extra = dict(flux_sd, **{"encoder.quant_conv.weight": torch.zeros(1)})
    save_file(extra, tmp_path / "extra.safetensors")
    with pytest.raises(CTFlowError, match="unexpected weight 'encoder.quant_conv.weight'"):
        load_vae(tmp_path / "extra.safetensors", config=SMALL_FLUX)


def test_diffusers_folder_not_matching_its_config_is_refused(small_flux, tmp_path):
    small_flux.save_pretrained(tmp_path, safe_serialization=True)
    sd = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    del sd["decoder.conv_out.bias"]
    save_file(sd, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CTFlowError, match="missing weight 'decoder.conv_out.bias'"):
        load_vae(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, _class_name="UNet2DModel")))
    with pytest.raises(CTFlowError, match="not an AutoencoderKL"):
        load_vae(tmp_path)


def test_missing_path_and_garbage_file_are_refused(tmp_path):
    with pytest.raises(CTFlowError, match="not found"):
        load_vae(tmp_path / "nope.safetensors")
    (tmp_path / "ae.safetensors").write_bytes(b"garbage")
    with pytest.raises(CTFlowError, match="not a readable safetensors"):
        load_vae(tmp_path / "ae.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CTFlowError, match="no config.json"):
        load_vae(tmp_path / "empty")


def test_saved_slice_vae_reloads_with_its_latent_stats(tiny, tmp_path):
    svae = SliceVAE(build_vae("tiny"))
    svae.vae.load_state_dict(tiny.vae.state_dict())
    svae.set_latent_stats(0.7, -0.2)
    svae.save(tmp_path / "vae")
    with pytest.raises(CTFlowError, match="already exists"):
        svae.save(tmp_path / "vae")
    again = SliceVAE.load(tmp_path / "vae")
    assert (again.scaling_factor, again.shift_factor) == pytest.approx((0.7, -0.2))
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(again.encode_slices(x), svae.eval().encode_slices(x))
