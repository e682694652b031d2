"""End-to-end `evaluate` on a tiny phantom data set and a folder of "generated" phantoms."""

import json

import pytest
import torch

from ctflow.data.ctrate import CTRateWriter
from ctflow.data.nifti import write_nifti
from ctflow.data.phantom import make_phantom, sample_spec
from ctflow.data.reports import phantom_report
from ctflow.errors import CTFlowError
from ctflow.eval.evaluate import evaluate, evaluate_command
from ctflow.models.text import format_report

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    real = root / "real"
    writer = CTRateWriter(real, "train")
    for i in range(4):
        vol, gt = make_phantom(sample_spec(33_000 + i, size=64, slice_range=(40, 80)))
        writer.add(i, vol, phantom_report(gt, 33_000 + i), gt["labels"])
    writer.close()
    fake = root / "fake"
    fake.mkdir()
    for i in range(3):
        seed = 33_100 + i
        vol, gt = make_phantom(sample_spec(seed, size=64, slice_range=(40, 80)))
        rep = phantom_report(gt, seed)
        write_nifti(vol, fake / f"gen_{i}.nii.gz", synthetic=True)
        sidecar = {"report": format_report(rep["Findings_EN"], rep["Impressions_EN"], vol.num_slices)}
        if i == 0:  # the sidecar's request wins over the meta line; 9 slices off = outside one chunk
            sidecar |= {"requested_slices": vol.num_slices + 9, "num_slices": vol.num_slices}
        (fake / f"gen_{i}.json").write_text(json.dumps(sidecar))
    return root, real, fake


@pytest.fixture(scope="module")
def results(sets):
    root, real, fake = sets
    return evaluate(real, fake, root / "out")


def test_evaluate_writes_results_and_a_markdown_table(sets, results):
    root, _, _ = sets
    saved = json.loads((root / "out" / "results.json").read_text())
    assert saved["n_real"] == 4 and saved["n_generated"] == 3
    for key in (
        "fid",
        "fvd",
        "clip_score",
        "attribute_accuracy",
        "slice_count",
        "continuity",
        "memorization",
    ):
        assert key in saved, key
    assert set(saved["fid"]) == {"axial", "coronal", "sagittal"}
    assert saved["fvd"] >= 0 and all(v >= 0 for v in saved["fid"].values())
    md = (root / "out" / "report.md").read_text()
    assert "| Metric | Value | Note |" in md and "FID axial" in md and "CLIP score" in md


def test_evaluate_scores_slice_counts_attributes_and_memorisation(results):
    assert results["slice_count"]["n"] == 3
    assert results["slice_count"]["within_chunk"] == pytest.approx(2 / 3)
    acc = results["attribute_accuracy"]
    assert 0.0 <= acc["generated_mean"] <= 1.0 and set(acc["generated"]) == set(acc["real"])
    assert results["memorization"]["fraction_flagged"] == 0.0  # new phantoms are not copies
    assert 0.7 < results["continuity"]["generated"] < 1.3
    names = [v["name"] for v in results["per_volume"]]
    assert names == ["gen_0", "gen_1", "gen_2"]


def test_evaluate_refuses_existing_outputs_unless_overwrite(sets, results, capsys):
    root, real, fake = sets
    with pytest.raises(CTFlowError, match="already exists"):
        evaluate(real, fake, root / "out")
    again = evaluate_command(real, fake, root / "out", overwrite=True)
    assert again["n_generated"] == 3
    assert "wrote" in capsys.readouterr().out


