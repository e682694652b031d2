import time

import pytest
import torch

from ctflow.errors import CTFlowError
from ctflow.models.transformer import (
    MIN_T,
    TRANSFORMER_PRESETS,
    CTFlowBlock,
    CTFlowTransformer,
    TextCache,
    count_params,
    forward_flops,
    pool_tokens,
    preset_config,
)

C, S, HW, TEXT_DIM, L = 4, 4, 8, 16, 6
MODES = [(a, c) for a in ("full", "factorized") for c in ("concat", "tokens")]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(attention="full", context="tokens", randomize=True, **kw):
    torch.manual_seed(0)
    cfg = dict(
        in_channels=C, sample_size=HW, chunk_slices=S, hidden_size=32, depth=2, num_heads=4, text_dim=TEXT_DIM
    )
    model = CTFlowTransformer(**{**cfg, **kw}, attention=attention, context=context).eval()
    if randomize:  # adaLN-Zero makes every output 0: give the zeroed weights some signal
        with torch.no_grad():
            for p in model.parameters():
                if not p.any():
                    p.normal_(std=0.1)
    return model


def make_inputs(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, L)
    mask[0, 4:] = 0
    return {
        "hidden_states": torch.randn(batch, C, S, HW, HW, generator=g),
        "timestep": torch.rand(batch, generator=g),
        "encoder_hidden_states": torch.randn(batch, L, TEXT_DIM, generator=g),
        "encoder_attention_mask": mask,
        "pooled_text": torch.randn(batch, TEXT_DIM, generator=g),
        "chunk_index": torch.tensor([0, 3])[:batch],
        "context": torch.randn(batch, C, S, HW, HW, generator=g),
    }


def run(model, **inputs):
    with torch.no_grad():
        return model(**inputs).sample


@pytest.mark.parametrize("attention,context", MODES)
def test_output_shape_matches_input_with_and_without_context(attention, context):
    model = make_model(attention, context)
    inputs = make_inputs()
    assert run(model, **inputs).shape == inputs["hidden_states"].shape
    first = run(model, **{**inputs, "context": None})
    assert first.shape == inputs["hidden_states"].shape and torch.isfinite(first).all()


