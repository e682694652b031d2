import csv
import json
import statistics
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ctflow.train.config import FlowTrainConfig, load_config
from ctflow.train.default import CONFIGS, encode_args, main, phantom_args, stage, write_model_card

NO_FINDINGS = {
    "effusion": "none",
    "cardiomegaly": False,
    "nodule": False,
    "emphysema": False,
    "consolidation": False,
}


def test_a_stage_done_earlier_keeps_its_recorded_time_and_a_new_one_is_timed(tmp_path):
    timings = {"encode": 93.7}
    with stage("encode", timings, tmp_path) as todo:  # its output exists
        assert not todo
    with stage("train", timings, tmp_path / "missing") as todo:
        assert todo
    assert timings["encode"] == 93.7
    assert 0 <= timings["train"] < 1


def test_a_stopped_stage_is_saved_and_its_next_attempt_adds_to_it(tmp_path):
    """A stopped run recorded nothing: its rerun said "done earlier (? s)" for every finished stage,
    kept the rerun's machine and totalled the resumed part alone."""
    timings, saved = {"train-vae": 40.0}, []
    with (
        pytest.raises(KeyboardInterrupt),
        stage("train", timings, tmp_path / "missing", lambda: saved.append(dict(timings))),
    ):
        raise KeyboardInterrupt
    assert saved and "train" in saved[-1] and timings["train"] >= 0
    timings["train"] = 100.0  # as if stopped after 100 s
    with stage("train", timings, tmp_path / "missing", lambda: saved.append(dict(timings))) as todo:
        assert todo
    assert 100.0 <= timings["train"] < 101 and saved[-1]["train"] == timings["train"]


def test_the_recipe_encodes_finding_masks_only_when_the_flow_config_weights_findings(tmp_path):
    args = encode_args(tmp_path / "d", tmp_path / "v", tmp_path / "l", FlowTrainConfig())
    assert args[:2] == ["encode", "--data"] and "--report-variants" in args and "--finding-masks" not in args
    weighted = encode_args(
        tmp_path / "d", tmp_path / "v", tmp_path / "l", FlowTrainConfig(finding_weight=5.0)
    )
    assert weighted == [*args, "--finding-masks"]
    # a late stage or the fine-tune that weights findings needs the masks as much: all train on one cache
    from ctflow.train.config import LateConfig

    late = FlowTrainConfig(steps=20, late=LateConfig(from_step=10, finding_weight=5.0))
    assert "--finding-masks" in encode_args(tmp_path / "d", tmp_path / "v", tmp_path / "l", late)
    finetune = FlowTrainConfig(finding_weight=10.0)
    assert "--finding-masks" in encode_args(
        tmp_path / "d", tmp_path / "v", tmp_path / "l", FlowTrainConfig(), finetune
    )
    assert "--finding-masks" not in encode_args(
        tmp_path / "d", tmp_path / "v", tmp_path / "l", FlowTrainConfig(), None
    )


def test_the_recipe_writes_side_and_clear_twins_only_when_asked(tmp_path):
    args = phantom_args(tmp_path / "d", 300, 64, side_twins=False)
    assert args[:3] == ["phantoms", "--n", "300"] and "--side-twins" not in args
    assert phantom_args(tmp_path / "d", 300, 64, side_twins=True) == [*args, "--side-twins"]
    both = phantom_args(tmp_path / "d", 300, 64, side_twins=True, clear_twins=True)
    assert both == [*args, "--side-twins", "--clear-twins"]
    clear = phantom_args(tmp_path / "d", 300, 64, side_twins=False, clear_twins=True)
    assert clear == [*args, "--clear-twins"]