def test_evaluate_names_bad_inputs(sets, tmp_path):
    _, real, fake = sets
    with pytest.raises(CTFlowError, match="not found"):
        evaluate(tmp_path / "missing", fake, tmp_path / "o1")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CTFlowError, match="no generated volumes"):
        evaluate(real, empty, tmp_path / "o2")
    with pytest.raises(CTFlowError, match="is a file; pass the folder of generated volumes"):
        evaluate(real, fake / "gen_1.nii.gz", tmp_path / "o2")
    with pytest.raises(CTFlowError, match="CT-RATE layout"):
        evaluate(empty, fake, tmp_path / "o3")
    orphan = tmp_path / "orphan"
    orphan.mkdir()
    (orphan / "x.nii.gz").write_bytes((fake / "gen_1.nii.gz").read_bytes())
    with pytest.raises(CTFlowError, match="no sidecar x.json"):
        evaluate(real, orphan, tmp_path / "o4")
    (orphan / "x.json").write_text(json.dumps({"seed": 1}))
    with pytest.raises(CTFlowError, match="no 'report'"):
        evaluate(real, orphan, tmp_path / "o5")
    (orphan / "x.json").write_text("{not json")
    with pytest.raises(CTFlowError, match="cannot read sidecar"):
        evaluate(real, orphan, tmp_path / "o6")
    (orphan / "x.json").write_text(json.dumps({"report": "Findings: clear.", "chunk_slices": 1}))
    with pytest.raises(CTFlowError, match="x.json: chunk_slices must be a whole number of at least 2"):
        evaluate(real, orphan, tmp_path / "o7")
    (orphan / "x.json").write_text(json.dumps({"report": "Findings: clear."}))
    (orphan / "x.nii").write_bytes(b"")  # x.nii and x.nii.gz would share x.json
    with pytest.raises(CTFlowError, match="holds x.nii and x.nii.gz, which share one sidecar"):
        evaluate(real, orphan, tmp_path / "o8")
    (orphan / "x.nii").unlink()
    (orphan / "gone.nii.gz").symlink_to(tmp_path / "nowhere.nii.gz")
    with pytest.raises(CTFlowError, match="gone.nii.gz is not a readable file"):
        evaluate(real, orphan, tmp_path / "o9")
    dicom = tmp_path / "dicom"
    (dicom / "series").mkdir(parents=True)
    with pytest.raises(CTFlowError, match="DICOM files or series folders are not read"):
        evaluate(real, dicom, tmp_path / "o10")
    # --train is checked, and named, before the slow loading of the other sets
    with pytest.raises(CTFlowError, match="--train data set .*nothere not found"):
        evaluate(real, fake, tmp_path / "o11", train_dir=tmp_path / "nothere")
    with pytest.raises(CTFlowError, match="--train .*fake is not a data set in the CT-RATE layout"):
        evaluate(real, fake, tmp_path / "o12", train_dir=fake)
    # a data set passed as --fake was blamed on DICOM
    with pytest.raises(
        CTFlowError, match="is a data set in the CT-RATE layout, not generated volumes; pass it as --real"
    ):
        evaluate(real, real, tmp_path / "o13")


def test_evaluate_reads_upper_case_names_and_skips_hidden_files(sets, tmp_path):
    """`ctflow generate --out CT.NII.GZ` writes such names; a run killed mid-write leaves a hidden
    temporary file (and macOS `._` files), which evaluate named as volumes without sidecars."""
    import shutil

    _, real, fake = sets
    folder = tmp_path / "fake"
    folder.mkdir()
    shutil.copy(fake / "gen_1.nii.gz", folder / "CT.NII.GZ")
    shutil.copy(fake / "gen_1.json", folder / "CT.json")
    shutil.copy(fake / "gen_2.nii.gz", folder / "b.nii.gz")
    shutil.copy(fake / "gen_2.json", folder / "b.json")
    (folder / ".c.nii.gz.k3j2h1.tmp.nii.gz").write_bytes(b"half")
    (folder / "._b.nii.gz").write_bytes(b"resource fork")
    lines = []
    res = evaluate(real, folder, tmp_path / "out", log=lines.append)
    assert res["n_generated"] == 2
    assert any("not reading 2 hidden file(s)" in line for line in lines)


def test_evaluate_names_every_real_volume_it_skips_and_records_them(sets, tmp_path):
    import shutil

    _, real, fake = sets
    broken = shutil.copytree(real, tmp_path / "real")
    volumes = sorted((broken / "dataset").rglob("*.nii.gz"))
    volumes[0].write_bytes(b"not a nifti")
    volumes[1].unlink()
    lines = []
    res = evaluate(broken, fake, tmp_path / "out", log=lines.append)
    assert res["n_real"] == 2 and len(res["skipped"]["real"]) == 2
    assert sum(line.startswith("--real train: skipped") for line in lines) == 2
    assert json.loads((tmp_path / "out/results.json").read_text())["skipped"] == res["skipped"]


def test_a_sidecar_asking_for_infinitely_many_slices_falls_back_to_the_meta_line():
    from ctflow.eval.evaluate import _Item, requested_slices

    item = _Item(
        "x", None, "Volume: 40 slices. Findings: clear.", 40, sidecar={"requested_slices": float("inf")}
    )
    assert requested_slices(item) == 40