@pytest.mark.parametrize("attention,context", MODES)
def test_adaln_zero_init_gives_exactly_zero_output(attention, context):
    out = run(make_model(attention, context, randomize=False), **make_inputs())
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("attention", ["full", "factorized"])
@pytest.mark.parametrize("first_chunk", [False, True])
def test_forward_with_precomputed_cache_equals_forward_without(attention, first_chunk):
    model = make_model(attention, "tokens")
    inputs = make_inputs()
    if first_chunk:
        inputs["context"] = None
    with torch.no_grad():
        cache = model.compute_context_cache(
            inputs["context"],
            inputs["encoder_hidden_states"],
            inputs["encoder_attention_mask"],
            inputs["pooled_text"],
            inputs["chunk_index"],
        )
        cached = model(**{**inputs, "context": None}, context_cache=cache).sample
    assert len(cache.kv) == 2
    torch.testing.assert_close(cached, run(model, **inputs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("attention", ["full", "factorized"])
def test_context_stream_is_not_affected_by_chunk_tokens(attention):
    model = make_model(attention, "tokens")
    caches = []
    compute = model._context_cache
    model._context_cache = lambda *args: caches.append(compute(*args)) or caches[-1]
    inputs = make_inputs()
    out_a = run(model, **inputs)
    out_b = run(
        model,
        **{
            **inputs,
            "hidden_states": torch.randn_like(inputs["hidden_states"]),
            "timestep": 1 - inputs["timestep"],
        },
    )
    assert not torch.allclose(out_a, out_b)
    for (k_a, v_a), (k_b, v_b) in zip(caches[0].kv, caches[1].kv, strict=True):
        assert torch.equal(k_a, k_b) and torch.equal(v_a, v_b)


@pytest.mark.parametrize("attention,context", MODES)
def test_context_changes_output(attention, context):
    model = make_model(attention, context)
    inputs = make_inputs()
    out = run(model, **inputs)
    assert not torch.allclose(out, run(model, **{**inputs, "context": torch.randn_like(inputs["context"])}))
    assert not torch.allclose(out, run(model, **{**inputs, "context": None}))


def test_concat_mode_rejects_a_context_cache():
    model = make_model("full", "concat")
    inputs = make_inputs()
    text = (inputs["encoder_hidden_states"], inputs["encoder_attention_mask"], inputs["pooled_text"])
    assert model.compute_context_cache(inputs["context"], *text, inputs["chunk_index"]) is None
    with pytest.raises(CTFlowError, match="context_cache"):
        model(**inputs, context_cache=object())


def test_factorized_spatial_step_keeps_slices_apart_and_temporal_step_keeps_positions_apart():
    torch.manual_seed(0)
    block = CTFlowBlock(32, 4, 4.0, factorized=True, qk_norm=False).eval()
    slices, positions = 4, 9
    grid = (slices, positions)
    h = torch.randn(2, slices * positions, 32)
    changed = h.view(2, slices, positions, 32).clone()
    changed[:, 1] += 1.0  # perturb every token of slice 1
    with torch.no_grad():
        a = block.spatial_attention(h, grid).view(2, slices, positions, 32)
        b = block.spatial_attention(changed.view_as(h), grid).view(2, slices, positions, 32)
    assert not torch.allclose(a[:, 1], b[:, 1])
    torch.testing.assert_close(a[:, [0, 2, 3]], b[:, [0, 2, 3]], atol=0, rtol=0)

    changed = h.view(2, slices, positions, 32).clone()
    changed[:, :, 5] += 1.0  # perturb spatial position 5 in every slice
    with torch.no_grad():
        a = block.temporal_attention(h, grid)[0].view(2, slices, positions, 32)
        b = block.temporal_attention(changed.view_as(h), grid)[0].view(2, slices, positions, 32)
    others = [p for p in range(positions) if p != 5]
    assert not torch.allclose(a[:, :, 5], b[:, :, 5])
    torch.testing.assert_close(a[:, :, others], b[:, :, others], atol=0, rtol=0)


@pytest.mark.parametrize("attention,context", MODES)
def test_padded_text_tokens_are_ignored(attention, context):
    model = make_model(attention, context)
    inputs = make_inputs()
    text = inputs["encoder_hidden_states"].clone()
    text[0, 4:] = 100.0  # sample 0's padded tokens
    torch.testing.assert_close(run(model, **{**inputs, "encoder_hidden_states": text}), run(model, **inputs))
    text[0, :4] += 1.0  # its real tokens do matter
    assert not torch.allclose(run(model, **{**inputs, "encoder_hidden_states": text}), run(model, **inputs))


def test_pool_tokens_averages_runs_of_real_tokens_and_leaves_padding_out():
    tokens = torch.arange(2 * 7 * 2, dtype=torch.float32).view(2, 7, 2)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]])
    pooled, keep = pool_tokens(tokens, mask, 3)
    assert pooled.shape == (2, 3, 2)  # 7 tokens -> runs of 3, 3 and 1
    torch.testing.assert_close(pooled[0, 0], tokens[0, :3].mean(0))
    torch.testing.assert_close(pooled[0, 2], tokens[0, 6])  # the short last run: its own mean
    torch.testing.assert_close(pooled[1, 1], tokens[1, 3:5].mean(0))  # padding left out of the mean
    assert keep.tolist() == [[True, True, True], [True, True, False]]
    same, same_keep = pool_tokens(tokens, mask, 1)
    assert same is tokens and same_keep.tolist() == mask.bool().tolist()


@pytest.mark.parametrize("context", ["concat", "tokens"])
def test_text_pool_reads_pooled_text_and_still_ignores_padding(tmp_path, context):
    model = make_model("full", context, text_pool=2)
    inputs = make_inputs()
    text = inputs["encoder_hidden_states"].clone()
    text[0, 4:] = 100.0  # sample 0's padded tokens
    torch.testing.assert_close(run(model, **{**inputs, "encoder_hidden_states": text}), run(model, **inputs))
    swapped = inputs["encoder_hidden_states"].clone()
    swapped[:, [0, 1]] = swapped[:, [1, 0]]  # order within a run of 2 is lost in its mean
    torch.testing.assert_close(
        run(model, **{**inputs, "encoder_hidden_states": swapped}), run(model, **inputs)
    )
    swapped[:, [1, 2]] = swapped[:, [2, 1]]  # across runs it is not
    assert not torch.allclose(
        run(model, **{**inputs, "encoder_hidden_states": swapped}), run(model, **inputs)
    )
    model.save_pretrained(tmp_path)
    loaded = CTFlowTransformer.from_pretrained(tmp_path).eval()
    assert loaded.config.text_pool == 2
    torch.testing.assert_close(run(loaded, **inputs), run(model, **inputs))
    for bad in (0, 1.5):
        with pytest.raises(CTFlowError, match="text_pool"):
            make_model(text_pool=bad)


def per_block_text_cache(model, tokens, mask):
    """The report's keys/values as each block's kv layer would give them over every token, padding too."""
    tm, ts = model.token_stats
    text, mask = pool_tokens((tokens - tm) / ts, mask, model.config.text_pool)
    text = model.text_embedder(text)
    b, length = mask.shape
    kv = [
        blk.cross_attn.kv(text)
        .view(b, length, 2, model.config.num_heads, -1)
        .permute(2, 0, 3, 1, 4)
        .unbind(0)
        for blk in model.blocks
    ]
    return TextCache(kv, mask)


