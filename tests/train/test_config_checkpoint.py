import dataclasses
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from ctflow.errors import CTFlowError, CTFlowWarning
from ctflow.train.checkpoint import list_checkpoints, load_checkpoint, restore, save_checkpoint
from ctflow.train.config import FlowTrainConfig, VAETrainConfig, load_config


def test_shipped_configs_load(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs"
    assert load_config(root / "tiny-phantom.yaml", FlowTrainConfig).transformer["preset"] == "tiny"
    assert load_config(root / "ctrate-512.yaml", FlowTrainConfig).mixed_precision == "bf16"
    assert load_config(root / "tiny-vae.yaml", VAETrainConfig).image_size == 64
    # each experiment config is the v1 one plus its changes; the shipped one is the short-reports one
    # (shipped until 2026-12-02) plus FindingWeight plus finding flags (shipped until 2026-12-03) plus
    # finding maps, and its fine-tune stage is the b45 controls fine-tune
    base = load_config(root / "tiny-phantom-v1.yaml", FlowTrainConfig)
    shipped = load_config(root / "tiny-phantom.yaml", FlowTrainConfig)
    findings = load_config(root / "tiny-phantom-findings.yaml", FlowTrainConfig)
    assert findings.transformer["num_findings"] == 6 and findings.finding_dropout == 0.1
    findingweight = load_config(root / "tiny-phantom-shortreports-findingweight.yaml", FlowTrainConfig)
    flags_off = {**findings.transformer}
    del flags_off["num_findings"]
    assert dataclasses.replace(findings, transformer=flags_off, finding_dropout=0.0) == findingweight
    maps = load_config(root / "tiny-phantom-findingmaps.yaml", FlowTrainConfig)  # findings plus maps
    assert maps == dataclasses.replace(findings, transformer={**findings.transformer, "finding_maps": True})
    assert shipped == maps
    twins_ft = load_config(root / "tiny-phantom-findingmapstwins-finetune.yaml", FlowTrainConfig)
    assert twins_ft == dataclasses.replace(maps, steps=10000, finding_boost=0.3, finding_weight=10.0)
    w5 = load_config(root / "tiny-phantom-findingmapstwins-finetune-w5.yaml", FlowTrainConfig)
    assert w5 == dataclasses.replace(twins_ft, finding_weight=shipped.finding_weight)  # only the weight
    controls = load_config(root / "tiny-phantom-findingmapstwins-finetune-controls.yaml", FlowTrainConfig)
    assert controls == dataclasses.replace(twins_ft, finding_controls=0.5)  # half the boost: controls
    b45 = load_config(root / "tiny-phantom-findingmapstwins-finetune-controls-b45.yaml", FlowTrainConfig)
    assert b45 == dataclasses.replace(controls, finding_boost=0.45, finding_controls=0.3333)
    assert load_config(root / "tiny-phantom-finetune.yaml", FlowTrainConfig) == b45  # the shipped stage 2
    sharepower = load_config(root / "tiny-phantom-finetune-sharepower.yaml", FlowTrainConfig)
    assert sharepower == dataclasses.replace(b45, finding_share_power=0.5)
    # the nodule-twin experiments change the data set, not the config
    assert load_config(root / "tiny-phantom-finetune-nodtwins.yaml", FlowTrainConfig) == sharepower
    assert load_config(root / "tiny-phantom-finetune-nodtwins-power1.yaml", FlowTrainConfig) == b45
    onsets = [c.finding_boost * (1 - c.finding_controls) for c in (twins_ft, b45)]  # the same onset share
    assert onsets[0] == pytest.approx(onsets[1], abs=1e-4)
    clear_continue = load_config(root / "tiny-phantom-findingmapsclear-continue.yaml", FlowTrainConfig)
    assert clear_continue == dataclasses.replace(maps, steps=10000)  # the maps recipe, 2000 steps on
    late = load_config(root / "tiny-phantom-findingmapsclear-lateboost.yaml", FlowTrainConfig)
    assert late == dataclasses.replace(b45, steps=maps.steps)  # b45 as the recipe's last 2000 steps
    previous = load_config(root / "tiny-phantom-shortreports.yaml", FlowTrainConfig)
    assert previous != base and dataclasses.replace(findingweight, finding_weight=0.0) == previous
    for name, changes in (
        ("context-noise", {"context_noise_max": 1.0}),
        ("startboost25", {"start_boost": 0.25}),
        ("findingboost", {"finding_boost": 0.2}),
        ("timemean", {"time_mean": 1.0}),
        ("shortreports", {"time_mean": 1.0, "short_reports": 0.5}),
    ):
        experiment = load_config(root / f"tiny-phantom-{name}.yaml", FlowTrainConfig)
        assert all(getattr(experiment, k) == v != getattr(base, k) for k, v in changes.items())
        assert dataclasses.replace(experiment, **{k: getattr(base, k) for k in changes}) == base
    # later experiments start from the previous shipped config
    for name, key, value in (
        ("findingboost", "finding_boost", 0.2),
        ("findingweight", "finding_weight", 5.0),
    ):
        experiment = load_config(root / f"tiny-phantom-shortreports-{name}.yaml", FlowTrainConfig)
        assert getattr(experiment, key) == value != getattr(previous, key)
        assert dataclasses.replace(experiment, **{key: getattr(previous, key)}) == previous
    for path in root.glob("*.yaml"):  # and every config in the folder loads
        load_config(path, VAETrainConfig if "vae" in path.name else FlowTrainConfig)


def test_unknown_key_is_an_error_naming_the_key(tmp_path):
    (tmp_path / "c.yaml").write_text("steps: 10\noptim:\n  lr: 0.1\n  lrr: 3\n")
    with pytest.raises(CTFlowError, match="optim.'lrr'"):
        load_config(tmp_path / "c.yaml", FlowTrainConfig)


def test_wrong_type_and_bad_yaml_are_errors(tmp_path):
    (tmp_path / "c.yaml").write_text("steps: many\n")
    with pytest.raises(CTFlowError, match="steps must be int"):
        load_config(tmp_path / "c.yaml", FlowTrainConfig)
    (tmp_path / "d.yaml").write_text("steps: [1,\n")
    with pytest.raises(CTFlowError, match="not valid YAML"):
        load_config(tmp_path / "d.yaml", FlowTrainConfig)
    # a key given twice is an error, not "the last one wins" (a broken header once hid this way)
    (tmp_path / "e.yaml").write_text("transformer: note\nsteps: 5\ntransformer:\n  depth: 2\n")
    with pytest.raises(CTFlowError, match="not valid YAML: key 'transformer' is given twice"):
        load_config(tmp_path / "e.yaml", FlowTrainConfig)


@pytest.mark.parametrize(
    ("text", "words", "cls"),
    [
        ("42\n", "must hold key: value settings, got int", FlowTrainConfig),
        ("database\n", "must hold key: value settings, got str", FlowTrainConfig),
        ("\n", "is empty", FlowTrainConfig),
        ("transformer: null\n", "transformer must be a mapping", FlowTrainConfig),
        ("transformer: [1, 2]\n", "transformer must be a mapping", FlowTrainConfig),
        ("optim:\n  betas: 0.9\n", "optim.betas must be a list of numbers", FlowTrainConfig),
        ("steps: true\n", "steps must be int", FlowTrainConfig),
        ("batch_size: 0\n", "batch_size must be 1 or more", FlowTrainConfig),
        ("log_every: 0\n", "log_every must be 1 or more", FlowTrainConfig),
        ("checkpoint_every: 0\n", "checkpoint_every must be 1 or more", FlowTrainConfig),
        ("steps: 0\n", "steps must be 1 or more", FlowTrainConfig),
        ("mixed_precision: fp8\n", "mixed_precision must be 'no', 'bf16' or 'fp16'", FlowTrainConfig),
        ("init: 5\n", "init must be str or null", VAETrainConfig),
        ("base: 3\n", "base in", FlowTrainConfig),
        ("optim: 0.001\n", "optim must be a mapping, got float", FlowTrainConfig),  # not "optim."
    ],
)
def test_malformed_configs_are_one_line_errors(tmp_path, text, words, cls):
    """Each once ended in a traceback (TypeError, IndexError, ZeroDivisionError...) or ran untrained."""
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(CTFlowError, match=words.replace("(", r"\(").replace(")", r"\)")):
        load_config(tmp_path / "c.yaml", cls)


def test_a_base_chain_that_loops_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\nsteps: 3\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(CTFlowError, match="is its own base"):
        load_config(tmp_path / "a.yaml", FlowTrainConfig)
    # a section set to null below is replaced by the mapping above it
    (tmp_path / "n.yaml").write_text("transformer: null\n")
    (tmp_path / "m.yaml").write_text("base: n.yaml\ntransformer:\n  preset: tiny\n")
    assert load_config(tmp_path / "m.yaml", FlowTrainConfig).transformer == {"preset": "tiny"}


def test_a_config_can_start_from_a_base_file(tmp_path):
    (tmp_path / "base.yaml").write_text("steps: 10\nbatch_size: 4\noptim:\n  lr: 0.1\n  warmup_steps: 5\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.yaml").write_text("base: ../base.yaml\nsteps: 20\noptim:\n  lr: 0.2\n")
    cfg = load_config(tmp_path / "sub" / "c.yaml", FlowTrainConfig)
    # its own keys win, nested sections merge key by key, the rest comes from the base
    assert (cfg.steps, cfg.batch_size, cfg.optim.lr, cfg.optim.warmup_steps) == (20, 4, 0.2, 5)
    (tmp_path / "bad.yaml").write_text("base: base.yaml\noptim:\n  lrr: 3\n")
    with pytest.raises(CTFlowError, match="optim.'lrr'"):
        load_config(tmp_path / "bad.yaml", FlowTrainConfig)
    (tmp_path / "orphan.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(CTFlowError, match="missing.yaml not found"):
        load_config(tmp_path / "orphan.yaml", FlowTrainConfig)


def test_optim_values_are_checked_and_a_vae_optim_section_keeps_the_vae_defaults(tmp_path):
    for bad, rule in [
        ("lr: -0.1", "optim.lr must be 0 or more"),
        ("grad_clip: -1", "optim.grad_clip must be 0 or more"),
        ("ema_decay: 1.0", "optim.ema_decay must be in"),
        ("betas: [0.9, 1.5]", "optim.betas"),
    ]:
        (tmp_path / "c.yaml").write_text(f"optim:\n  {bad}\n")
        with pytest.raises(CTFlowError, match=rule):
            load_config(tmp_path / "c.yaml", FlowTrainConfig)
    (tmp_path / "z.yaml").write_text("optim:\n  lr: 0\n")  # allowed, but never silently
    with pytest.warns(CTFlowWarning, match="optim.lr is 0: .* weights do not change"):
        assert load_config(tmp_path / "z.yaml", FlowTrainConfig).optim.lr == 0
    # optim: {lr} in a VAE config keeps the VAE's warm-up and ema_decay 0, not the flow defaults
    (tmp_path / "v.yaml").write_text("optim:\n  lr: 0.0005\n")
    optim = load_config(tmp_path / "v.yaml", VAETrainConfig).optim
    assert (optim.lr, optim.warmup_steps, optim.ema_decay) == (0.0005, 50, 0.0)
    (tmp_path / "e.yaml").write_text("optim:\n  ema_decay: 0.99\n")
    with pytest.raises(CTFlowError, match="VAE trainer keeps no EMA"):  # it would be silently ignored
        load_config(tmp_path / "e.yaml", VAETrainConfig)


@pytest.mark.parametrize(
    ("key", "value"),
    [("meta_dropout", 1.5), ("cfg_dropout", -0.1), ("context_noise", -0.05), ("context_noise_max", 0.01)],
)
def test_sampling_values_out_of_range_are_refused(key, value):
    with pytest.raises(CTFlowError, match=key):
        FlowTrainConfig(**{key: value})  # (context_noise_max below the default noise 0.05)


def test_config_values_are_read():
    cfg = FlowTrainConfig()
    assert cfg.start_boost == 0.5 and cfg.optim.betas == (0.9, 0.99)
    assert cfg.loss_space == "velocity" and cfg.time_mean == 0.0


def test_loss_space_is_checked_when_the_config_loads(tmp_path):
    (tmp_path / "a.yaml").write_text("loss_space: sample\ntime_mean: 1\n")
    cfg = load_config(tmp_path / "a.yaml", FlowTrainConfig)
    assert cfg.loss_space == "sample" and cfg.time_mean == 1.0
    (tmp_path / "b.yaml").write_text("loss_space: x0\n")
    with pytest.raises(CTFlowError, match="loss_space must be 'velocity' or 'sample'"):
        load_config(tmp_path / "b.yaml", FlowTrainConfig)


def test_time_distribution_is_checked_when_the_config_loads(tmp_path):
    (tmp_path / "a.yaml").write_text("time_distribution: uniform\n")
    assert load_config(tmp_path / "a.yaml", FlowTrainConfig).time_distribution == "uniform"
    (tmp_path / "b.yaml").write_text("time_distribution: beta\n")
    with pytest.raises(
        CTFlowError, match="time_distribution must be 'logit_normal' or 'uniform', got 'beta'"
    ):
        load_config(tmp_path / "b.yaml", FlowTrainConfig)


def test_restore_keeps_the_runs_own_optimizer_settings_and_the_saved_rate(tmp_path):
    model, opt = _model_and_opt()
    opt.param_groups[0]["lr"] = 0.05  # where a schedule had reached
    save_checkpoint(tmp_path, 1, {"model": model}, {"opt": opt}, {})
    fresh = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.3, betas=(0.8, 0.95))
    restore(list_checkpoints(tmp_path)[-1], {"model": model}, {"opt": fresh})
    group = fresh.param_groups[0]
    assert (group["weight_decay"], group["betas"]) == (0.3, (0.8, 0.95))  # a fine-tune's own settings
    assert group["lr"] == 0.05 and fresh.state_dict()["state"]  # the saved rate and moments


def _model_and_opt():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return model, opt


def test_checkpoint_round_trip_restores_model_and_optimizer(tmp_path):
    model, opt = _model_and_opt()
    save_checkpoint(tmp_path, 7, {"model": model}, {"opt": opt}, {"note": "x"})
    model2, opt2 = torch.nn.Linear(4, 3), None
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.5)
    info = restore(tmp_path / "step_0000007", {"model": model2}, {"opt": opt2})
    assert info["step"] == 7 and info["note"] == "x"
    torch.testing.assert_close(model2.weight, model.weight)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s2["param_groups"][0]["lr"] == 0.1
    torch.testing.assert_close(s2["state"][0]["exp_avg"], s1["state"][0]["exp_avg"])
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.bin"))


