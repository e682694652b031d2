import pytest
import torch

from ctflow.errors import CTFlowError
from ctflow.flow import (
    cfg_condition,
    context_cache_for,
    context_noise,
    drop_condition,
    flow_matching_loss,
    guided_velocity,
    interpolate,
    make_scheduler,
    null_condition,
    sample_chunk,
    sample_time,
    text_cache_for,
)
from ctflow.models.transformer import CTFlowTransformer

SHAPE = (2, 3, 4, 5, 5)


pytestmark = pytest.mark.usefixtures("one_thread")


def make_cond(batch=2, length=6, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, 3:] = 0
    return {
        "encoder_hidden_states": torch.randn(batch, length, dim, generator=g),
        "encoder_attention_mask": mask,
        "pooled_text": torch.randn(batch, dim, generator=g),
        "chunk_index": torch.arange(batch),
        "context": None,
    }


class FakeModel:
    """Velocity from a closure; counts forwards, their batch sizes and context-cache computations."""

    def __init__(self, velocity):
        self.velocity = velocity
        self.batches = []
        self.cache_calls = 0

    def __call__(self, x, t, context_cache=None, **cond):
        self.batches.append(x.shape[0])
        assert context_cache == ("cache", x.shape[0])
        return self.velocity(x, t, cond)

    def compute_context_cache(
        self,
        context,
        encoder_hidden_states,
        encoder_attention_mask,
        pooled_text,
        chunk_index,
        num_slices=None,
        findings=None,
    ):
        self.cache_calls += 1
        return ("cache", pooled_text.shape[0])


def oracle(x0):
    """The exact velocity of the straight path through x0: (x_t - x0) / t."""
    return lambda x, t, cond: (x - x0) / t.view(-1, 1, 1, 1, 1)


def test_interpolation_endpoints_and_midpoint():
    x0, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    torch.testing.assert_close(interpolate(x0, noise, torch.zeros(2)), x0)
    torch.testing.assert_close(interpolate(x0, noise, torch.ones(2)), noise)
    torch.testing.assert_close(
        interpolate(x0, noise, torch.tensor([0.5, 0.25]))[1], 0.75 * x0[1] + 0.25 * noise[1]
    )


def test_loss_is_zero_for_the_oracle_velocity_and_positive_otherwise():
    x0, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    loss, logs = flow_matching_loss(lambda x, t, **cond: noise - x0, x0, make_cond(), noise=noise)
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    assert logs["loss_per_sample"].shape == (2,) and logs["t"].shape == (2,)
    loss, _ = flow_matching_loss(lambda x, t, **cond: torch.zeros_like(x), x0, make_cond(), noise=noise)
    assert loss.item() == pytest.approx((noise - x0).pow(2).mean().item())


def test_sample_loss_space_weights_each_rows_velocity_error_by_t_squared():
    x0, noise, t = torch.randn(SHAPE), torch.randn(SHAPE), torch.tensor([0.9, 0.2])

    def model(x, t, **cond):
        return torch.zeros_like(x)

    _, logs = flow_matching_loss(model, x0, make_cond(), t=t, noise=noise)
    loss, _ = flow_matching_loss(model, x0, make_cond(), t=t, noise=noise, loss_space="sample")
    per_row = (noise - x0).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(logs["loss_per_sample"], per_row)
    assert loss.item() == pytest.approx((t**2 * per_row).mean().item(), rel=1e-6)
    # the x0 the velocity implies (x_t - t v) is off by t * (velocity error): its MSE is this loss
    implied = interpolate(x0, noise, t) - t.view(-1, 1, 1, 1, 1) * model(x0, t)
    assert loss.item() == pytest.approx((implied - x0).pow(2).flatten(1).mean(1).mean().item(), rel=1e-5)
    with pytest.raises(CTFlowError, match="loss space 'x0'; choose 'velocity' or 'sample'$"):
        flow_matching_loss(model, x0, make_cond(), loss_space="x0")