@pytest.mark.parametrize("attention,context", MODES)
@pytest.mark.parametrize("text_pool", [1, 2])
def test_text_cache_projects_only_real_tokens_with_the_same_output_and_gradients(
    attention, context, text_pool
):
    model = make_model(attention, context, text_pool=text_pool).train()
    inputs = make_inputs()
    inputs["encoder_hidden_states"][0, 4:] = 100.0  # padding, which must not matter
    text = (inputs["encoder_hidden_states"], inputs["encoder_attention_mask"])
    cache = model.compute_text_cache(*text)
    k, v = cache.kv[1]
    assert len(cache.kv) == 2 and k.shape == v.shape == (2, 4, L // text_pool, 8)
    assert not k[0, :, 4 // text_pool :].any() and k[1].abs().sum(-1).all()  # padding zero, real tokens not
    outputs, grads = [], []
    for text_cache in (None, per_block_text_cache(model, *text)):
        model.zero_grad()
        out = model(**inputs, text_cache=text_cache).sample
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outputs.append(out.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(outputs[0], outputs[1])
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].abs().max() > 0
    with pytest.raises(CTFlowError, match="text_cache was computed for batch 2, not 1"):
        model(**make_inputs(batch=1), text_cache=cache)


@pytest.mark.parametrize("context", ["concat", "tokens"])
def test_text_resampler_gives_the_blocks_its_queries_and_ignores_padding(tmp_path, context):
    model = make_model("full", context, text_resampler=3)
    assert model.text_embedder is None  # the resampler reads the encoder's tokens itself
    inputs = make_inputs()
    base = run(model, **inputs)
    cache = model.compute_text_cache(inputs["encoder_hidden_states"], inputs["encoder_attention_mask"])
    assert cache.mask.shape == (2, 3) and cache.mask.all()  # every block reads 3 queries, not the 6 tokens
    assert all(k.shape[2] == v.shape[2] == 3 for k, v in cache.kv) and len(cache.kv) == len(model.blocks)
    padded = inputs["encoder_hidden_states"].clone()
    padded[0, 4:] = 100.0  # sample 0's padded tokens
    torch.testing.assert_close(run(model, **{**inputs, "encoder_hidden_states": padded}), base)
    padded[0, :4] += 1.0  # its real tokens do matter
    assert not torch.allclose(run(model, **{**inputs, "encoder_hidden_states": padded}), base)
    null = torch.zeros_like(inputs["encoder_attention_mask"])
    null[:, 0] = 1  # the null report (flow.null_condition): one zero token
    assert torch.isfinite(run(model, **{**inputs, "encoder_attention_mask": null})).all()
    # its keys and values come from the real tokens only: the same queries and gradients as projecting
    # every token, padding too
    r, mask = model.resampler, inputs["encoder_attention_mask"].bool()
    outputs, grads = [], []
    for every_token in (False, True):
        r.zero_grad()
        if every_token:
            x = r.latents.expand(2, -1, -1)
            x = x + r.attn(r.norm_latents(x), r.norm_text(padded), mask)
            out = x + r.mlp(r.norm_mlp(x))
        else:
            out = r(padded, mask)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outputs.append(out.detach())
        grads.append(torch.cat([p.grad.flatten() for p in r.parameters()]))
    torch.testing.assert_close(outputs[0], outputs[1])
    torch.testing.assert_close(grads[0], grads[1])
    assert r.attn.kv.weight.grad.abs().max() > 0
    model.save_pretrained(tmp_path)
    loaded = CTFlowTransformer.from_pretrained(tmp_path).eval()
    assert loaded.config.text_resampler == 3
    torch.testing.assert_close(run(loaded, **inputs), base)
    assert sum(p.numel() for p in model.parameters()) == count_params(dict(model.config))
    for bad in (-1, 1.5):
        with pytest.raises(CTFlowError, match="text_resampler"):
            make_model(text_resampler=bad)
    with pytest.raises(CTFlowError, match="set one of them"):
        make_model(text_resampler=2, text_pool=2)


@pytest.mark.parametrize("attention", ["full", "factorized"])
def test_context_none_ignores_the_previous_chunk(attention):
    # the "independent chunks" ablation: same input width as a model without context, no cache
    model = make_model(attention, "none")
    inputs = make_inputs()
    assert model.x_embedder.in_channels == C and not hasattr(model, "context_embedder")
    out = run(model, **inputs)
    torch.testing.assert_close(out, run(model, **{**inputs, "context": None}))
    text = (inputs["encoder_hidden_states"], inputs["encoder_attention_mask"], inputs["pooled_text"])
    assert model.compute_context_cache(inputs["context"], *text, inputs["chunk_index"]) is None
    with pytest.raises(CTFlowError, match="context_cache"):
        model(**inputs, context_cache=object())


def test_without_depth_embedding_the_chunk_index_is_ignored():
    model = make_model("full", "concat", depth_embedding=False)
    inputs = make_inputs()
    assert model.depth_embed is None
    torch.testing.assert_close(
        run(model, **inputs), run(model, **{**inputs, "chunk_index": torch.tensor([5, 9])})
    )


def test_absolute_depth_embedding_changes_output_and_is_clamped():
    model = make_model("factorized", "tokens", max_chunks=8)
    inputs = make_inputs()
    out = run(model, **inputs)
    assert not torch.allclose(out, run(model, **{**inputs, "chunk_index": torch.tensor([1, 3])}))
    torch.testing.assert_close(
        run(model, **{**inputs, "chunk_index": torch.tensor([7, 7])}),
        run(model, **{**inputs, "chunk_index": torch.tensor([7, 500])}),
    )


def test_sample_prediction_returns_the_velocity_of_the_predicted_clean_chunk():
    """x-prediction: the same network output read as x0 gives v = (x_t - x0) / max(t, MIN_T)."""
    velocity = make_model("full", "concat")
    sample = make_model("full", "concat", prediction="sample")
    sample.load_state_dict(velocity.state_dict())
    inputs = make_inputs()
    inputs["timestep"] = torch.tensor([0.5, 0.01])  # the second one is clamped
    x0_hat = run(velocity, **inputs)  # the raw network output
    t = torch.tensor([0.5, MIN_T]).view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(run(sample, **inputs), (inputs["hidden_states"] - x0_hat) / t)
    assert sample.config.prediction == "sample"
    with pytest.raises(CTFlowError, match="prediction must be 'velocity', 'sample' or 'skip'"):
        make_model(prediction="epsilon")


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"attention": "local"}, "attention must be 'full' or 'factorized', not 'local'$"),
        ({"context": "cross"}, "context must be 'concat', 'tokens' or 'none', not 'cross'$"),
    ],
)
def test_unknown_attention_or_context_is_refused_naming_the_choices(option, message):
    with pytest.raises(CTFlowError, match=message):
        make_model(**option)