def test_model_card_names_steps_size_and_timings(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"name": "m", "ctflow": {"eos_latent_mse": 0.5}}))
    (tmp_path / "timings.json").write_text(json.dumps({"phantoms": 24.0, "train": 629.0}))
    (tmp_path / "w.safetensors").write_bytes(b"0" * 2**20)
    card = write_model_card(tmp_path).read_text()
    assert "# m" in card and "1.0 MiB of safetensors" in card
    assert "| phantoms | train |" in card and "| 24.0 | 629.0 |" in card
    assert "EOS latent threshold (MSE): 0.5" in card
    assert "HU window [-1000, 1000]" in card  # no VAE config: the linear default
    assert "Stage times on the build machine (seconds, 2 CPU cores):" in card  # no machine recorded
    machine = {"cpu": "Some CPU", "cpu_count": 2, "matmul_gflops_fp32": 361.6}
    (tmp_path / "timings.json").write_text(json.dumps({"machine": machine, "phantoms": 24.0, "train": 629.0}))
    card = write_model_card(tmp_path).read_text()
    assert "(seconds, 2 CPU cores: Some CPU, fp32 matrix multiply 361.6 GFLOP/s):" in card
    assert "| phantoms | train |" in card and "| 24.0 | 629.0 |" in card  # the machine is not a stage
    assert "300 procedural chest-CT phantoms (`ctflow phantoms --n 300 --size 64" in card  # recorded before
    command = "ctflow phantoms --n 300 --size 64 --min-slices 40 --max-slices 120 --seed 1000 --side-twins"
    index = {"name": "m", "ctflow": {"training_data": command, "training_volumes": 339}}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    card = write_model_card(tmp_path).read_text()
    assert f"339 procedural chest-CT phantoms (`{command}`: seeds 1000-1299, each with a one-sided" in card
    assert "clear twin" not in card
    index["ctflow"]["training_data"] = command + " --clear-twins"
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    card = write_model_card(tmp_path).read_text()
    assert "side twin, each with an effusion also without it (its clear twin))" in card
    index["ctflow"]["training_data"] = command
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_hu_window": [-1000, -150, 150, 1000]}))
    assert "HU window [-1000, -150, 150, 1000]" in write_model_card(tmp_path).read_text()
    assert "finding flags" not in write_model_card(tmp_path).read_text()
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"num_findings": 6}))
    assert "it also reads 6 finding flags parsed from the report" in write_model_card(tmp_path).read_text()
    assert "in-plane map" not in write_model_card(tmp_path).read_text()
    (tmp_path / "transformer" / "config.json").write_text(
        json.dumps({"num_findings": 6, "finding_maps": True})
    )
    assert (
        "each also as a learned in-plane map added to the chunk's tokens"
        in write_model_card(tmp_path).read_text()
    )
    assert "averaged in runs" not in write_model_card(tmp_path).read_text()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"num_findings": 6, "text_pool": 4}))
    assert (
        "reads the report's tokens averaged in runs of 4 (`text_pool`)"
        in write_model_card(tmp_path).read_text()
    )
    assert "learned queries" not in write_model_card(tmp_path).read_text()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"text_resampler": 16}))
    assert "; 16 learned queries read the report's tokens once" in write_model_card(tmp_path).read_text()
    shipped = load_config(CONFIGS / "tiny-phantom.yaml", FlowTrainConfig).steps  # models from before stages
    assert f"`configs/tiny-phantom.yaml` to step {shipped} (EMA weights after {shipped} steps;" in card
    index["ctflow"]["flow_stages"] = [{"config": "a.yaml", "steps": 700}, {"config": "b.yaml", "steps": 900}]
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    card = write_model_card(tmp_path).read_text()
    assert (
        "`configs/a.yaml` to step 700, then `configs/b.yaml` to step 900 (EMA weights after 900 steps;"
        in card
    )
    index["ctflow"]["trained_steps"] = 9500  # assembled from a checkpoint (--from-checkpoint)
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    assert "(EMA weights after 9500 steps;" in write_model_card(tmp_path).read_text()


