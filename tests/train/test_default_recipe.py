import json

from ctflow.train.default import stage, write_model_card


def test_a_stage_done_earlier_keeps_its_recorded_time_and_a_new_one_is_timed(tmp_path):
    timings = {"encode": 93.7}
    with stage("encode", timings, tmp_path) as todo:  # its output exists
        assert not todo
    with stage("train", timings, tmp_path / "missing") as todo:
        assert todo
    assert timings["encode"] == 93.7
    assert 0 <= timings["train"] < 1


def test_model_card_names_steps_size_and_timings(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"name": "m", "ctflow": {"eos_latent_mse": 0.5}}))
    (tmp_path / "timings.json").write_text(json.dumps({"phantoms": 24.0, "train": 629.0}))
    (tmp_path / "w.safetensors").write_bytes(b"0" * 2**20)
    card = write_model_card(tmp_path).read_text()
    assert "# m" in card and "1.0 MB of safetensors" in card
    assert "| phantoms | train |" in card and "| 24.0 | 629.0 |" in card
    assert "EOS latent threshold (MSE): 0.5" in card