@pytest.mark.parametrize("sigma", [1.0, 0.1])
def test_skip_prediction_keeps_the_input_at_low_noise_and_is_sample_prediction_at_pure_noise(sigma):
    """prediction="skip": x0 = c_skip x_t + c_out F, c_skip = (1-t) s^2/D^2, c_out = t/D,
    D^2 = (1-t)^2 s^2 + t^2 (s = sigma_data); the velocity is (x_t - x0) / t, finite at t = 0, and at
    t = 1 the same as "sample"."""
    velocity = make_model("full", "concat")
    skip = make_model("full", "concat", prediction="skip", sigma_data=sigma)
    sample = make_model("full", "concat", prediction="sample")
    skip.load_state_dict(velocity.state_dict())
    sample.load_state_dict(velocity.state_dict())
    inputs = make_inputs()
    x_t = inputs["hidden_states"]
    inputs["timestep"] = torch.tensor([0.3, 0.8])
    f = run(velocity, **inputs)  # the raw network output
    t = inputs["timestep"].view(-1, 1, 1, 1, 1)
    d2 = (1 - t) ** 2 * sigma**2 + t**2
    x0 = (1 - t) * sigma**2 / d2 * x_t + t / d2.sqrt() * f
    torch.testing.assert_close(run(skip, **inputs), (x_t - x0) / t)
    inputs["timestep"] = torch.tensor([1.0, 1.0])
    torch.testing.assert_close(run(skip, **inputs), run(sample, **inputs))
    inputs["timestep"] = torch.tensor([0.0, 1e-6])  # at t -> 0 the clean chunk is the input itself
    v = run(skip, **inputs)
    assert torch.isfinite(v).all()
    x0_near = x_t[1] - 1e-6 * v[1]
    assert (x0_near - x_t[1]).abs().max() < 1e-3
    assert skip.config.prediction == "skip" and skip.config.sigma_data == sigma
    with pytest.raises(CTFlowError, match="sigma_data must be a number > 0"):
        make_model(prediction="skip", sigma_data=0.0)