def test_model_card_reports_the_reconstruction_ceiling_flicker_and_report_use(tmp_path):
    folder, results = tmp_path / "m", tmp_path / "results"
    folder.mkdir()
    results.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"name": "m", "ctflow": {}}))
    quality = {
        "n": 50,
        "steps": 20,
        "guidance": 2.0,
        "slice_count_within_one_chunk": 0.98,
        "ended_by_eos": 1.0,
        "mean_abs_slice_error": 3.7,
        "seconds_per_volume": 4.2,
        "attribute_accuracy": {"cardiomegaly": 0.8},
        "attribute_accuracy_vae_reconstruction": {"cardiomegaly": 0.96},
        "findings_found_vae_reconstruction": {"cardiomegaly": 0.875},
        "flicker_vs_reconstruction": 2.1,
        "patch_seam_ratio": 4.2,
        "reconstruction_patch_seam_ratio": 1.01,
        "rows": [
            {"truth": {**NO_FINDINGS, "effusion": t}, "pred": {**NO_FINDINGS, "effusion": p}}
            for t, p in (("left", "left"), ("right", "left"), ("right", "none"), ("none", "right"))
        ],
    }
    (results / "embedded_quality.json").write_text(json.dumps(quality))
    card = write_model_card(folder, results).read_text()
    assert "cardiomegaly 96% (found 88%)" in card
    assert "reported effusions drawn: 2 of 3 on any side, 1 on the reported side" in card
    assert "2.1x that of the reconstructed phantoms; patch-seam ratio 4.2 (reconstructions 1.01" in card
    assert "Does it read the findings?" not in card  # no text_use.json yet
    use = {
        "n": 6,
        "report_effect": {"1.0": 0.05, "0.9": 0.04},
        "null_effect": {"1.0": 0.02, "0.9": 0.02},
        "generated_shift": {
            "cardio_ratio": 0.001,
            "cardio_ratio_pairs": 5,
            "fluid_share": None,
            "fluid_share_pairs": 0,
        },
        "real_shift_through_vae": {"cardio_ratio": 0.09, "fluid_share": 0.05},
    }
    (results / "text_use.json").write_text(json.dumps(use))
    card = write_model_card(folder, results).read_text()
    assert "report effect on the predicted chunk from noise: 0.05" in card
    assert "heart/thorax ratio shift +0.001 (true +0.09; 5 of 6 generated pairs readable)" in card
    assert "fluid-density share shift n/a (true +0.05; 0 of 6" in card
    assert "effusion volume" not in card  # results from before the reader's effusion was measured
    use["generated_shift"].update(effusion_ml=12.5, effusion_ml_pairs=6)
    use["real_shift_through_vae"]["effusion_ml"] = 80.0
    (results / "text_use.json").write_text(json.dumps(use))
    card = write_model_card(folder, results).read_text()
    assert "effusion volume read (ml, both sides) shift +12.5 (true +80.0; 6 of 6" in card
    assert "effusion_probe" not in card  # not measured yet
    recall = {"report": 0.013, "no_effusion_report": 0.008, "reconstruction": 0.197}
    probe = {"n": 12, "fluid_recall": {"onset": recall, "continuation": {**recall, "report": 0.119}}}
    (results / "effusion_probe.json").write_text(json.dumps(probe))
    card = write_model_card(folder, results).read_text()
    assert (
        "12 held-out phantoms): effusion voxels in the fluid band 1.3% where it begins and 11.9% in" in card
    )
    assert "(the phantoms through this VAE: 19.7%, 19.7%)" in card
    assert "make demo" not in card  # free_text.py not run yet
    assert "laterality" not in card  # nor laterality.py
    counts = {"volumes": 24, "drawn": 9, "on_named_side": 4, "pairs_following_side": 7, "pairs_read": 12}
    side = {
        "n": 12,
        "generated": {**counts, "side_shift_ml": 6.5},
        "real_through_vae": {**counts, "on_named_side": 23, "side_shift_ml": 101.2},
    }
    (results / "laterality.json").write_text(json.dumps(side))
    card = write_model_card(folder, results).read_text()
    assert (
        "pleural fluid drawn in 9 of 24 volumes, on the reported side only in 4 (through this VAE: 23)"
        in card
    )
    assert "towards the named side in 7 of 12 pairs, by +6.5 ml (through this VAE: +101.2 ml)" in card
    assert "nodule_pairs" not in card  # not measured yet
    calls = {"pairs": 24, "found": 5, "false": 3, "pairs_following_report": 14, "pairs_read": 24}
    nodules = {
        "n": 24,
        "generated": calls,
        "real_through_vae": {**calls, "found": 15, "pairs_following_report": 20},
    }
    (results / "nodule_pairs.json").write_text(json.dumps(nodules))
    card = write_model_card(folder, results).read_text()
    assert (
        "nodule found under 5 of 24 nodule reports and under 3 of 24 clear ones (through this VAE: 15 and 3)"
        in card
    )
    assert "higher under the nodule report in 14 of 24 pairs (through this VAE: 20)" in card
    assert "fitted through this VAE" not in card  # results from before the refitted nodule rule
    nodules["generated"].update(found_vae_rule=0, false_vae_rule=1)
    nodules["real_through_vae"].update(found_vae_rule=9, false_vae_rule=0)
    quality["nodule_vae_rule"] = {
        "generated": {"found": [1, 14], "false": [2, 36]},
        "reconstruction": {"found": [4, 14], "false": [0, 36]},
    }
    (results / "nodule_pairs.json").write_text(json.dumps(nodules))
    (results / "embedded_quality.json").write_text(json.dumps(quality))
    card = write_model_card(folder, results).read_text()
    assert (
        "with the nodule rule fitted through this VAE found under 0 and 1 (through this VAE: 9 and 0)" in card
    )
    assert (
        "found in 1 of 14 volumes whose report names one, called in 2 of 36 whose report does not"
        " (the phantoms through this VAE: 4 and 0)"
    ) in card
    free = {"n": 8, "median_lung_volume_ml": 2325.9, "volumes_with_lungs_over_1000_ml": 8}
    free["found"] = {"cardiomegaly": 4, "left_effusion": 0, "nodule": 1}
    (results / "free_text.json").write_text(json.dumps(free))
    card = write_model_card(folder, results).read_text()
    assert "8 seeds): median lung volume 2325.9 ml, 8 of 8 volumes over 1000 ml of lung" in card
    assert "its findings found: cardiomegaly 4, left effusion 0, nodule 1 of 8" in card


