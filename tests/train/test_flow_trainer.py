import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ctflow.errors import CTFlowError, CTFlowWarning
from ctflow.train import flow_trainer
from ctflow.train.config import FlowTrainConfig, LateConfig, OptimConfig
from ctflow.train.flow_trainer import (
    ChunkSampler,
    Draw,
    build_transformer,
    chunk_at,
    chunk_loss,
    finding_onsets,
    same_depth,
    train_flow,
)
from ctflow.train.latents import LatentCache
from tests.train.fake_cache import TINY_TRANSFORMER, make_fake_cache


def _config(**kw):
    base = dict(
        transformer=dict(TINY_TRANSFORMER),
        optim=OptimConfig(lr=1e-3, warmup_steps=2, ema_decay=0.9),
        steps=20,
        batch_size=4,
        log_every=5,
        checkpoint_every=10,
    )
    base.update(kw)
    return FlowTrainConfig(**base)


def test_chunk_at_cuts_the_volume_into_eos_padded_chunks_plus_an_eos_chunk():
    lat = torch.arange(2 * 5 * 3 * 3, dtype=torch.float32).view(2, 5, 3, 3) + 2
    eos = torch.ones(2, 3, 3)
    chunks = [chunk_at(lat, eos, 4, i) for i in range(3)]
    assert all(c.shape == (2, 4, 3, 3) for c in chunks)
    assert torch.equal(chunks[0], lat[:, :4])
    assert torch.equal(chunks[1][:, 0], lat[:, 4]) and chunks[1][:, 1:].eq(1).all()
    assert chunks[2].eq(1).all()
    chunks[0].zero_()  # a copy: training rows never write into the cache's tensor
    assert lat.min() == 2
    with pytest.raises(IndexError):
        chunk_at(lat, eos, 4, 3)


def test_sampler_start_boost_sets_share_of_first_chunks(tmp_path):
    cache = LatentCache(make_fake_cache(tmp_path / "c"))
    uniform = sum(1 / n for n in ChunkSampler(cache, 4, _config()).num_chunks) / len(cache)
    # 0 switches StartBoost off: the first chunk is as likely as any other
    for boost, lo, hi in ((0.0, uniform - 0.08, uniform + 0.08), (0.5, 0.35, 0.65), (1.0, 1.0, 1.0)):
        sampler = ChunkSampler(cache, 4, _config(start_boost=boost, context_noise=0.0))
        b = sampler.batch(300, torch.Generator().manual_seed(0))
        share = b["first"].float().mean().item()
        assert lo <= share <= hi
        assert (b["chunk_index"] == 0).eq(b["first"]).all()
        assert b["context"][b["first"]].eq(0).all()


def test_onset_chunks_are_where_a_finding_begins_and_the_chunk_after(tmp_path):
    findings = {
        5: [{"type": "effusion", "first": 9, "last": 17}, {"type": "nodule", "first": 10, "last": 11}],
        4: [{"type": "cardiomegaly", "first": 2, "last": 12}, {"type": "nodule", "first": 13, "last": 14}],
        3: [{"type": "consolidation", "first": 4, "last": 5}],  # within one chunk: no chunk after
    }
    cache = LatentCache(make_fake_cache(tmp_path / "c", finding_slices=findings))
    # chunks of 4 slices: the effusion starts in chunk 2, the nodule inside it too (counted once); the
    # heart starts in the first chunk, which StartBoost covers, so only its next chunk is listed
    assert list(finding_onsets(cache, 4)) == [(3, 1), (4, 1), (4, 3), (5, 2), (5, 3)]


def test_finding_boost_sets_the_share_of_onset_chunks_and_keeps_the_first_chunks_share(tmp_path):
    findings = {
        4: [{"type": "effusion", "first": 9, "last": 17}],
        5: [{"type": "nodule", "first": 13, "last": 14}],
    }
    cache = LatentCache(make_fake_cache(tmp_path / "c", finding_slices=findings))
    onsets = set(finding_onsets(cache, 4))
    g = torch.Generator().manual_seed(0)
    shares = {}
    for boost in (0.0, 0.3):
        sampler = ChunkSampler(cache, 4, _config(start_boost=0.4, finding_boost=boost))
        draws = [sampler.draw(g) for _ in range(3000)]
        assert all(d.region is None for d in draws)  # no controls unless finding_controls asks
        shares[boost] = (
            sum(d.chunk == 0 for d in draws) / len(draws),
            sum(d[:2] in onsets for d in draws) / len(draws),
        )
    assert abs(shares[0.0][0] - 0.4) < 0.03 and abs(shares[0.3][0] - 0.4) < 0.03
    base = shares[0.0][1]  # onsets drawn by chance among the later chunks
    assert 0.02 < base < 0.15
    assert abs(shares[0.3][1] - (0.3 + base * 0.3 / 0.6)) < 0.03  # later draws: 0.6 -> 0.3


def test_finding_weight_weights_the_pixels_a_finding_covers_in_each_chunk(tmp_path):
    found = {2: [{"type": "effusion", "first": 3, "last": 9}]}  # volume 2: 11 slices, 4-slice chunks
    cache = LatentCache(make_fake_cache(tmp_path / "c", finding_slices=found, finding_masks=True))
    sampler = ChunkSampler(cache, 4, _config(finding_weight=3.0))
    mask = cache.tensor(2, "finding_mask")[None]
    for i in range(4):  # chunk 2 ends past the volume's last slice, chunk 3 is all EOS: weight 1 there
        sampler.draw = lambda *_, i=i: Draw(2, i)
        b = sampler.batch(2, torch.Generator().manual_seed(0))
        expected = 1 + 3.0 * chunk_at(mask, torch.zeros_like(mask[:, 0]), 4, i)
        assert b["weight"].shape == (2, 1, 4, 8, 8)
        assert torch.equal(b["weight"][0], expected) and torch.equal(b["weight"][1], expected)
    assert b["weight"].eq(1).all() and sampler.batch(2, torch.Generator())["weight"][0, 0, 1:3].eq(1).all()
    sampler.draw = lambda *_: Draw(2, 1)  # slices 4-7: the finding's top-left quarter counts 4x
    w = sampler.batch(1, torch.Generator())["weight"][0, 0]
    assert w[:, :4, :4].eq(4).all() and w.sum() == 4 * 8 * 8 + 3 * 4 * 16
    # off by default: no weights, and the same batch as before the option existed
    plain = ChunkSampler(cache, 4, _config()).batch(4, torch.Generator().manual_seed(1))
    assert "weight" not in plain
    with pytest.raises(CTFlowError, match="finding_weight needs finding masks"):
        ChunkSampler(LatentCache(make_fake_cache(tmp_path / "d")), 4, _config(finding_weight=1.0))
    with pytest.raises(CTFlowError, match="finding_weight must be 0 or more"):
        _config(finding_weight=-1.0)