def test_text_statistics_standardise_report_features_and_are_saved(tmp_path):
    """After set_text_statistics the model sees (features - mean) / std, and the statistics persist."""
    model = make_model("full", "tokens")
    g = torch.Generator().manual_seed(5)
    tokens = 0.3 + 0.02 * torch.randn(50, TEXT_DIM, generator=g)
    pooled = 0.1 + 0.01 * torch.randn(7, TEXT_DIM, generator=g)
    inputs = make_inputs()
    raw = run(model, **inputs)  # identity statistics
    model.set_text_statistics(tokens, pooled)
    torch.testing.assert_close(model.pooled_stats[0], pooled.mean(0))
    floor = float(tokens.std(0).mean()) * 0.1
    torch.testing.assert_close(model.token_stats[1], tokens.std(0).clamp_min(floor))
    tm, ts = model.token_stats
    pm, ps = model.pooled_stats
    standardised = {
        **inputs,
        "encoder_hidden_states": (inputs["encoder_hidden_states"] - tm) / ts,
        "pooled_text": (inputs["pooled_text"] - pm) / ps,
    }
    out = run(model, **inputs)
    assert not torch.allclose(out, raw)
    model.token_stats.copy_(torch.stack([torch.zeros(TEXT_DIM), torch.ones(TEXT_DIM)]))
    model.pooled_stats.copy_(torch.stack([torch.zeros(TEXT_DIM), torch.ones(TEXT_DIM)]))
    torch.testing.assert_close(run(model, **standardised), out)

    model.set_text_statistics(tokens, pooled)
    model.save_pretrained(tmp_path)
    loaded = CTFlowTransformer.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded.token_stats, model.token_stats)
    torch.testing.assert_close(run(loaded, **inputs), out)


def test_target_depth_reads_the_slices_still_to_come():
    """Only the slices left from the chunk on matter; unknown counts (0 or None) give the null vector."""
    model = make_model("full", "concat", target_depth=True, depth_embedding=False)
    inputs = make_inputs()
    known = run(model, **inputs, num_slices=torch.tensor([40, 40]))
    assert not torch.allclose(known, run(model, **inputs, num_slices=torch.tensor([60, 60])))
    # chunk_index [0, 3] with 4-slice chunks: 40 slices at chunk 3 leave 28, as 28 do at chunk 0
    shifted = run(model, **{**inputs, "chunk_index": torch.tensor([0, 0])}, num_slices=torch.tensor([40, 28]))
    torch.testing.assert_close(known, shifted)
    unknown = run(model, **inputs)
    torch.testing.assert_close(run(model, **inputs, num_slices=torch.tensor([0, 0])), unknown)
    mixed = run(model, **inputs, num_slices=torch.tensor([0, 40]))
    torch.testing.assert_close(mixed[0], unknown[0])
    torch.testing.assert_close(mixed[1], known[1])
    plain = make_model("full", "concat")  # a model without target_depth ignores the count
    torch.testing.assert_close(run(plain, **inputs, num_slices=torch.tensor([40, 9])), run(plain, **inputs))


@pytest.mark.parametrize("context", ["concat", "tokens"])
def test_finding_flags_condition_the_output_and_unknown_rows_get_the_null_vector(context):
    model = make_model("full", context, num_findings=3)
    inputs = make_inputs()
    left, right = torch.tensor([[1.0, 0.0, 0.0]] * 2), torch.tensor([[0.0, 1.0, 0.0]] * 2)
    out_left = run(model, **inputs, findings=left)
    assert not torch.allclose(out_left, run(model, **inputs, findings=right))
    unknown = run(model, **inputs)
    torch.testing.assert_close(run(model, **inputs, findings=-torch.ones(2, 3)), unknown)
    mixed = run(model, **inputs, findings=torch.tensor([[-1.0, -1.0, -1.0], [1.0, 0.0, 0.0]]))
    torch.testing.assert_close(mixed[0], unknown[0])
    torch.testing.assert_close(mixed[1], out_left[1])
    if context == "tokens":  # the cached context sees the flags too
        cache = model.compute_context_cache(
            inputs["context"],
            inputs["encoder_hidden_states"],
            inputs["encoder_attention_mask"],
            inputs["pooled_text"],
            inputs["chunk_index"],
            findings=left,
        )
        cached = run(model, **{**inputs, "context": None}, context_cache=cache, findings=left)
        torch.testing.assert_close(cached, out_left)
    with pytest.raises(CTFlowError, match="expects 2x3"):
        run(model, **inputs, findings=torch.zeros(2, 4))
    plain = make_model("full", context)  # a model without num_findings ignores them
    torch.testing.assert_close(run(plain, **inputs, findings=left), run(plain, **inputs))