def test_a_fine_tune_that_does_not_go_past_the_first_stage_is_an_error_before_any_work(tmp_path):
    (tmp_path / "ft.yaml").write_text(f"base: {CONFIGS / 'tiny-phantom.yaml'}\n")  # the same 8000 steps
    with pytest.raises(SystemExit, match="not past the first stage's 8000; raise its steps or pass"):
        main(["--work", str(tmp_path / "w"), "--finetune-config", str(tmp_path / "ft.yaml")])
    assert not (tmp_path / "w").exists()


def test_the_recipe_trains_the_vae_on_the_phantoms_alone_and_fine_tunes_from_the_first_stage(
    tmp_path, monkeypatch
):
    """The whole recipe at a few steps: the VAE sees the N phantoms but not their twins, and the
    fine-tune resumes from the first stage's last checkpoint and is the transformer assembled."""
    from ctflow.train import vae_trainer

    (tmp_path / "vae.yaml").write_text(
        f"base: {CONFIGS / 'tiny-vae.yaml'}\nsteps: 2\nbatch_size: 2\ndisc_start: 1\nlog_every: 1\n"
    )
    (tmp_path / "flow.yaml").write_text(
        f"base: {CONFIGS / 'tiny-phantom.yaml'}\nsteps: 2\nbatch_size: 2\nlog_every: 1\n"
    )
    (tmp_path / "ft.yaml").write_text(
        f"base: {CONFIGS / 'tiny-phantom-finetune.yaml'}\nsteps: 4\nbatch_size: 2\nlog_every: 1\n"
    )
    seen = []
    train_vae = vae_trainer.train_vae
    monkeypatch.setattr(
        vae_trainer,
        "train_vae",
        lambda *a, slices, **k: seen.append(len(slices)) or train_vae(*a, slices=slices, **k),
    )
    work = tmp_path / "w"
    argv = ["--work", str(work), "--n", "6", "--vae-config", str(tmp_path / "vae.yaml")]
    argv += ["--threads", str(torch.get_num_threads())]  # the recipe sets the count; keep this process's
    monkeypatch.setattr("ctflow.train.default.RESULTS", tmp_path / "results")
    argv += ["--flow-config", str(tmp_path / "flow.yaml"), "--finetune-config", str(tmp_path / "ft.yaml")]
    main([*argv, "--result", "t"])
    with open(work / "phantoms" / "metadata" / "train_metadata.csv") as f:
        depths = [int(row["NumberofSlices"]) for row in csv.DictReader(f)]
    assert len(depths) > 6  # the seeds hold one-sided effusions, so twins follow the 6 phantoms
    assert seen == [sum(depths[:6])]
    steps = [json.loads(line)["step"] for line in (work / "finetune" / "log.jsonl").read_text().splitlines()]
    assert steps[0] == 3 and steps[-1] == 4  # resumed from the first stage's step 2
    ctflow = json.loads((work / "model" / "model_index.json").read_text())["ctflow"]
    assert ctflow["flow_stages"] == [{"config": "flow.yaml", "steps": 2}, {"config": "ft.yaml", "steps": 4}]
    assert "--side-twins --clear-twins" in ctflow["training_data"]
    assert ctflow["default_max_slices"] == 160  # the recipe's own
    with open(work / "phantoms" / "metadata" / "train_metadata.csv") as f:  # the phantoms' own spacing
        rows = [(int(r["NumberofSlices"]), float(r["ZSpacing"])) for r in csv.DictReader(f)]
    assert ctflow["slice_spacing"] == statistics.median(z for _, z in rows)
    assert ctflow["typical_extent_mm"] == round(statistics.median(n * z for n, z in rows), 2)
    assert ctflow["training_slices"] == [min(n for n, _ in rows), max(n for n, _ in rows)]
    assert ctflow["name"] == "ctflow-phantom-tiny" and ctflow["eos_latent_mse"] > 0
    assert ctflow["training_volumes"] == len(depths)  # the phantoms and their twins, all encoded
    timings = json.loads((work / "timings.json").read_text())
    stages = ["phantoms", "train-vae", "encode", "train", "finetune", "assemble", "total"]
    assert list(timings) == ["machine", *stages]  # the machine first: times are read against it
    assert timings["machine"]["cpu_count"] >= 1 and timings["machine"]["matmul_gflops_fp32"] > 0
    assert timings["total"] == round(sum(timings[k] for k in stages[:-1]), 1)
    # --result: the same times, the machine and the command, where the README's figures come from
    result = json.loads((tmp_path / "results" / "train_default_t.json").read_text())
    assert result["seconds"] == {k: timings[k] for k in stages} and result["machine"] == timings["machine"]
    assert (
        result["command"].startswith("python -m ctflow.train.default --work")
        and "--result t" in result["command"]
    )
    assert result["minutes"] == round(timings["total"] / 60, 1)
    weights = {
        run: load_file(work / run / "transformer" / "diffusion_pytorch_model.safetensors")
        for run in ("flow", "finetune", "model")
    }
    assert all(torch.equal(weights["model"][k], weights["finetune"][k]) for k in weights["model"])
    assert not all(torch.equal(weights["flow"][k], weights["finetune"][k]) for k in weights["flow"])