def test_loss_weight_scales_each_elements_squared_error():
    x0, noise, t = torch.randn(SHAPE), torch.randn(SHAPE), torch.tensor([0.9, 0.2])

    def model(x, t, **cond):
        return torch.zeros_like(x)

    err = (noise - x0).pow(2)
    weight = torch.ones(SHAPE[0], 1, *SHAPE[2:])
    weight[0, :, 0] = 4.0  # the first slice of row 0 counts 4x, in every channel
    for space, row in (("velocity", torch.ones(2)), ("sample", t**2)):
        loss, logs = flow_matching_loss(
            model, x0, make_cond(), t=t, noise=noise, loss_space=space, weight=weight
        )
        expected = ((err * weight).flatten(1).mean(1) * row).mean()
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
        torch.testing.assert_close(logs["loss_per_sample"], err.flatten(1).mean(1))  # logs stay unweighted
    ones, _ = flow_matching_loss(model, x0, make_cond(), t=t, noise=noise, weight=torch.ones(SHAPE))
    plain, _ = flow_matching_loss(model, x0, make_cond(), t=t, noise=noise)
    assert torch.equal(ones, plain)


def test_time_mean_moves_training_times_towards_noise():
    g = torch.Generator().manual_seed(0)
    _, logs = flow_matching_loss(
        lambda x, t, **c: x, torch.randn(512, 1, 1, 1, 1), make_cond(512), generator=g
    )
    _, shifted = flow_matching_loss(
        lambda x, t, **c: x, torch.randn(512, 1, 1, 1, 1), make_cond(512), generator=g, time_mean=1.0
    )
    assert logs["t"].median() == pytest.approx(0.5, abs=0.05)
    assert shifted["t"].median() == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item(), abs=0.05)


def test_loss_is_deterministic_with_a_generator():
    x0 = torch.randn(SHAPE)

    def model(x, t, **cond):
        return x * t.view(-1, 1, 1, 1, 1)

    a = flow_matching_loss(model, x0, make_cond(), generator=torch.Generator().manual_seed(5))[0]
    b = flow_matching_loss(model, x0, make_cond(), generator=torch.Generator().manual_seed(5))[0]
    assert a.item() == b.item()


def test_sample_time_ranges_and_determinism():
    for distribution in ("logit_normal", "uniform"):
        t = sample_time(4096, torch.Generator().manual_seed(0), distribution)
        assert t.shape == (4096,) and (t > 0).all() and (t < 1).all()
        assert abs(t.mean().item() - 0.5) < 0.02
        torch.testing.assert_close(t, sample_time(4096, torch.Generator().manual_seed(0), distribution))
    logit = sample_time(4096, torch.Generator().manual_seed(0))
    assert ((logit - 0.5).abs() < 0.25).float().mean() > 0.6  # logit-normal puts its mass in the middle
    with pytest.raises(CTFlowError, match="distribution 'beta'; choose 'logit_normal' or 'uniform'$"):
        sample_time(2, distribution="beta")


@pytest.mark.parametrize("steps", [1, 4, 25])
def test_euler_with_the_oracle_velocity_recovers_x0(steps):
    x0 = torch.randn(SHAPE)
    model = FakeModel(oracle(x0))
    out = sample_chunk(
        model, make_scheduler("euler"), SHAPE, make_cond(), steps, generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=1e-5)
    assert model.batches == [2] * steps


@pytest.mark.parametrize("steps", [0, 1.5, True])
def test_a_step_count_that_is_not_a_whole_number_above_zero_is_refused(steps):
    """0 steps returned the starting noise as the chunk."""
    model = FakeModel(oracle(torch.randn(SHAPE)))
    with pytest.raises(CTFlowError, match="num_inference_steps must be a whole number at least 1"):
        sample_chunk(model, make_scheduler("euler"), SHAPE, make_cond(), steps)