def test_num_findings_is_checked_and_saved_with_the_model(tmp_path):
    with pytest.raises(CTFlowError, match="num_findings"):
        make_model(num_findings=-1)
    model = make_model("full", "concat", num_findings=2)
    inputs = {**make_inputs(), "findings": torch.tensor([[1.0, 0.0], [0.0, 1.0]])}
    model.save_pretrained(tmp_path)
    loaded = CTFlowTransformer.from_pretrained(tmp_path).eval()
    assert loaded.config.num_findings == 2
    torch.testing.assert_close(run(loaded, **inputs), run(model, **inputs))


def test_finding_maps_add_each_flags_in_plane_map_to_every_slice_of_the_chunk(tmp_path):
    with pytest.raises(CTFlowError, match="set num_findings"):
        make_model(finding_maps=True)
    fresh = make_model("full", "concat", randomize=False, num_findings=2, finding_maps=True)
    assert not fresh.finding_map.any()  # zeros at first: a model starts as one without maps
    model = make_model("full", "concat", num_findings=2, finding_maps=True)
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    inputs = make_inputs()
    for flags in ([[0.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.5, 1.0]], [[-1.0, -1.0], [0.0, 0.0]]):
        run(model, **inputs, findings=torch.tensor(flags))
    none, some, unknown = seen  # the first block's input tokens [B,N,D]
    maps = model.finding_map.detach()  # [2,P,D]
    slices = model.grid[0]
    torch.testing.assert_close(some[0] - none[0], maps[0].repeat(slices, 1))
    torch.testing.assert_close(some[1] - none[1], (0.5 * maps[0] + maps[1]).repeat(slices, 1))
    torch.testing.assert_close(unknown, none)  # unknown flags add no map
    run(model, **inputs)  # no flags at all: no map either
    torch.testing.assert_close(seen[-1], none)
    out = run(model, **inputs, findings=torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    model.save_pretrained(tmp_path)
    loaded = CTFlowTransformer.from_pretrained(tmp_path).eval()
    assert loaded.config.finding_maps
    torch.testing.assert_close(run(loaded, **inputs, findings=torch.tensor([[1.0, 0.0], [0.0, 1.0]])), out)


@pytest.mark.parametrize("context,prediction", [("tokens", "velocity"), ("concat", "sample")])
def test_tiny_transformer_overfits_a_fixed_batch(context, prediction):
    """Under the velocity loss, whichever quantity the network outputs."""
    from ctflow.flow import flow_matching_loss

    model = make_model("full", context, randomize=False, hidden_size=64, prediction=prediction).train()
    inputs = make_inputs(seed=3)
    x0, t = inputs.pop("hidden_states"), inputs.pop("timestep")
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    start = time.perf_counter()
    losses = []
    for _ in range(100):
        loss, _ = flow_matching_loss(model, x0, inputs, t=t, noise=noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])
    assert time.perf_counter() - start < 20


def test_gradient_checkpointing_gives_the_same_gradients():
    model = make_model("factorized", "tokens").train()
    inputs = make_inputs()

    def grads():
        model.zero_grad()
        model(**inputs).sample.square().mean().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain = grads()
    model.enable_gradient_checkpointing()
    calls, checkpoint = [], model._gradient_checkpointing_func
    model._gradient_checkpointing_func = lambda *a, **k: calls.append(1) or checkpoint(*a, **k)
    for a, b in zip(plain, grads(), strict=True):
        torch.testing.assert_close(a, b)
    assert (
        len(calls) == 2 * model.config.depth
    )  # every block of the chunk and the context stream ran checkpointed


def test_patches_map_to_tokens_and_back_in_slice_row_column_order():
    """Unequal patch sides on an unequal grid, so a swapped axis cannot pass unnoticed."""
    from einops import rearrange

    model = make_model(patch_size=(1, 2, 4), sample_size=8, chunk_slices=3)
    s, h, w = model.grid
    assert (s, h, w) == (3, 4, 2)
    d = model.config.hidden_size
    x = torch.randn(2, s * h * w, 1 * 2 * 4 * C)
    want = rearrange(x, "b (s h w) (ps ph pw c) -> b c (s ps) (h ph) (w pw)", s=s, h=h, w=w, ps=1, ph=2, pw=4)
    torch.testing.assert_close(model.unpatchify(x), want)
    with torch.no_grad():  # a voxel at slice 2, row 5, column 6 lies in patch (2, 2, 1): token 2*8 + 2*2 + 1
        delta = torch.zeros(1, C, 3, 8, 8)
        delta[0, 0, 2, 5, 6] = 1.0
        tokens = [
            model._tokens(model.x_embedder(v), torch.zeros(1, d)) for v in (delta, torch.zeros_like(delta))
        ]
    changed = (tokens[0] - tokens[1]).abs().sum(-1)[0].nonzero().flatten().tolist()
    assert changed == [21]