def test_model_card_quotes_the_consolidation_probe(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"name": "m", "ctflow": {}}))
    assert "consolidation_probe" not in write_model_card(tmp_path, results).read_text()
    shipped = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "embedded_quality.json"
    (results / "embedded_quality.json").write_text(shipped.read_text())  # the card's quality section
    group = {"volumes": 8, "with_consolidation": 7, "on_the_reported_side": 6, "overlapping_the_effusion": 5}
    probe = {
        "n": 50,
        "effusion_reported": {**group, "median_hu": 31.8},
        "no_effusion_reported": {"volumes": 30, "with_consolidation": 4},
    }
    (results / "consolidation_probe.json").write_text(json.dumps(probe))
    card = write_model_card(tmp_path, results).read_text()
    assert "under 7 of the 8 that name an effusion, in 6 a region on the reported side, 5 within" in card
    assert "(median 31.8 HU" in card and "under 4 of the 30 that name neither" in card


def test_the_finetune_seed_copy_is_whole_or_not_there(tmp_path, monkeypatch):
    """A copy stopped half way was taken for done, and the fine-tune resumed from whatever it held."""
    import shutil

    from ctflow.train import default

    for step in ("step_0000010", "step_0000020"):
        (tmp_path / "flow" / "checkpoints" / step).mkdir(parents=True)
        (tmp_path / "flow" / "checkpoints" / step / "state.json").write_text("{}")
    real = shutil.copytree

    def stopped(src, dst, **kw):
        real(src / "step_0000010", dst / "step_0000010")
        raise KeyboardInterrupt

    monkeypatch.setattr(default.shutil, "copytree", stopped)
    with pytest.raises(KeyboardInterrupt):
        default.finetune_start(tmp_path / "flow", tmp_path / "ft")
    assert not (tmp_path / "ft" / "checkpoints").exists() and not list((tmp_path / "ft").iterdir())
    monkeypatch.setattr(default.shutil, "copytree", real)
    default.finetune_start(tmp_path / "flow", tmp_path / "ft")
    assert sorted(p.name for p in (tmp_path / "ft" / "checkpoints").iterdir()) == [
        "step_0000010",
        "step_0000020",
    ]