def test_heun_with_the_oracle_velocity_recovers_x0_and_reports_each_interval_once():
    x0 = torch.randn(SHAPE)
    model = FakeModel(oracle(x0))
    steps = []
    out = sample_chunk(model, make_scheduler("heun"), SHAPE, make_cond(), 5, callback=steps.append)
    # the schedule ends at sigma 0 (a plain Euler step), so the oracle lands on x0
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=1e-5)
    assert len(model.batches) == 2 * 5 - 1  # two evaluations per interval but the last
    assert steps == [0, 1, 2, 3, 4]  # progress reads i / 5, not up to 9 / 5


@pytest.mark.parametrize(("sampler", "steps"), [("euler", 64), ("euler", 20), ("heun", 4), ("heun", 25)])
def test_an_x_prediction_model_is_not_evaluated_below_min_t_and_lands_on_its_clean_chunk(sampler, steps):
    """Its velocity is clamped at MIN_T, as it trained: evaluated below, a step moved only t / MIN_T of the
    way and the chunk kept part of the starting noise (Heun's correction at t = 0.001: up to 13%)."""
    from types import SimpleNamespace

    from ctflow.models.transformer import MIN_T

    x0, times = torch.randn(SHAPE), []

    def clamped(x, t, cond):
        times.extend(t.tolist())
        return (x - x0) / t.clamp_min(MIN_T).view(-1, 1, 1, 1, 1)

    model = FakeModel(clamped)
    model.config = SimpleNamespace(prediction="sample")
    progress = []
    out = sample_chunk(
        model,
        make_scheduler(sampler),
        SHAPE,
        make_cond(),
        steps,
        callback=progress.append,
        generator=torch.Generator().manual_seed(1),
    )
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=1e-5)
    assert min(times) >= MIN_T
    assert progress == list(range(steps))  # the progress bar still counts the steps asked for


def test_unknown_sampler_raises():
    with pytest.raises(CTFlowError, match="sampler 'dpm'; choose 'euler' or 'heun'$"):
        make_scheduler("dpm")


def test_cfg_scale_one_is_the_conditional_velocity_in_one_forward():
    model = FakeModel(lambda x, t, cond: x + cond["pooled_text"].mean(1).view(-1, 1, 1, 1, 1))
    x, t, cond = torch.randn(SHAPE), torch.rand(2), make_cond()
    uncond = null_condition(cond)
    v = guided_velocity(model, x, t, cond, uncond, 1.0, context_cache=("cache", 2))
    torch.testing.assert_close(v, model.velocity(x, t, cond))
    assert model.batches == [2]


def test_cfg_runs_cond_and_uncond_in_one_batched_forward():
    model = FakeModel(lambda x, t, cond: x + cond["pooled_text"].mean(1).view(-1, 1, 1, 1, 1))
    x, t, cond = torch.randn(SHAPE), torch.rand(2), make_cond()
    uncond = null_condition(cond)
    v = guided_velocity(model, x, t, cond, uncond, 3.0, context_cache=("cache", 4))
    v_c, v_u = model.velocity(x, t, cond), model.velocity(x, t, uncond)
    torch.testing.assert_close(v, v_u + 3.0 * (v_c - v_u))
    assert model.batches == [4]
    # below 1 too: 0 is the unconditional velocity, 0.5 halfway (both were taken as 1)
    torch.testing.assert_close(guided_velocity(model, x, t, cond, uncond, 0.0, ("cache", 4)), v_u)
    torch.testing.assert_close(guided_velocity(model, x, t, cond, uncond, 0.5, ("cache", 4)), (v_u + v_c) / 2)
    torch.testing.assert_close(guided_velocity(model, x, t, cond, uncond, 1.0, ("cache", 2)), v_c)


def flag_velocity(x, t, cond):
    """A fake velocity that reads the text and, separately, the finding flags (unknown: -1)."""
    flags = cond["findings"].clamp_min(0).sum(1) * (cond["findings"] >= 0).all(1)
    return x + cond["pooled_text"].mean(1).view(-1, 1, 1, 1, 1) + flags.view(-1, 1, 1, 1, 1)