def test_a_share_power_below_one_weighs_the_pixels_a_finding_only_touches_more(tmp_path):
    found = {2: [{"type": "effusion", "first": 3, "last": 9}]}
    cache = LatentCache(make_fake_cache(tmp_path / "c", finding_slices=found, finding_masks=True))
    mask = cache.tensor(2, "finding_mask")[None]
    share = chunk_at(mask, torch.zeros_like(mask[:, 0]), 4, 1)
    share[0, 0, 0, 0] = 0.25  # a pixel the finding touches (fake masks are all 0 or 1)
    weights = {}
    for power in (1.0, 0.5):
        sampler = ChunkSampler(cache, 4, _config(finding_weight=3.0, finding_share_power=power))
        sampler.draw = lambda *_: Draw(2, 1)
        sampler.finding_share = lambda v, i: share
        weights[power] = sampler.batch(1, torch.Generator())["weight"][0]
    assert weights[1.0][0, 0, 0, 0] == 1 + 3 * 0.25 and weights[0.5][0, 0, 0, 0] == 1 + 3 * 0.5
    untouched, filled = share == 0, share == 1
    assert untouched.any() and filled.any()
    for power in (1.0, 0.5):  # pixels it fills or misses weigh the same either way
        assert weights[power][untouched].eq(1).all() and weights[power][filled].eq(4).all()
    for bad in (0.0, 1.5):
        with pytest.raises(CTFlowError, match="finding_share_power must be above 0 and at most 1"):
            _config(finding_share_power=bad)


def test_same_depth_maps_a_chunk_to_the_same_share_of_another_stack():
    assert same_depth(5, 4, 40, 120) == 16  # middle slice 22 of 40 (55%): slice 66 of 120
    assert same_depth(5, 4, 40, 40) == 5
    assert same_depth(0, 4, 40, 120) == 1  # never the first chunk: StartBoost draws those
    assert same_depth(9, 4, 37, 20) == 4  # a last partial chunk's middle lies past the end: the last chunk


# volumes of 5, 8, ..., 26 slices; volume 4 has no ground truth, so it is nobody's control
CONTROL_FINDINGS = {
    0: [],
    1: [{"type": "nodule", "first": 1, "last": 2}],
    2: [],
    3: [],
    5: [{"type": "effusion", "first": 12, "last": 19}],
    6: [{"type": "effusion", "first": 9, "last": 17}],
    7: [{"type": "nodule", "first": 13, "last": 14}],
}


def test_finding_controls_draw_the_same_depth_of_volumes_without_the_findings_that_begin_there(tmp_path):
    cache = LatentCache(make_fake_cache(tmp_path / "c", n=8, finding_slices=CONTROL_FINDINGS))
    onsets = finding_onsets(cache, 4)
    assert onsets == {
        (5, 3): {"effusion"},
        (5, 4): {"effusion"},
        (6, 2): {"effusion"},
        (6, 3): {"effusion"},
        (7, 3): {"nodule"},
    }
    sampler = ChunkSampler(cache, 4, _config(start_boost=0.4, finding_boost=0.3, finding_controls=0.5))
    g = torch.Generator().manual_seed(0)
    draws = [sampler.draw(g) for _ in range(4000)]
    controls = [d for d in draws if d.region is not None]
    assert abs(len(controls) / len(draws) - 0.15) < 0.03  # half of the 0.3 boosted draws
    assert abs(sum(d.chunk == 0 for d in draws) / len(draws) - 0.4) < 0.03  # StartBoost untouched
    for d in controls:
        v, i = d.region
        assert not onsets[d.region] & {f["type"] for f in CONTROL_FINDINGS[d.volume]}
        assert d.chunk == same_depth(i, 4, cache.num_slices(v), cache.num_slices(d.volume))
    by_finding = {t: {d.volume for d in controls if onsets[d.region] == {t}} for t in ("effusion", "nodule")}
    assert by_finding == {"effusion": {0, 1, 2, 3, 7}, "nodule": {0, 2, 3, 5, 6}}
    # the onsets themselves: the other half of the boost, plus later chunks that hit them by chance
    assert 0.14 < sum(d.region is None and d[:2] in onsets for d in draws) / len(draws) < 0.22


def test_a_finding_control_weights_its_onsets_finding_region(tmp_path):
    cache = LatentCache(
        make_fake_cache(tmp_path / "c", n=8, finding_slices=CONTROL_FINDINGS, finding_masks=True)
    )
    config = _config(finding_boost=0.3, finding_controls=0.5, finding_weight=3.0)
    sampler = ChunkSampler(cache, 4, config)
    sampler.draw = lambda *_: Draw(0, 1, (6, 2))  # volume 6's effusion covers slices 9-11 of chunk 2
    w = sampler.batch(1, torch.Generator())["weight"][0, 0]  # [k,h,w]
    assert w[0].eq(1).all() and w[1:, :4, :4].eq(4).all() and w.sum() == 4 * 64 + 3 * 3 * 16
    sampler.draw = lambda *_: Draw(1, 0, (6, 2))  # its own nodule (slices 1-2) and the region (1-3)
    w = sampler.batch(1, torch.Generator())["weight"][0, 0]
    assert w[0].eq(1).all() and w[1:, :4, :4].eq(4).all()
    sampler.draw = lambda *_: Draw(1, 0)  # not a control: its own finding alone
    w = sampler.batch(1, torch.Generator())["weight"][0, 0]
    assert w[1:3, :4, :4].eq(4).all() and w[3].eq(1).all()


def test_finding_controls_need_a_finding_boost_and_a_share_between_0_and_1():
    with pytest.raises(CTFlowError, match="finding_controls replaces some finding_boost samples"):
        _config(finding_controls=0.5)
    with pytest.raises(CTFlowError, match="finding_controls must be between 0 and 1"):
        _config(finding_boost=0.2, finding_controls=1.5)


