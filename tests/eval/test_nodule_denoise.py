"""The pieces of benchmarks/nodule_denoise.py: where a named nodule is lost on the way from noise."""

import pytest
import torch

from tests.benchmark_module import load_benchmark
from tests.tiny_pipeline import tiny_pipeline


@pytest.fixture(scope="module")
def denoise():
    return load_benchmark("nodule_denoise")


def test_levels_are_parsed_and_checked(denoise):
    assert denoise.parse_levels("0.25, 1") == [0.25, 1.0]
    for bad in ("0", "1.5", "a,b", ""):
        with pytest.raises(SystemExit, match="--levels takes numbers in"):
            denoise.parse_levels(bad)


def test_the_schedule_tail_starts_at_the_level_and_ends_at_zero(denoise):
    from ctflow.flow import make_scheduler

    scheduler = make_scheduler("euler")
    tail = denoise.sigmas_from(scheduler, 20, 0.3)
    assert tail[0] == 0.3 and tail[-1] == 0.0
    assert all(a > b for a, b in zip(tail, tail[1:], strict=False))
    scheduler.set_timesteps(20)
    assert denoise.sigmas_from(scheduler, 20, 1.0) == pytest.approx([float(s) for s in scheduler.sigmas])


def test_nodule_chunks_are_those_its_slices_fall_in(denoise):
    truth = {
        "num_slices": 40,
        "spacing": [2.5, 5.0, 5.0],
        "findings": [
            {"type": "nodule", "visible": True, "center_voxel": [15, 30, 20], "radius_voxel": [2, 1, 1]},
            {"type": "nodule", "visible": False, "center_voxel": [35, 30, 20], "radius_voxel": [2, 1, 1]},
        ],
    }
    assert denoise.nodule_chunks(truth, 8) == [1, 2]  # slices 13..17


def test_retention_and_chunk_error_measure_the_nodule_chunks_only(denoise):
    zc = torch.zeros(2, 16, 4, 4)
    zn = zc.clone()
    zn[:, 9, 1, 1] = 2.0  # the nodule, in chunk 1 of 8 slices
    kept = zc + 0.5 * (zn - zc)
    kept[:, 0] = 5.0  # a change outside the nodule chunk does not count
    assert denoise.retention(kept, zc, zn, zc, [1], 8) == pytest.approx(0.5)
    assert denoise.retention(zc, zc, zn, zc, [1], 8) == 0.0
    assert denoise.chunk_error(zn, zn, [1], 8) == 0.0
    assert denoise.chunk_error(kept, zn, [1], 8) == pytest.approx(0.25)


def test_regenerate_edits_only_the_chunks_named_in_order_from_the_edited_context(denoise):
    from ctflow.flow import guided_velocity
    from ctflow.train.flow_trainer import chunk_at

    pipe = tiny_pipeline(context="concat")
    k = pipe.chunk_slices
    z = torch.randn(8, 2 * k + 2, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = pipe.text_condition(["A small nodule in the right upper lobe."])
    noises = [torch.randn(8, k, 8, 8) for _ in range(2)]
    t = 0.4
    out = denoise.regenerate(pipe, z, [1, 2], cond, None, 1.0, t, [t, 0.0], noises)
    assert torch.equal(out[:, :k], z[:, :k]) and out.shape == z.shape
    # one Euler step from t to 0 per chunk; chunk 2 sees the regenerated chunk 1 as its context
    with torch.no_grad():
        for i, noise in ((1, noises[0]), (2, noises[1])):
            c = {
                **cond,
                "chunk_index": torch.tensor([i]),
                "context": chunk_at(out, pipe.eos_latent(), k, i - 1)[None],
            }
            x = (1 - t) * chunk_at(z, pipe.eos_latent(), k, i)[None] + t * noise[None]
            want = x - t * guided_velocity(pipe.transformer, x, torch.tensor([t]), c)
            valid = min(k, z.shape[1] - i * k)
            assert torch.allclose(out[:, i * k : i * k + valid], want[0, :, :valid], atol=1e-5)
        assert not torch.allclose(out[:, k:], z[:, k:])


def test_summary_counts_calls_and_report_shifts_per_level(denoise):
    def read(score, call, vae_call):
        return {"score": score, "nodule": call, "nodule_vae_rule": vae_call}

    def row(shift):
        level = {
            "nodule_nodule": read(1.0 + shift, True, shift > 0),
            "nodule_clear": read(1.0, True, False),
            "clear_nodule": read(0.5 + shift, False, False),
            "clear_clear": read(0.5, False, False),
        }
        keep = {name: 0.5 for name in denoise.RETENTIONS}
        return {
            "levels": {
                "0": {"nodule": read(2.0, True, True), "clear": read(0.0, False, False)},
                "0.5": level,
            },
            "retention": {"0.5": keep},
        }

    out = denoise.summary([row(0.4), row(-0.2)], [0.5])
    assert out["0"]["nodule"] == {"vae_rule": 2, "shipped_rule": 2, "mean_score": 2.0}
    level = out["0.5"]
    assert level["nodule_nodule"]["vae_rule"] == 1 and level["nodule_nodule"]["shipped_rule"] == 2
    assert level["nodule_report_shift"] == pytest.approx(0.1) and level["nodule_follows"] == [1, 2]
    assert level["clear_follows"] == [1, 2] and level["kept_nodule_report"] == 0.5


def test_layer_shares_see_what_the_linear_ends_of_the_network_can_handle(denoise):
    pipe = tiny_pipeline(context="concat")
    model = pipe.transformer
    k = pipe.chunk_slices
    n, patch = model.grid[0] * model.grid[1] * model.grid[2], model.final_layer.linear.out_features
    tokens = torch.randn(1, n, patch)
    chunk = model.unpatchify(tokens)[0]
    assert torch.equal(denoise.patchify(model, chunk), tokens[0])  # patchify inverts unpatchify

    bases = denoise.layer_bases(model)
    zc = torch.zeros(8, 2 * k, 8, 8)
    width = model.final_layer.linear.in_features
    written = model.unpatchify(torch.randn(1, n, width) @ model.final_layer.linear.weight.detach().T)[0]
    zn = torch.cat([zc[:, :k], written], dim=1)  # a difference the output layer can write exactly
    shares = denoise.layer_shares(model, bases, zn, zc, [1], k)
    assert shares["output"] == pytest.approx(1.0, abs=1e-3)
    assert width < patch and 0 < shares["embedding"] < 1  # a narrower embedding sees only part of a patch
    assert denoise.layer_shares(model, bases, zc, zc, [1], k) == {"embedding": None, "output": None}