def test_finding_guidance_splits_the_guidance_between_the_text_and_the_flags():
    model = FakeModel(flag_velocity)
    x, t = torch.randn(SHAPE), torch.rand(2)
    cond = {**make_cond(), "findings": torch.tensor([[1.0, 0.0], [0.0, 1.0]])}
    uncond = null_condition(cond)
    flagless = {**cond, "findings": -torch.ones(2, 2)}
    v_c, v_f, v_u = (model.velocity(x, t, c) for c in (cond, flagless, uncond))
    v = guided_velocity(model, x, t, cond, uncond, 2.0, ("cache", 6), finding_scale=5.0)
    torch.testing.assert_close(v, v_u + 2.0 * (v_f - v_u) + 5.0 * (v_c - v_f))
    assert model.batches == [6]  # one forward over [cond; flagless; uncond]
    # equal scales are plain guidance, in one forward of two
    same = guided_velocity(model, x, t, cond, uncond, 2.0, ("cache", 4), finding_scale=2.0)
    torch.testing.assert_close(same, guided_velocity(model, x, t, cond, uncond, 2.0, ("cache", 4)))
    # without text guidance, only the flags are guided
    v = guided_velocity(model, x, t, cond, None, 1.0, ("cache", 4), finding_scale=3.0)
    torch.testing.assert_close(v, v_f + 3.0 * (v_c - v_f))
    # a condition without flags ignores the finding scale
    plain, text_model = (
        make_cond(),
        FakeModel(lambda x, t, cond: x + cond["pooled_text"].mean(1).view(-1, 1, 1, 1, 1)),
    )
    v = guided_velocity(text_model, x, t, plain, null_condition(plain), 2.0, ("cache", 4), finding_scale=5.0)
    torch.testing.assert_close(
        v, guided_velocity(text_model, x, t, plain, null_condition(plain), 2.0, ("cache", 4))
    )
    cache_model = FakeModel(flag_velocity)
    sample_chunk(cache_model, make_scheduler(), SHAPE, cond, 3, 2.0, uncond=uncond, finding_scale=4.0)
    assert cache_model.cache_calls == 1 and cache_model.batches == [6] * 3


def test_sample_chunk_computes_the_cache_once_and_one_forward_per_step():
    model = FakeModel(lambda x, t, cond: 0.1 * x)
    cond = make_cond()
    sample_chunk(model, make_scheduler(), SHAPE, cond, 6, guidance_scale=4.0, uncond=null_condition(cond))
    assert model.cache_calls == 1 and model.batches == [4] * 6
    steps = []
    sample_chunk(model, make_scheduler(), SHAPE, cond, 3, callback=steps.append)
    assert model.cache_calls == 2 and steps == [0, 1, 2]


def test_sample_chunk_rejects_a_batch_mismatch():
    with pytest.raises(CTFlowError, match="batch"):
        sample_chunk(FakeModel(lambda x, t, cond: x), make_scheduler(), (3, *SHAPE[1:]), make_cond(), 2)


def test_null_and_dropped_conditions():
    cond = make_cond(batch=4)
    null = null_condition(cond)
    assert not null["encoder_hidden_states"].any() and not null["pooled_text"].any()
    assert null["encoder_attention_mask"].tolist() == [[1, 0, 0, 0, 0, 0]] * 4
    assert drop_condition(cond, 0.0) is cond
    for key in ("encoder_hidden_states", "encoder_attention_mask", "pooled_text"):
        torch.testing.assert_close(drop_condition(cond, 1.0)[key], null[key])
    cond = make_cond(batch=2000, seed=1)
    dropped = drop_condition(cond, 0.25, torch.Generator().manual_seed(0))
    fraction = (dropped["pooled_text"] == 0).all(1).float().mean().item()
    assert 0.2 < fraction < 0.3
    rows = (dropped["pooled_text"] == 0).all(1)
    assert (dropped["encoder_attention_mask"][rows].sum(1) == 1).all()
    torch.testing.assert_close(
        dropped["encoder_attention_mask"][~rows], cond["encoder_attention_mask"][~rows]
    )
    torch.testing.assert_close(dropped["encoder_hidden_states"][~rows], cond["encoder_hidden_states"][~rows])
    torch.testing.assert_close(dropped["chunk_index"], torch.arange(2000))