def test_evaluate_reads_the_models_chunk_and_audits_copies_against_the_training_set(sets, tmp_path, run_cli):
    """A 16-slice-chunk model's seams and slice counts are judged at 16, not 8; a copy of a training
    volume is flagged when --train names the training set; paths print as text, not rich markup."""
    import shutil

    import numpy as np

    from ctflow.data.nifti import read_nifti
    from ctflow.data.volume import Volume
    from ctflow.eval.metrics import continuity

    _, real, _ = sets
    fake = tmp_path / "[v2]"
    fake.mkdir()
    train_volume = next((real / "dataset").rglob("*.nii.gz"))
    shutil.copy(train_volume, fake / "copy.nii.gz")
    n = read_nifti(train_volume).num_slices
    (fake / "copy.json").write_text(
        json.dumps({"report": "Findings: clear.", "requested_slices": n + 12, "chunk_slices": 16})
    )
    vol, gt = make_phantom(sample_spec(33_200, size=64, slice_range=(96, 96)))
    hu = vol.hu().copy()
    for start in range(16, 96, 32):  # every other 16-slice chunk brighter and shifted: seams at 16, 32, ...
        hu[start : start + 16] = np.roll(hu[start : start + 16], 2, axis=2) + 60
    write_nifti(Volume(hu, vol.spacing, vol.affine), fake / "seams.nii.gz", synthetic=True)
    (fake / "seams.json").write_text(
        json.dumps({"report": "Findings: clear.", "requested_slices": 96, "chunk_slices": 16})
    )
    r = run_cli("evaluate", "--real", real, "--fake", fake, "--out", tmp_path / "out", "--train", real)
    assert r.code == 0, r.err
    assert "[v2]" in r.err + r.out
    assert "| FID axial |" in r.out and "| FID axial |" not in r.err  # the table on stdout, notes on stderr
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["slice_count"]["within_chunk"] == 1.0  # 12 slices off is within one 16-slice chunk
    assert res["slice_count"]["within_8_slices"] == 0.5  # but not within 8: the same yardstick for all
    assert res["continuity"]["chunk"] == 16
    seams = next(v for v in res["per_volume"] if v["name"] == "seams")
    assert seams["continuity"] == pytest.approx(continuity(hu, 16)["ratio"], rel=1e-4)
    assert seams["continuity"] > 1.5 * continuity(hu, 8)["ratio"] > 0  # the 8-slice view halves the seams
    mem = res["memorization"]
    assert mem["against"] == "train" and [f["generated"] for f in mem["flagged"]] == ["copy"]
    assert res["fid_slices"] == {"real": 64, "generated": 32}
    md = (tmp_path / "out" / "report.md").read_text()
    assert "against the training set" in md and "rough: 32 slices a plane" in md


def test_the_clip_score_reads_the_text_the_model_was_given(sets, tmp_path, monkeypatch):
    """A generated volume's sidecar holds the user's report and the conditioning text (with its meta
    line, as real reports are formatted); the CLIP score compares like with like."""
    import shutil

    import ctflow.eval.metrics

    _, real, fake = sets
    copy = tmp_path / "fake"
    shutil.copytree(fake, copy)
    side = json.loads((copy / "gen_1.json").read_text())
    side["conditioning_text"] = "Volume: 50 slices, 2.5 mm spacing. " + side["report"]
    (copy / "gen_1.json").write_text(json.dumps(side))
    seen = []
    original = ctflow.eval.metrics.clip_score
    monkeypatch.setattr(
        ctflow.eval.metrics, "clip_score", lambda v, texts, **k: seen.append(texts) or original(v, texts, **k)
    )
    evaluate(real, copy, tmp_path / "out")
    assert (
        seen[0][1] == side["conditioning_text"]
        and seen[0][0] == json.loads((copy / "gen_0.json").read_text())["report"]
    )


def test_evaluate_says_when_it_pools_several_splits_of_the_real_set(sets, tmp_path):
    import shutil

    _, real, fake = sets
    both = shutil.copytree(real, tmp_path / "real")
    writer = CTRateWriter(both, "valid")
    vol, gt = make_phantom(sample_spec(33_200, size=64, slice_range=(40, 48)))
    writer.add(0, vol, phantom_report(gt, 33_200), gt["labels"])
    writer.close()
    lines = []
    res = evaluate(both, fake, tmp_path / "out", log=lines.append)
    assert res["n_real"] == 5
    assert any("5 volumes from every split (train, valid), pooled" in line for line in lines)


def test_a_volume_without_lungs_is_counted_wrong_on_every_attribute_and_named(sets, tmp_path):
    """A blank volume under a normal report read as normal: 100% attribute accuracy."""
    import numpy as np

    from ctflow.data.volume import Volume

    _, real, _ = sets
    fake = tmp_path / "fake"
    fake.mkdir()
    normal = "Findings: No pleural effusion. Heart size is normal. Impressions: Normal chest."
    write_nifti(Volume(np.full((40, 64, 64), -1000, np.int16), (5.0, 5.0, 5.0)), fake / "blank.nii.gz")
    (fake / "blank.json").write_text(json.dumps({"report": normal}))
    write_nifti(Volume(np.full((2, 64, 64), -1000, np.int16), (5.0, 5.0, 5.0)), fake / "blank2.nii.gz")
    (fake / "blank2.json").write_text(json.dumps({"report": normal}))
    res = evaluate(real, fake, tmp_path / "out")
    assert res["no_lungs"] == {"generated": ["blank", "blank2"], "real": []}
    assert res["attribute_accuracy"]["generated_mean"] == 0.0
    assert res["per_volume"][0]["has_lungs"] is False
    assert res["fid_slices"]["generated"] == 16 + 2  # the 2-slice volume's axial slices, not 16 repeats
    report = (tmp_path / "out/report.md").read_text()
    assert (
        "2 generated volume(s) without recognisable lungs, counted wrong on every attribute: `blank`"
        in report
    )