def test_only_the_last_k_checkpoints_are_kept(tmp_path):
    model, opt = _model_and_opt()
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, {"model": model}, {"opt": opt}, {}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000003", "step_0000004"]


def test_sigkill_during_save_leaves_the_previous_checkpoint_intact(tmp_path):
    model, opt = _model_and_opt()
    save_checkpoint(tmp_path, 1, {"model": model}, {"opt": opt}, {})
    script = textwrap.dedent(f"""
        import os, signal, torch
        import ctflow.train.checkpoint as ck
        real = ck.save_file
        def dying(tensors, path):
            real(tensors, path)
            os.kill(os.getpid(), signal.SIGKILL)  # killed after writing, before the rename
        ck.save_file = dying
        m = torch.nn.Linear(4, 3)
        ck.save_checkpoint({str(tmp_path)!r}, 2, {{"model": m}}, {{}}, {{}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000001"]
    groups, info = load_checkpoint(tmp_path / "step_0000001")
    torch.testing.assert_close(groups["model"]["weight"], model.weight.detach())
    assert os.path.isdir(tmp_path)


def test_exponents_without_a_dot_are_numbers(tmp_path):
    """YAML 1.1 reads 1e-4 as a string, so `lr: 1e-4` was refused as "must be float, got '1e-4'"."""
    (tmp_path / "c.yaml").write_text("steps: 1e3\noptim:\n  lr: 1e-4\n  weight_decay: 5E-2\n")
    config = load_config(tmp_path / "c.yaml", FlowTrainConfig)
    assert (config.steps, config.optim.lr, config.optim.weight_decay) == (1000, 1e-4, 0.05)
    (tmp_path / "d.yaml").write_text("init: 12e\n")  # not a number: still a string
    assert load_config(tmp_path / "d.yaml", VAETrainConfig).init == "12e"