def test_null_and_dropped_conditions_make_the_finding_flags_unknown_with_the_text():
    cond = {**make_cond(batch=400), "findings": torch.randint(0, 2, (400, 6)).float()}
    assert (null_condition(cond)["findings"] == -1).all()
    assert "findings" not in null_condition(make_cond())  # a condition without flags gets none
    dropped = drop_condition(cond, 0.5, torch.Generator().manual_seed(0))
    rows = (dropped["pooled_text"] == 0).all(1)
    assert 0.35 < rows.float().mean() < 0.65
    assert (dropped["findings"][rows] == -1).all()
    torch.testing.assert_close(dropped["findings"][~rows], cond["findings"][~rows])


def test_cfg_condition_pads_text_of_different_lengths():
    cond, short = make_cond(length=6), make_cond(length=2, seed=1)
    both = cfg_condition(cond, short)
    assert both["encoder_hidden_states"].shape == (4, 6, 8) and both["context"] is None
    assert both["encoder_attention_mask"][2:, 2:].sum() == 0
    torch.testing.assert_close(both["chunk_index"], torch.tensor([0, 1, 0, 1]))


def test_context_noise():
    context = torch.zeros(2, 3, 4, 16, 16)
    a = context_noise(context, 0.05, torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, context_noise(context, 0.05, torch.Generator().manual_seed(0)))
    assert abs(a.std().item() - 0.05) < 0.005
    assert context_noise(None) is None
    assert context_noise(context, 0.0) is context
    per_row = context_noise(context, torch.tensor([0.0, 0.5]), torch.Generator().manual_seed(0))
    assert per_row[0].eq(0).all() and abs(per_row[1].std().item() - 0.5) < 0.05


@pytest.mark.parametrize("context", ["tokens", "concat"])
def test_sample_chunk_with_a_tiny_transformer(context):
    torch.manual_seed(0)
    model = CTFlowTransformer(
        in_channels=3,
        sample_size=4,
        chunk_slices=4,
        hidden_size=32,
        depth=2,
        num_heads=4,
        text_dim=8,
        context=context,
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.1)
    calls, text_calls = [], []
    compute, compute_text = model.compute_context_cache, model.compute_text_cache
    model.compute_context_cache = lambda *args, **kw: calls.append(1) or compute(*args, **kw)
    model.compute_text_cache = lambda *args: text_calls.append(1) or compute_text(*args)
    cond = {**make_cond(), "context": torch.randn(2, 3, 4, 4, 4)}
    shape = (2, 3, 4, 4, 4)
    out = sample_chunk(
        model, make_scheduler(), shape, cond, 3, 2.0, torch.Generator().manual_seed(0), null_condition(cond)
    )
    assert out.shape == shape and torch.isfinite(out).all() and len(calls) == len(text_calls) == 1
    # the report's keys/values, computed once, give the velocity that projecting them every step gives
    x, t = torch.randn(shape), torch.full((2,), 0.7)
    text = text_cache_for(model, cond, null_condition(cond), 2.0)
    assert text.mask.shape == (4, cond["encoder_attention_mask"].shape[1])  # [cond; uncond]
    with torch.no_grad():
        cached = guided_velocity(model, x, t, cond, null_condition(cond), 2.0, text_cache=text)
        fresh = guided_velocity(model, x, t, cond, null_condition(cond), 2.0)
    torch.testing.assert_close(cached, fresh, atol=1e-5, rtol=0)
    if context == "tokens":  # the cached sampler equals the one that recomputes the context every step
        x, t = torch.randn(shape), torch.full((2,), 0.7)
        cache = context_cache_for(model, cond, null_condition(cond), 2.0)
        with torch.no_grad():
            cached = guided_velocity(model, x, t, cond, null_condition(cond), 2.0, context_cache=cache)
            fresh = guided_velocity(model, x, t, cond, null_condition(cond), 2.0)
        torch.testing.assert_close(cached, fresh, atol=1e-5, rtol=0)