def test_chunk_loss_applies_the_batch_weights(tmp_path):
    from ctflow.train.flow_trainer import build_transformer, chunk_loss

    found = {i: [{"type": "nodule", "first": 1, "last": 4}] for i in range(6)}
    cache = LatentCache(make_fake_cache(tmp_path / "c", finding_slices=found, finding_masks=True))
    config = _config(finding_weight=2.0, start_boost=0.5)
    torch.manual_seed(0)
    model = build_transformer(config, cache)
    batch = ChunkSampler(cache, 4, config).batch(6, torch.Generator().manual_seed(0))
    assert batch["first"].any() and not batch["first"].all()  # both kinds of rows

    def loss(weight):
        b = {k: v for k, v in batch.items() if k != "weight"}
        if weight is not None:
            b["weight"] = weight
        return chunk_loss(model, b, torch.Generator().manual_seed(5), config).item()

    plain = loss(None)
    assert loss(torch.ones_like(batch["weight"])) == pytest.approx(plain, rel=1e-6)
    assert loss(torch.full_like(batch["weight"], 3.0)) == pytest.approx(3 * plain, rel=1e-5)
    weighted = loss(batch["weight"])
    assert plain < weighted < 3 * plain  # finding pixels count 3x, the rest 1x


def test_finding_boost_without_finding_slices_and_out_of_range_boosts_are_refused(tmp_path):
    cache = LatentCache(make_fake_cache(tmp_path / "c"))
    with pytest.raises(CTFlowError, match="finding_boost needs finding_slices"):
        ChunkSampler(cache, 4, _config(finding_boost=0.2))
    with pytest.raises(CTFlowError, match="start_boost \\+ finding_boost must be at most 1"):
        _config(start_boost=0.7, finding_boost=0.4)
    with pytest.raises(CTFlowError, match="finding_boost must be between 0 and 1"):
        _config(finding_boost=-0.1)


def test_sampler_context_is_the_previous_chunk(tmp_path):
    cache = LatentCache(make_fake_cache(tmp_path / "c"))
    sampler = ChunkSampler(cache, 4, _config(start_boost=0.01, context_noise=0.0))
    b = sampler.batch(50, torch.Generator().manual_seed(1))
    # the fake latents ramp up with depth: a later chunk's context lies above... below it on average
    assert (b["x0"].mean((1, 2, 3, 4)) > b["context"].mean((1, 2, 3, 4))).float().mean() > 0.9
    # exactly: each row is chunk i of a volume and its context is chunk i - 1 of the same volume
    volumes = [cache.tensor(v, "latents") for v in range(len(cache))]

    def pair(lat, i):
        ctx = chunk_at(lat, cache.eos, 4, i - 1) if i > 0 else torch.zeros_like(lat[:, :4])
        return chunk_at(lat, cache.eos, 4, i), ctx

    for x0, ctx, i in zip(b["x0"], b["context"], b["chunk_index"].tolist(), strict=True):
        assert any(
            torch.equal(x0, want_x0.to(x0.dtype)) and torch.equal(ctx, want_ctx.to(ctx.dtype))
            for lat, n in zip(volumes, sampler.num_chunks, strict=True)
            if i < n
            for want_x0, want_ctx in [pair(lat, i)]
        )


@pytest.mark.parametrize("noise_max", [0.0, 1.0])
def test_context_noise_is_fixed_or_drawn_per_row_up_to_its_maximum(tmp_path, noise_max):
    cache = LatentCache(make_fake_cache(tmp_path / "c"))
    clean = ChunkSampler(cache, 4, _config(start_boost=0.0, context_noise=0.0))
    noisy = ChunkSampler(cache, 4, _config(start_boost=0.0, context_noise=0.05, context_noise_max=noise_max))
    clean, noisy = (s.batch(64, torch.Generator().manual_seed(2)) for s in (clean, noisy))
    assert torch.equal(clean["x0"], noisy["x0"])  # same draws of chunks: only the noise differs
    first = noisy["first"]
    assert first.any() and not noisy["context"][first].any()  # no previous chunk: nothing to noise
    std = (noisy["context"] - clean["context"])[~first].flatten(1).std(1)
    if noise_max == 0.0:
        assert std.sub(0.05).abs().max() < 0.02
    else:  # uniform in [0.05, 1.0]: spread over the range, never outside it
        assert std.min() > 0.03 and std.max() < 1.05
        assert std.min() < 0.25 and std.max() > 0.8 and 0.4 < std.mean() < 0.65