def test_return_dict_false_gives_a_tuple():
    model = make_model()
    inputs = make_inputs()
    with torch.no_grad():
        (out,) = model(**inputs, return_dict=False)
    torch.testing.assert_close(out, run(model, **inputs))


def test_output_conv_starts_as_the_identity_and_can_smooth_across_slices(tmp_path):
    plain = make_model("full", "concat", prediction="sample")
    conv = make_model("full", "concat", prediction="sample", final_conv=True, randomize=False)
    result = conv.load_state_dict(plain.state_dict(), strict=False)
    assert set(result.missing_keys) == {"output_conv.weight", "output_conv.bias"}
    inputs = make_inputs()
    torch.testing.assert_close(run(conv, **inputs), run(plain, **inputs))  # identity at initialisation
    velocity = make_model("full", "concat")  # the same network read as velocity: the raw output x0_hat
    velocity.load_state_dict(plain.state_dict())
    x0_hat = run(velocity, **inputs)
    with torch.no_grad():  # a kernel that averages each slice with its two neighbours
        conv.output_conv.weight.zero_()
        for c in range(C):
            conv.output_conv.weight[c, c, :, 1, 1] = 1 / 3
    t = inputs["timestep"].clamp_min(MIN_T).view(-1, 1, 1, 1, 1)
    x0_conv = inputs["hidden_states"] - run(conv, **inputs) * t  # back from the velocity to x0
    smooth = (x0_hat[:, :, :-2] + x0_hat[:, :, 1:-1] + x0_hat[:, :, 2:]) / 3
    torch.testing.assert_close(x0_conv[:, :, 1:-1], smooth, atol=1e-5, rtol=1e-4)
    conv.save_pretrained(tmp_path)
    loaded = CTFlowTransformer.from_pretrained(tmp_path).eval()
    assert loaded.config.final_conv
    torch.testing.assert_close(run(loaded, **inputs), run(conv, **inputs))
    cfg = dict(preset_config("tiny"))
    with_conv = {**cfg, "final_conv": True}
    assert count_params(with_conv) - count_params(cfg) == 8 * 8 * 27 + 8
    assert forward_flops(with_conv) > forward_flops(cfg)


def test_context_residual_adds_the_previous_chunks_last_slice_to_the_clean_estimate(tmp_path):
    plain = make_model("full", "concat", prediction="sample")
    residual = make_model("full", "concat", prediction="sample", context_residual=True)
    residual.load_state_dict(plain.state_dict())  # same weights: only the parametrisation differs
    inputs = make_inputs()
    t = inputs["timestep"].clamp_min(MIN_T).view(-1, 1, 1, 1, 1)

    def x0(model, **kw):  # back from the velocity to the clean estimate
        return kw["hidden_states"] - run(model, **kw) * t

    last = inputs["context"][:, :, -1:].expand(-1, -1, S, -1, -1)
    torch.testing.assert_close(x0(residual, **inputs), x0(plain, **inputs) + last, atol=1e-5, rtol=1e-4)
    first = {**inputs, "context": None}  # before the first chunk there is nothing to add
    torch.testing.assert_close(x0(residual, **first), x0(plain, **first), atol=1e-5, rtol=1e-4)
    # an untrained (all-zero output) residual model continues the previous chunk's last slice
    zero = make_model("full", "concat", prediction="sample", context_residual=True, randomize=False)
    torch.testing.assert_close(x0(zero, **inputs), last, atol=1e-5, rtol=1e-4)
    residual.save_pretrained(tmp_path)
    loaded = CTFlowTransformer.from_pretrained(tmp_path).eval()
    assert loaded.config.context_residual
    torch.testing.assert_close(run(loaded, **inputs), run(residual, **inputs))
    # a share below 1 adds that share of the slice, and survives save/load
    damped = make_model("full", "concat", prediction="sample", context_residual=0.75)
    damped.load_state_dict(plain.state_dict())
    torch.testing.assert_close(x0(damped, **inputs), x0(plain, **inputs) + 0.75 * last, atol=1e-5, rtol=1e-4)
    damped.save_pretrained(tmp_path / "damped")
    assert CTFlowTransformer.from_pretrained(tmp_path / "damped").config.context_residual == 0.75


@pytest.mark.parametrize("kw", [{"context": "tokens", "prediction": "sample"}, {"prediction": "velocity"}])
def test_context_residual_refuses_settings_without_a_clean_previous_chunk_to_add(kw):
    kw = {"context": "concat", **kw}
    with pytest.raises(CTFlowError, match="context_residual needs context='concat' and prediction='sample'"):
        make_model(context_residual=True, **kw)


@pytest.mark.parametrize("share", [-0.5, 1.5])
def test_context_residual_share_outside_0_to_1_is_refused(share):
    with pytest.raises(CTFlowError, match="context_residual must be between 0 and 1"):
        make_model("full", "concat", prediction="sample", context_residual=share)


def test_save_and_load_round_trip(tmp_path):
    model = make_model("factorized", "tokens")
    model.save_pretrained(tmp_path)
    loaded = CTFlowTransformer.from_pretrained(tmp_path).eval()
    assert tuple(loaded.config.patch_size) == (2, 2, 2)
    inputs = make_inputs()
    torch.testing.assert_close(run(loaded, **inputs), run(model, **inputs))


def test_bad_shapes_and_configs_raise_ctflow_errors():
    model = make_model()
    inputs = make_inputs()
    with pytest.raises(CTFlowError, match="hidden_states"):
        model(**{**inputs, "hidden_states": inputs["hidden_states"][:, :, :3]})
    with pytest.raises(CTFlowError, match="context"):
        model(**{**inputs, "context": inputs["context"][:1]})
    with pytest.raises(CTFlowError, match="patch_size"):
        CTFlowTransformer(sample_size=9, hidden_size=32, depth=1, num_heads=4)
    with pytest.raises(CTFlowError, match="attention"):
        CTFlowTransformer(hidden_size=32, depth=1, num_heads=4, attention="axial")
    with pytest.raises(CTFlowError, match="unknown transformer preset"):
        CTFlowTransformer.from_preset("huge")
    with pytest.raises(CTFlowError, match="unknown transformer config keys: widht"):
        preset_config("tiny", widht=3)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"depth": 0}, "depth must be a whole number at least 1"),  # trained and saved with no blocks
        ({"depth": -1}, "depth must be"),
        ({"num_heads": 0}, "num_heads must be"),  # ZeroDivisionError
        ({"chunk_slices": 0}, "chunk_slices must be"),
        ({"max_chunks": 0}, "max_chunks must be"),  # failed in index_select at the first step
        ({"hidden_size": "1024"}, "hidden_size must be"),
        ({"depth": 24.5}, "depth must be"),
        ({"patch_size": 2}, "patch_size must be three whole numbers"),
        ({"patch_size": [2, 0, 2]}, "patch_size must be"),
        ({"mlp_ratio": -1}, "mlp_ratio must be a number > 0"),
        ({"mlp_ratio": 0}, "mlp_ratio must be"),
    ],
)
def test_sizes_that_are_not_whole_numbers_above_zero_are_refused(override, message):
    with pytest.raises(CTFlowError, match=message):
        CTFlowTransformer(**{**dict(hidden_size=32, depth=1, num_heads=4), **override})


def test_presets_param_counts_on_the_meta_device():
    start = time.perf_counter()
    big = count_params("ctflow-0.5b")
    assert time.perf_counter() - start < 5
    assert 0.3e9 < big < 0.8e9
    assert 1e6 < count_params("tiny") < 20e6
    tiny = CTFlowTransformer.from_preset("tiny", depth=1)
    assert tiny.config.hidden_size == TRANSFORMER_PRESETS["tiny"]["hidden_size"] and len(tiny.blocks) == 1
    assert sum(p.numel() for p in tiny.parameters()) == count_params(preset_config("tiny", depth=1))


def test_forward_flops_grow_with_depth_and_the_cache_saves_work():
    flops = [forward_flops(preset_config("ctflow-0.5b", depth=d)) for d in (1, 2, 12, 24)]
    assert flops == sorted(flops) and len(set(flops)) == 4
    assert forward_flops("ctflow-0.5b", context_stream=False) < forward_flops("ctflow-0.5b")
    assert forward_flops("tiny", batch=2) == 2 * forward_flops("tiny")
    shipped = dict(patch_size=(2, 4, 4), context="concat")  # 64 chunk tokens, as the embedded model
    pooled = [forward_flops(preset_config("tiny", **shipped, text_pool=k), text_len=200) for k in (1, 4)]
    assert pooled[1] < 0.8 * pooled[0]  # 200 report tokens are most of its cross-attention work
    resampled = [
        forward_flops(preset_config("tiny", **shipped, text_resampler=16), text_len=n) for n in (200, 400)
    ]
    assert resampled[0] < 0.8 * pooled[0]
    longer = forward_flops(preset_config("tiny", **shipped), text_len=400) - pooled[0]
    assert resampled[1] - resampled[0] < longer / 4  # the report's length is read once, not in every block
    factorized = preset_config("ctflow-0.5b", attention="factorized")
    assert forward_flops(factorized) > 0 and count_params(factorized) > count_params("ctflow-0.5b")