def test_resume_reproduces_an_uninterrupted_run_exactly(tmp_path):
    cache = make_fake_cache(tmp_path / "c")
    train_flow(cache, _config(), tmp_path / "full", progress=False)
    train_flow(cache, _config(), tmp_path / "split", progress=False, stop_at=10)
    assert not (tmp_path / "split" / "transformer").exists()
    with open(tmp_path / "split/log.jsonl", "a") as f:  # logged after the checkpoint, then killed mid-line
        f.write(json.dumps({"step": 15, "loss": 9.9}) + '\n{"step": 1')
    train_flow(cache, _config(), tmp_path / "split", progress=False, resume=True)
    logs = [
        map(json.loads, (tmp_path / run / "log.jsonl").read_text().splitlines()) for run in ("full", "split")
    ]
    steps = [[r["step"] for r in log if "loss" in r] for log in logs]
    assert steps[0] == steps[1] == [5, 10, 15, 20]  # each step logged once, as in the uninterrupted run
    a = load_file(tmp_path / "full/transformer/diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "split/transformer/diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log = [json.loads(line) for line in (tmp_path / "full/log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 5 and "loss" in log[0] and 0 <= log[0]["data_share"] <= 1


def test_training_reduces_the_loss(tmp_path):
    cache = make_fake_cache(tmp_path / "c", n=2)
    cfg = _config(steps=60, log_every=20, batch_size=8, start_boost=0.5, cfg_dropout=0.0, meta_dropout=0.0)
    train_flow(cache, cfg, tmp_path / "run", progress=False)
    losses = [
        json.loads(x)["loss"] for x in (tmp_path / "run/log.jsonl").read_text().splitlines() if "loss" in x
    ]
    assert losses[-1] < 0.7 * losses[0]


def test_resume_keeps_the_fp16_loss_scale(tmp_path, monkeypatch):
    """Under fp16 a GradScaler skips steps whose scaled gradients overflow; a resumed run must go on from
    the scale it had reached, or it skips other steps. (accelerate makes no scaler on a CPU, so one
    stands in that doubles every step from 2**40: this model's gradients overflow from about 2**62
    on, some steps after the split, so a run that restarted from 2**40 would skip none of them.)"""
    import accelerate

    original = accelerate.Accelerator.__init__

    def with_scaler(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, growth_interval=1)

    monkeypatch.setattr(accelerate.Accelerator, "__init__", with_scaler)
    cache = make_fake_cache(tmp_path / "c")
    cfg = _config(steps=40, checkpoint_every=20)
    train_flow(cache, cfg, tmp_path / "full", progress=False)
    train_flow(cache, cfg, tmp_path / "split", progress=False, stop_at=20)
    saved = json.loads((tmp_path / "split/checkpoints/step_0000020/state.json").read_text())
    assert saved["grad_scaler"]["scale"] >= 2.0**55  # it grew, so a fresh scaler would differ
    train_flow(cache, cfg, tmp_path / "split", progress=False, resume=True)
    a = load_file(tmp_path / "full/transformer/diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "split/transformer/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_grad_clip_zero_turns_clipping_off_and_still_trains(tmp_path):
    """grad_clip 0 means "no clipping", as in the VAE trainer; clipping to norm 0 zeroed every gradient."""
    from ctflow.train.flow_trainer import build_transformer

    cache = make_fake_cache(tmp_path / "c")
    cfg = _config(steps=3, log_every=1, optim=OptimConfig(lr=1e-3, warmup_steps=0, grad_clip=0, ema_decay=0))
    train_flow(cache, cfg, tmp_path / "run", progress=False)
    torch.manual_seed(cfg.seed)  # the trainer's initial weights
    start = build_transformer(cfg, LatentCache(cache)).state_dict()
    end = load_file(tmp_path / "run/transformer/diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(start[k], end[k]) for k in end)
    log = [json.loads(x) for x in (tmp_path / "run/log.jsonl").read_text().splitlines() if "loss" in x]
    assert all(r["grad_norm"] > 0 for r in log)


def test_resume_names_changed_settings_and_refuses_another_model_shape(tmp_path):
    cache = make_fake_cache(tmp_path / "c")
    train_flow(cache, _config(), tmp_path / "run", progress=False, stop_at=10)
    with pytest.warns(CTFlowWarning, match=r"resuming from step 10 with settings other than the checkpoint's: "
                      r"batch_size 4 -> 3, optim.lr 0.001 -> 0.002"):  # fmt: skip
        train_flow(
            cache,
            _config(batch_size=3, optim=OptimConfig(lr=2e-3, warmup_steps=2, ema_decay=0.9)),
            tmp_path / "run",
            progress=False,
            resume=True,
            stop_at=12,
        )
    wider = _config()
    wider.transformer = {**wider.transformer, "hidden_size": 2 * wider.transformer.get("hidden_size", 32)}
    with pytest.raises(CTFlowError, match="holds a model of another shape than this config builds"):
        train_flow(cache, wider, tmp_path / "run", progress=False, resume=True)
    # the same cache moved elsewhere resumes; another cache of the same shape does not
    moved = shutil.copytree(cache, tmp_path / "moved")
    train_flow(moved, _config(batch_size=3, optim=OptimConfig(lr=2e-3, warmup_steps=2, ema_decay=0.9)),
               tmp_path / "run", progress=False, resume=True, stop_at=14)  # fmt: skip
    other = make_fake_cache(tmp_path / "other", reports=[[f"other {i}"] for i in range(6)])
    with pytest.raises(CTFlowError, match=r"was trained on another latent cache than .*other"):
        train_flow(other, _config(), tmp_path / "run", progress=False, resume=True)


def test_resuming_on_another_number_of_processes_names_the_global_batch_change(tmp_path):
    """batch_size is per process: a 2-process run resumed on 1 process trained on half the batch."""
    cache = make_fake_cache(tmp_path / "c")
    train_flow(cache, _config(), tmp_path / "run", progress=False, stop_at=10)
    state = next((tmp_path / "run" / "checkpoints").glob("*/state.json"))
    info = json.loads(state.read_text())
    assert info["processes"] == 1
    state.write_text(json.dumps({**info, "processes": 2}))  # as a 2-process run saves it
    with pytest.warns(
        CTFlowWarning, match="on 1 process.* where the run had 2: the global batch changes from 8 to 4"
    ):
        train_flow(cache, _config(), tmp_path / "run", progress=False, resume=True, stop_at=12)


def test_resuming_a_finished_run_changes_nothing(tmp_path, capsys):
    cache = make_fake_cache(tmp_path / "c")
    train_flow(cache, _config(steps=10), tmp_path / "run", progress=False)
    log, weights = (
        tmp_path / "run/log.jsonl",
        tmp_path / "run/transformer/diffusion_pytorch_model.safetensors",
    )
    before = (log.read_text(), weights.stat().st_mtime_ns)
    train_flow(cache, _config(steps=10), tmp_path / "run", progress=True, resume=True)
    assert (log.read_text(), weights.stat().st_mtime_ns) == before  # no second final record, no rewrite
    assert "resuming from step 10 of 10" in capsys.readouterr().err


def test_a_nan_loss_stops_the_run_before_its_weights_checkpoints_or_log_hold_it(tmp_path, monkeypatch):
    """It trained on, rotated the good checkpoints out for NaN ones and wrote a NaN model and log."""
    cache = make_fake_cache(tmp_path / "c")
    own = flow_trainer.chunk_loss
    calls = iter(range(10**6))
    monkeypatch.setattr(
        flow_trainer, "chunk_loss", lambda *a, **k: own(*a, **k) * (float("nan") if next(calls) >= 6 else 1)
    )
    with pytest.raises(CTFlowError, match="the loss became nan .* at step 7; lower optim.lr, or --resume"):
        train_flow(
            cache, _config(steps=10, log_every=1, checkpoint_every=5), tmp_path / "run", progress=False
        )
    assert [p.name for p in (tmp_path / "run/checkpoints").iterdir()] == ["step_0000005"]
    log = [json.loads(x) for x in (tmp_path / "run/log.jsonl").read_text().splitlines()]  # valid JSON
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6] and not (tmp_path / "run/transformer").exists()


def test_a_transformer_folder_left_half_written_is_written_again_on_resume(tmp_path):
    """The final save was diffusers' own writer (config.json first): a stop inside it left a folder that a
    resume took for finished, and assemble then found no weights."""
    cache = make_fake_cache(tmp_path / "c")
    train_flow(cache, _config(steps=10), tmp_path / "run", progress=False)
    (tmp_path / "run/transformer/diffusion_pytorch_model.safetensors").unlink()
    train_flow(cache, _config(steps=10), tmp_path / "run", progress=False, resume=True)
    assert (tmp_path / "run/transformer/diffusion_pytorch_model.safetensors").is_file()


def test_run_folder_mistakes_are_named(tmp_path, capsys):
    cache = make_fake_cache(tmp_path / "c")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CTFlowError, match="file.txt is a file; --out names the run's folder"):
        train_flow(cache, _config(), tmp_path / "file.txt", progress=False)
    # --resume where there is nothing to resume: said, not silent (a mistyped --out starts a new run)
    train_flow(cache, _config(steps=2), tmp_path / "new", progress=True, resume=True)
    assert "no checkpoint in" in capsys.readouterr().err
    # another trainer's checkpoint: named, not a KeyError
    (tmp_path / "vae/checkpoints").mkdir(parents=True)
    from ctflow.train.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "vae/checkpoints", 1, {"vae": torch.nn.Linear(2, 2)}, {}, {"config": {}})
    with pytest.raises(CTFlowError, match="holds no model .*another trainer's run"):
        train_flow(cache, _config(), tmp_path / "vae", progress=False, resume=True)


def test_fp16_on_the_cpu_is_warned_as_training_in_float32(tmp_path, fresh_accelerate_state):
    from ctflow.errors import CTFlowWarning

    with pytest.warns(CTFlowWarning, match="fp16 does not run on the CPU"):
        train_flow(
            make_fake_cache(tmp_path / "c"),
            _config(steps=1, mixed_precision="fp16"),
            tmp_path / "run",
            progress=False,
        )


def test_the_log_records_the_rate_each_step_trained_with(tmp_path):
    """It logged the next step's rate (scheduler.get_last_lr after scheduler.step)."""
    from ctflow.train.utils import lr_lambda

    cfg = _config(steps=4, log_every=1)
    train_flow(make_fake_cache(tmp_path / "c"), cfg, tmp_path / "run", progress=False)
    log = [json.loads(x) for x in (tmp_path / "run/log.jsonl").read_text().splitlines() if "lr" in x]
    rate = lr_lambda(cfg.optim.warmup_steps, cfg.steps, cfg.optim.min_lr_ratio)
    assert [r["lr"] for r in log] == pytest.approx([cfg.optim.lr * rate(i) for i in range(4)])
    assert log[0]["lr"] != log[1]["lr"]


def test_the_log_times_each_interval_by_its_own_steps(tmp_path, monkeypatch):
    import types

    clock = iter(range(10**6))  # every reading one second after the last: each step takes 2 s
    monkeypatch.setattr(flow_trainer, "time", types.SimpleNamespace(perf_counter=lambda: float(next(clock))))
    train_flow(make_fake_cache(tmp_path / "c"), _config(steps=12), tmp_path / "run", progress=False)
    log = [json.loads(x) for x in (tmp_path / "run/log.jsonl").read_text().splitlines() if "loss" in x]
    assert [r["step"] for r in log] == [5, 10, 12]
    assert [r["sec_per_step"] for r in log] == [2.0, 2.0, 2.0]  # the last interval is 2 steps, not 5


def test_a_report_width_other_than_the_caches_is_named(tmp_path):
    """configs/ctrate-512.yaml sets text_dim 768 (CXR-BERT); on a cache of the default 384-wide
    encoder that ended in a traceback from set_text_moments."""
    cfg = _config()
    cfg.transformer = {**cfg.transformer, "text_dim": 768}
    with pytest.raises(
        CTFlowError, match="text_dim is 768 but the latent cache's reports were encoded 16 wide"
    ):
        train_flow(make_fake_cache(tmp_path / "c"), cfg, tmp_path / "run", progress=False)


def test_existing_run_folder_needs_resume(tmp_path):
    cache = make_fake_cache(tmp_path / "c")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "x").write_text("x")
    with pytest.raises(CTFlowError, match="--resume"):
        train_flow(cache, _config(), tmp_path / "run", progress=False)


def test_unfinished_cache_is_refused(tmp_path):
    (tmp_path / "c").mkdir()
    with pytest.raises(CTFlowError, match="ctflow encode"):
        LatentCache(tmp_path / "c")


@pytest.mark.slow
@pytest.mark.parametrize("context", ["concat", "tokens"])
def test_two_process_torchrun_keeps_replicas_identical_and_only_rank0_writes(tmp_path, context):
    """With context "tokens", first chunks and later ones take different parameters (start_context,
    context_embedder): a process whose batch holds only one kind leaves the other's unused, which DDP
    must be told of (batches of 2 per process make that likely within 6 steps)."""
    cache = make_fake_cache(tmp_path / "c")
    script = tmp_path / "run.py"
    config = f"_config(steps=6, checkpoint_every=3, batch_size=2, transformer={{**TINY_TRANSFORMER, 'context': {context!r}}})"
    script.write_text(
        "import sys, torch\n"
        "torch.set_num_threads(1)\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})\n"
        "from tests.train.test_flow_trainer import _config, TINY_TRANSFORMER\n"
        "import ctflow.train.flow_trainer as ft\n"
        "own = ft.chunk_loss\n"
        "def chunk_loss(*a, **k):  # each process's own loss, to check the logged one is their mean\n"
        "    loss = own(*a, **k)\n"
        f"    with open({str(tmp_path)!r} + f'/loss{{ft.torch.distributed.get_rank()}}', 'a') as f:\n"
        "        f.write(f'{loss.item()!r}\\n')\n"
        "    return loss\n"
        "ft.chunk_loss = chunk_loss\n"
        f"ft.train_flow({str(cache)!r}, {config}, {str(tmp_path / 'run')!r}, progress=False)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # its own process group: a timeout kills the workers too, not torchrun alone
    )
    try:
        _, stderr = proc.communicate(timeout=180)  # about 15 s when nothing hangs
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        log = (tmp_path / "run/log.jsonl").read_text() if (tmp_path / "run/log.jsonl").exists() else ""
        pytest.fail(f"two-process training did not exit within 180 s; its log:\n{log}")
    assert proc.returncode == 0, stderr[-3000:]
    records = [json.loads(x) for x in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert records[-1] == {"step": 6, "processes": 2, "replicas_identical": True}
    assert [p.name for p in (tmp_path / "run/checkpoints").iterdir()] == [
        "step_0000003",
        "step_0000006",
    ] or sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == ["step_0000003", "step_0000006"]
    assert len([r for r in records if r.get("step") == 5]) == 1  # one writer: no duplicated log lines
    own = [[float(x) for x in (tmp_path / f"loss{r}").read_text().split()] for r in (0, 1)]
    for record in records:
        if "loss" in record:  # the mean of both processes' losses at that step, not rank 0's alone
            step = record["step"] - 1
            assert record["loss"] == pytest.approx((own[0][step] + own[1][step]) / 2, abs=2e-6)
            assert own[0][step] != own[1][step]


def test_built_transformer_carries_the_cache_text_statistics(tmp_path):
    from ctflow.train.flow_trainer import build_transformer

    cache = LatentCache(make_fake_cache(tmp_path / "lat"))
    model = build_transformer(FlowTrainConfig(transformer=dict(TINY_TRANSFORMER)), cache)
    tokens = torch.cat([v.tokens for v in cache])
    pooled = torch.stack([v.pooled for v in cache])
    # read one volume at a time, the same moments as all features at once
    for stats, x in ((model.token_stats, tokens), (model.pooled_stats, pooled)):
        torch.testing.assert_close(stats[0], x.mean(0))
        torch.testing.assert_close(stats[1], x.std(0).clamp_min(float(x.std(0).mean()) * 0.1))


@pytest.mark.parametrize("meta_dropout", [0.0, 1.0])
def test_batches_carry_the_slice_count_unless_the_meta_line_was_dropped(tmp_path, meta_dropout):
    cache = LatentCache(make_fake_cache(tmp_path / "lat"))
    sampler = ChunkSampler(cache, 4, _config(meta_dropout=meta_dropout))
    g = torch.Generator().manual_seed(0)
    batch = sampler.batch(32, g)
    counts = {v.num_slices for v in cache}
    if meta_dropout:
        assert (batch["num_slices"] == 0).all()
        assert all(
            any(torch.equal(t[: len(v.tokens_nometa)], v.tokens_nometa) for v in cache)
            for t in batch["encoder_hidden_states"]
        )
    else:
        assert set(batch["num_slices"].tolist()) <= counts and (batch["num_slices"] > 0).all()


def test_short_reports_set_the_share_of_rows_reading_a_shortened_report(tmp_path):
    cache = LatentCache(make_fake_cache(tmp_path / "lat", report_variants=2))
    for share, lo, hi in ((0.0, 0.0, 0.0), (0.5, 0.4, 0.6), (1.0, 1.0, 1.0)):
        sampler = ChunkSampler(cache, 4, _config(short_reports=share, meta_dropout=0.0))
        batch = sampler.batch(300, torch.Generator().manual_seed(0))
        lengths = batch["encoder_attention_mask"].sum(1)  # full reports: 4-6 tokens; variant j: 10 + j
        short = lengths >= 10
        assert lo <= short.float().mean().item() <= hi
        if share:
            assert set(lengths[short].tolist()) == {10, 11}  # both variants are drawn
        assert (batch["num_slices"] > 0).all()  # a shortened report keeps its meta line
    # with the meta line dropped too, the row reads the variant's no-meta features
    batch = ChunkSampler(cache, 4, _config(short_reports=1.0, meta_dropout=1.0)).batch(
        8, torch.Generator().manual_seed(0)
    )
    nometa = {
        cache.tensor(i, f"tokens_short{j}_nometa")[0, 0].item() for i in range(len(cache)) for j in (0, 1)
    }
    assert all(t[0, 0].item() in nometa for t in batch["encoder_hidden_states"])
    assert (batch["num_slices"] == 0).all()


def test_short_reports_without_variants_in_the_cache_are_refused_with_the_fix(tmp_path):
    cache = LatentCache(make_fake_cache(tmp_path / "lat"))
    with pytest.raises(CTFlowError, match="--report-variants"):
        ChunkSampler(cache, 4, _config(short_reports=0.5))
    with pytest.raises(CTFlowError, match="short_reports"):
        _config(short_reports=1.5)


def _findings_cache(folder):
    """Volume i's full report names a left effusion on odd i; its shortened versions name a right one."""
    full = ["Left pleural effusion." if i % 2 else "No pleural effusion." for i in range(6)]
    return make_fake_cache(folder, report_variants=1, reports=[[r, "Right pleural effusion."] for r in full])


def test_batches_carry_the_finding_flags_of_the_report_text_each_row_reads(tmp_path):
    cache = LatentCache(_findings_cache(tmp_path / "lat"))
    full = ChunkSampler(cache, 4, _config(meta_dropout=0.0), num_findings=6).batch(64, torch.Generator())
    lengths = full["encoder_attention_mask"].sum(1)
    assert (lengths < 10).all()  # full reports only
    rows = full["findings"]
    assert rows.shape == (64, 6) and set(rows[:, 0].tolist()) == {0.0, 1.0} and not rows[:, 1:].any()
    short = ChunkSampler(cache, 4, _config(short_reports=1.0), num_findings=6).batch(16, torch.Generator())
    assert short["findings"].tolist() == [[0.0, 1.0, 0.0, 0.0, 0.0, 0.0]] * 16  # the right-sided variant
    plain = ChunkSampler(cache, 4, _config()).batch(4, torch.Generator())
    assert "findings" not in plain


def test_finding_dropout_sets_the_share_of_rows_with_unknown_flags(tmp_path):
    cache = LatentCache(_findings_cache(tmp_path / "lat"))
    for share, lo, hi in ((0.0, 0.0, 0.0), (0.3, 0.2, 0.4), (1.0, 1.0, 1.0)):
        batch = ChunkSampler(cache, 4, _config(finding_dropout=share), num_findings=6).batch(
            300, torch.Generator().manual_seed(0)
        )
        unknown = (batch["findings"] == -1).all(1)
        assert lo <= unknown.float().mean().item() <= hi
        assert ((batch["findings"] >= 0).all(1) | unknown).all()  # a row is all known or all unknown
    with pytest.raises(CTFlowError, match="finding_dropout"):
        _config(finding_dropout=-0.1)


def test_a_num_findings_other_than_the_report_flags_is_refused_with_the_fix(tmp_path):
    cache = LatentCache(_findings_cache(tmp_path / "lat"))
    with pytest.raises(CTFlowError, match="num_findings: 6"):
        ChunkSampler(cache, 4, _config(), num_findings=4)


def test_training_a_findings_model_learns_and_saves_it(tmp_path):
    from ctflow.models.transformer import CTFlowTransformer
    from ctflow.train.flow_trainer import build_transformer

    cache_dir = _findings_cache(tmp_path / "lat")
    transformer = {**TINY_TRANSFORMER, "num_findings": 6}
    cfg = _config(transformer=transformer, finding_dropout=0.2, steps=4, checkpoint_every=4)
    written = train_flow(cache_dir, cfg, tmp_path / "run", progress=False)
    assert written == tmp_path / "run" / "transformer"
    record = json.loads((written / "training.json").read_text())  # what assemble checks, wherever it goes
    assert record == {"latents": LatentCache(cache_dir).fingerprint, "step": cfg.steps, "steps": cfg.steps}
    model = CTFlowTransformer.from_pretrained(written)
    assert model.config.num_findings == 6
    torch.manual_seed(cfg.seed)  # the weights the run started from
    initial = build_transformer(cfg, LatentCache(cache_dir))
    assert not torch.allclose(model.finding_embedder[0].weight, initial.finding_embedder[0].weight)


def test_a_late_stage_samples_with_its_keys_from_its_step_on(tmp_path):
    cache = LatentCache(
        make_fake_cache(tmp_path / "c", n=8, finding_slices=CONTROL_FINDINGS, finding_masks=True)
    )
    late = {"from_step": 10, "finding_boost": 0.3, "finding_controls": 0.5, "finding_weight": 4.0}
    config = _config(late=LateConfig(**late))
    assert config.at_step(9) is config and config.stages()[0] is config
    stage = config.at_step(10)
    assert stage == _config(finding_boost=0.3, finding_controls=0.5, finding_weight=4.0) == config.stages()[1]
    sampler = ChunkSampler(cache, 4, config)  # the onsets and controls the late stage needs are ready
    assert sampler.onsets and sampler.controls
    g = torch.Generator().manual_seed(0)
    early = [sampler.draw(g, config.at_step(0)) for _ in range(2000)]
    later = [sampler.draw(g, stage) for _ in range(2000)]
    assert not any(d.region for d in early) and 0.1 < sum(d.region is not None for d in later) / 2000 < 0.2
    with pytest.raises(
        CTFlowError, match="finding_weight needs finding masks"
    ):  # checked for the late stage too
        ChunkSampler(
            LatentCache(make_fake_cache(tmp_path / "d", n=8, finding_slices=CONTROL_FINDINGS)), 4, config
        )


def test_a_late_stage_is_the_same_run_as_resuming_with_its_keys(tmp_path):
    """A run whose late stage starts at step 10 ends with the weights of a run stopped at step 10 and
    resumed with the late keys as its own: the fine-tune the late stage replaces."""
    found = {
        2: [{"type": "nodule", "first": 4, "last": 6}],
        4: [{"type": "effusion", "first": 9, "last": 14}],
    }
    cache = make_fake_cache(tmp_path / "c", finding_slices=found, finding_masks=True)
    keys = {"finding_boost": 0.3, "finding_controls": 0.5, "finding_weight": 4.0}
    train_flow(cache, _config(late=LateConfig(from_step=10, **keys)), tmp_path / "late", progress=False)
    train_flow(cache, _config(), tmp_path / "two", progress=False, stop_at=10)
    with pytest.warns(CTFlowWarning, match="finding_boost 0.0 -> 0.3"):  # the new keys, named
        train_flow(cache, _config(**keys), tmp_path / "two", progress=False, resume=True)
    train_flow(cache, _config(), tmp_path / "plain", progress=False)
    a, b, c = (
        load_file(tmp_path / f"{r}/transformer/diffusion_pytorch_model.safetensors")
        for r in ("late", "two", "plain")
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the late stage changed the run


def test_late_stage_errors_name_the_stage_and_the_fix():
    with pytest.raises(CTFlowError, match=r"late.from_step must be between 1 and steps - 1 \(19\)"):
        _config(late=LateConfig(from_step=20, finding_boost=0.2))
    with pytest.raises(CTFlowError, match="late stage .from step 5.: config key finding_controls replaces"):
        _config(late=LateConfig(from_step=5, finding_controls=0.5))
    with pytest.raises(CTFlowError, match="late.finding_weight must be a number"):
        LateConfig(from_step=5, finding_weight="ten")


@pytest.mark.parametrize("context", ["concat", "none"])
def test_one_pass_loss_equals_the_two_passes_in_value_and_gradient(tmp_path, context):
    from ctflow.train.flow_trainer import build_transformer, chunk_loss

    cache = LatentCache(make_fake_cache(tmp_path / "c"))
    config = _config(
        transformer={**TINY_TRANSFORMER, "context": context},
        start_boost=0.5,
        context_noise=0.2,
        cfg_dropout=0.3,
    )
    torch.manual_seed(0)
    model = build_transformer(config, cache)
    batch = ChunkSampler(cache, 4, config).batch(8, torch.Generator().manual_seed(1))
    assert batch["first"].any() and not batch["first"].all()
    # one pass gives start rows a zero context whatever the batch holds
    batch["context"][batch["first"]] = 1.0

    def run(one_pass):
        model.zero_grad()
        loss = chunk_loss(model, batch, torch.Generator().manual_seed(7), config, one_pass=one_pass)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    (two, grads2), (one, grads1) = run(False), run(True)
    assert one == pytest.approx(two, rel=1e-5)
    assert len(grads1) == len(grads2)
    for a, b in zip(grads1, grads2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    other = chunk_loss(model, batch, torch.Generator().manual_seed(8), config, one_pass=True).item()
    assert other != pytest.approx(one, rel=1e-3)  # the draws come from the generator


def test_the_benchmarks_synthetic_cache_feeds_the_shipped_config(tmp_path):
    # benchmarks/train_throughput.py falls back to it; it once lacked what finding flags and weights need
    from ctflow.train.config import load_config
    from ctflow.train.flow_trainer import build_transformer, chunk_loss
    from tests.benchmark_module import load_benchmark

    root = Path(__file__).resolve().parents[2]
    common = load_benchmark("common")
    config = load_config(root / "configs" / "tiny-phantom.yaml", FlowTrainConfig)
    cache = LatentCache(common.synthetic_cache(tmp_path / "c", n=4, report_variants=4, finding_masks=True))
    model = build_transformer(config, cache)
    sampler = ChunkSampler(cache, model.config.chunk_slices, config, model.config.num_findings)
    g = torch.Generator().manual_seed(0)
    batch = sampler.batch(4, g)
    assert batch["findings"].shape == (4, model.config.num_findings) and batch["weight"].min() >= 1
    assert torch.isfinite(chunk_loss(model, batch, g, config, one_pass=True))


def test_a_batch_is_drawn_on_the_cpu_and_moved_to_the_device(tmp_path):
    """The same draws whatever the device; every tensor then lands on it ("meta" stands in for a GPU)."""
    cache = LatentCache(make_fake_cache(tmp_path / "c"))
    sampler = ChunkSampler(cache, 4, _config(context_noise=0.05))
    cpu = sampler.batch(4, torch.Generator().manual_seed(0))
    moved = sampler.batch(4, torch.Generator().manual_seed(0), device="meta")
    assert moved.keys() == cpu.keys()
    for key in cpu:
        assert moved[key].device.type == "meta" and moved[key].shape == cpu[key].shape, key


def test_the_loss_makes_its_tensors_on_the_batch_device(tmp_path):
    """Times, noise and the guidance dropout are drawn on the batch's device (checked on the CPU)."""
    from tests.device_watch import tensors_made_without_a_device

    cache = LatentCache(make_fake_cache(tmp_path / "c"))
    for context in ("concat", "tokens"):
        cfg = _config(transformer={**TINY_TRANSFORMER, "context": context}, cfg_dropout=0.5)
        model = build_transformer(cfg, cache)
        batch = ChunkSampler(cache, model.config.chunk_slices, cfg).batch(4, torch.Generator().manual_seed(0))
        watched = ("ctflow/flow.py", "ctflow/train/flow_trainer.py", "ctflow/models/transformer.py")
        with tensors_made_without_a_device(*watched) as undevised:
            loss = chunk_loss(
                model, batch, torch.Generator().manual_seed(1), cfg, one_pass=context != "tokens"
            )
        assert torch.isfinite(loss) and not undevised, (context, undevised)


def test_training_puts_batches_and_the_ema_on_the_accelerator_device(tmp_path, monkeypatch):
    from ctflow.train.utils import EMA

    devices = {"batch": [], "ema": []}
    batch, to = ChunkSampler.batch, EMA.to

    def spy_batch(self, *args, device=None, **kwargs):
        devices["batch"].append(device)
        return batch(self, *args, device=device, **kwargs)

    def spy_to(self, device):
        devices["ema"].append(device)
        return to(self, device)

    monkeypatch.setattr(ChunkSampler, "batch", spy_batch)
    monkeypatch.setattr(EMA, "to", spy_to)
    train_flow(make_fake_cache(tmp_path / "c"), _config(steps=2), tmp_path / "run", progress=False)
    assert devices["batch"] == [torch.device("cpu")] * 2 and devices["ema"] == [torch.device("cpu")]


def test_the_ema_follows_the_model_to_its_device():
    from ctflow.train.utils import EMA

    model = torch.nn.Linear(3, 2)
    ema = EMA(model, 0.9).to("meta")
    model.to("meta")
    ema.update(model)  # would fail with the shadow left on the CPU
    assert all(v.device.type == "meta" for v in ema.state_dict().values())


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state, fixed by the first Accelerator (here: no mixed
    precision); a run with another precision needs it reset, before and after."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_the_full_size_recipe_runs_at_tiny_width(tmp_path, fresh_accelerate_state):
    """configs/ctrate-512.yaml as it stands (tokens context, 16-slice chunks, patch 2x2x2, bf16 mixed
    precision, gradient checkpointing, EMA 0.9999) with only the transformer's width, depth and text
    width shrunk to the fake cache: two steps train, checkpoint and write a loadable transformer."""
    import dataclasses

    from ctflow.models.transformer import CTFlowTransformer
    from ctflow.train.config import load_config

    cfg = load_config(Path(__file__).parents[2] / "configs" / "ctrate-512.yaml", FlowTrainConfig)
    assert cfg.mixed_precision == "bf16" and cfg.gradient_checkpointing
    small = {**cfg.transformer, "hidden_size": 32, "depth": 2, "num_heads": 2, "text_dim": 16}
    cfg = dataclasses.replace(
        cfg,
        transformer=small,
        steps=2,
        batch_size=2,
        log_every=1,
        checkpoint_every=2,
        optim=dataclasses.replace(cfg.optim, warmup_steps=1),
    )
    run = tmp_path / "run"
    model = CTFlowTransformer.from_pretrained(
        train_flow(make_fake_cache(tmp_path / "c"), cfg, run, progress=False)
    )
    assert model.config.context == "tokens" and model.config.chunk_slices == 16
    losses = [json.loads(x)["loss"] for x in (run / "log.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize(("key", "value"), [("sample_size", 16), ("in_channels", 16)])
def test_a_transformer_shape_that_does_not_fit_the_cache_is_refused_before_the_run_folder(
    tmp_path, key, value
):
    """Found at the first step, after config.json was written: the fixed rerun was then refused."""
    cache = make_fake_cache(tmp_path / "c")  # 4 channels of 8 x 8
    cfg = _config(transformer={**TINY_TRANSFORMER, key: value})
    with pytest.raises(
        CTFlowError, match=f"transformer.{key} is 16 but the latent cache's latents are 4 channels of 8x8"
    ):
        train_flow(cache, cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_cli_resume_of_a_finished_run_says_nothing_was_rewritten(tmp_path, run_cli):
    from dataclasses import asdict

    cache = make_fake_cache(tmp_path / "c")
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(asdict(_config(steps=4, checkpoint_every=4))))  # JSON is YAML
    args = ("train", "--latents", cache, "--config", config, "--out", tmp_path / "run")
    first = run_cli(*args)
    assert first.code == 0, first.err
    assert f"wrote {tmp_path / 'run' / 'transformer'}" in " ".join(first.err.split())
    weights = tmp_path / "run/transformer/diffusion_pytorch_model.safetensors"
    before = weights.stat().st_mtime_ns
    again = run_cli(*args, "--resume")
    assert again.code == 0, again.err
    said = " ".join(again.err.split())
    assert "wrote" not in said and "had finished its 4 steps" in said
    assert weights.stat().st_mtime_ns == before
