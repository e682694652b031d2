import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ctflow.data.io import read_volume
from ctflow.errors import CTFlowError
from ctflow.files import check_output
from tests.conftest import assert_clean_error
from tests.tiny_pipeline import tiny_pipeline

REPORT = "Findings: Heart size is normal. No pleural effusion. Impressions: Normal chest CT."


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny"
    tiny_pipeline().save_pretrained(path)
    return path


def _gen(run_cli, model, *args):
    if "--steps" not in args:
        args = (*args, "--steps", 2)
    return run_cli("generate", *args, "--model", model)


def test_generate_writes_nifti_preview_and_sidecar(model, tmp_path, run_cli):
    r = _gen(
        run_cli,
        model,
        REPORT,
        "--out",
        tmp_path / "ct.nii.gz",
        "--slices",
        6,
        "--seed",
        5,
        "--dicom",
        tmp_path / "dcm",
    )
    assert r.code == 0, r.err
    vol = read_volume(tmp_path / "ct.nii.gz")
    assert vol.num_slices == 6 and vol.synthetic
    assert read_volume(tmp_path / "dcm").num_slices == 6
    assert (tmp_path / "ct.png").stat().st_size > 0
    side = json.loads((tmp_path / "ct.json").read_text())
    assert side["report"] == REPORT and side["seed"] == 5 and side["steps"] == 2 and side["guidance"] == 2.0
    assert side["synthetic"] is True and side["end_reason"] == "num_slices" and side["num_slices"] == 6
    assert side["model"] == "tiny-test" and len(side["model_weights_sha256"]) == 16
    assert side["ctflow_version"] and side["seconds"] > 0
    assert "finding_flags" not in side  # this model does not read them
    assert side["report_tokens_truncated"] == 0 and side["chunk_slices"] == 4  # the tiny model's chunk


def test_the_sidecar_says_how_much_of_a_long_report_the_model_did_not_read(model, tmp_path, run_cli):
    long = REPORT + " The lungs are clear." * 80
    r = _gen(run_cli, model, long, "--out", tmp_path / "ct.nii.gz", "--slices", 4)
    assert r.code == 0, r.err
    # one line, not Python's warning with a source path and line
    assert "warning: report truncated by" in r.err and "UserWarning" not in r.err
    side = json.loads((tmp_path / "ct.json").read_text())
    from ctflow.models.text import ReportEncoder

    cut = ReportEncoder.from_pretrained().truncated_tokens([side["conditioning_text"]])[0]
    assert side["report_tokens_truncated"] == cut > 100
    assert side["warning"].startswith(f"report truncated by {cut} tokens")  # as printed, kept with the volume
    assert f"warning: {side['warning']}" in r.err


def test_a_slice_count_the_model_never_trained_on_is_warned_about(tmp_path, run_cli):
    """Far outside its training counts a model draws no chest: a one-line warning, a note in the
    sidecar; inside them, neither. The model records its training counts (ctflow assemble)."""
    pipe = tiny_pipeline()
    pipe.config["training_slices"] = [4, 12]
    pipe.save_pretrained(tmp_path / "m")
    for slices, warned in ((3, True), (8, False), (14, True)):
        r = _gen(run_cli, tmp_path / "m", REPORT, "--out", tmp_path / f"{slices}.nii.gz", "--slices", slices)
        assert r.code == 0, r.err
        note = json.loads((tmp_path / f"{slices}.json").read_text()).get("warning")
        line = f"warning: {slices} slices lies outside the 4 to 12 of this model's training scans"
        assert (line in r.err) == warned and bool(note) == warned and (not note or note in r.err)
    from ctflow.errors import CTFlowWarning

    with pytest.warns(CTFlowWarning, match="20 slices lies outside") as record:  # the library warns as well
        pipe("Volume: 20 slices. " + REPORT, num_inference_steps=1, max_slices=20)
    # attributed to this line, not to ctflow or torch's no_grad wrapper, so filters by module work
    assert record and {w.filename for w in record} == {__file__}


def test_the_sidecar_records_the_finding_flags_a_findings_model_read(tmp_path):
    from ctflow.generate import GenerationSettings, generate_one

    pipe = tiny_pipeline(num_findings=6)
    report = "Findings: Right pleural effusion. Impressions: Cardiomegaly."
    side = generate_one(
        pipe, report, tmp_path / "ct.nii.gz", GenerationSettings(num_slices=4, steps=1, seed=0)
    )
    assert side["finding_flags"]["effusion_right"] == 1.0 and side["finding_flags"]["cardiomegaly"] == 1.0
    assert side["finding_flags"]["effusion_left"] == 0.0
    assert json.loads((tmp_path / "ct.json").read_text())["finding_flags"] == side["finding_flags"]
    assert "finding_guidance" not in side  # the default: the same as --guidance
    settings = GenerationSettings(num_slices=4, steps=1, seed=0, finding_guidance=5.0)
    side = generate_one(pipe, report, tmp_path / "fg.nii.gz", settings)
    assert side["finding_guidance"] == 5.0


def test_same_seed_reproduces_the_volume(model, tmp_path, run_cli):
    for name in ("a", "b"):
        assert (
            _gen(
                run_cli, model, REPORT, "--out", tmp_path / f"{name}.nii.gz", "--slices", 5, "--seed", 1
            ).code
            == 0
        )
    import numpy as np

    np.testing.assert_array_equal(
        read_volume(tmp_path / "a.nii.gz").array, read_volume(tmp_path / "b.nii.gz").array
    )


def test_report_file_and_no_overwrite(model, tmp_path, run_cli):
    (tmp_path / "r.txt").write_text(REPORT)
    args = ("--report-file", tmp_path / "r.txt", "--out", tmp_path / "g.nii.gz", "--slices", 4)
    assert _gen(run_cli, model, *args).code == 0
    before = (tmp_path / "g.json").read_text()
    assert_clean_error(_gen(run_cli, model, *args), "--overwrite")
    assert (tmp_path / "g.json").read_text() == before
    assert _gen(run_cli, model, *args, "--overwrite").code == 0


def test_a_report_file_with_a_byte_order_mark_keeps_its_meta_line(model, tmp_path, run_cli):
    (tmp_path / "r.txt").write_bytes(f"\ufeffVolume: 5 slices, 3 mm spacing.\r\n{REPORT}\r\n".encode())
    assert _gen(run_cli, model, "--report-file", tmp_path / "r.txt", "--out", tmp_path / "g.nii.gz").code == 0
    side = json.loads((tmp_path / "g.json").read_text())
    assert side["conditioning_text"].startswith("Volume: 5 slices, 3 mm spacing.")
    assert side["spacing_mm"][0] == 3.0  # the meta line's (its count is the model's target, not a limit)


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_dicom_folder_holding_another_output_is_refused_before_generating(
    model, tmp_path, run_cli, monkeypatch, overwrite
):
    """Writing a series replaces its folder: one that holds the NIfTI (or is one of the files) would
    delete it, or leave it half-written, after generating."""
    flag = ("--overwrite",) if overwrite else ()
    monkeypatch.chdir(tmp_path)
    for out, dicom in (("d/ct.nii.gz", "d"), ("e/f/ct.nii.gz", "e"), ("g/ct.nii.gz", "g/ct.png")):
        r = _gen(run_cli, model, REPORT, "--out", out, "--dicom", dicom, "--slices", 4, *flag)
        assert_clean_error(r, "folder of its own")
    assert not any(tmp_path.iterdir())  # nothing written
    # nor the folder ctflow runs in, which --overwrite would replace with the series
    (tmp_path / "keep.txt").write_text("mine")
    r = _gen(run_cli, model, REPORT, "--out", "../x.nii.gz", "--dicom", ".", "--slices", 4, *flag)
    # (with --overwrite the folder's other files are found first)
    assert_clean_error(
        r, "holds keep.txt, not only a DICOM series" if overwrite else "the folder ctflow runs in"
    )
    assert (tmp_path / "keep.txt").read_text() == "mine" and not (tmp_path.parent / "x.nii.gz").exists()


def test_a_meta_line_out_of_range_or_a_nameless_output_is_a_clear_error(model, tmp_path, run_cli):
    for report, word in (
        ("Volume: 10000000000000000000 slices. " + REPORT, "asks for 10000000000000000000 slices"),
        ("Volume: 40 slices, 5000 mm spacing. " + REPORT, "5000 mm spacing"),
    ):
        assert_clean_error(_gen(run_cli, model, report, "--out", tmp_path / "o.nii.gz"), word)
    # a requested count replaces the line's: then its count is not read, nor refused
    huge = "Volume: 10000000000000000000 slices. " + REPORT
    assert _gen(run_cli, model, huge, "--out", tmp_path / "ok.nii.gz", "--slices", 4).code == 0
    for f in tmp_path.glob("ok.*"):
        f.unlink()
    # an output name that is all extension would write hidden files (.nii.gz, .png, .json)
    assert_clean_error(_gen(run_cli, model, REPORT, "--out", tmp_path / ".nii.gz"), "no name before")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("args", "word"),
    [
        (("",), "empty"),
        (("--report-file", "MISSING"), "not found"),
        ((REPORT, "--steps", "0"), "--steps"),
        ((REPORT, "--guidance", "-1"), "--guidance"),
        ((REPORT, "--finding-guidance", "-1"), "--finding-guidance"),
        ((REPORT, "--slices", "-4"), "--slices"),
        ((), "exactly one"),
        ((REPORT, "--report-file", "x.txt"), "exactly one"),
        ((REPORT, "--device", "gpu"), "--device"),
        ((REPORT, "--device", "cuda"), "no CUDA GPU"),  # the CPU build of torch these tests run on
        ((REPORT, "--device", "xla"), "cpu, cuda or mps"),
        ((REPORT, "--dtype", "half"), "--dtype"),
        ((REPORT, "--seed", str(2**64)), "--seed"),
        ((REPORT, "--dicom", "ct.dcm"), "DICOM series is written as a folder"),  # refused before generating
    ],
)
def test_bad_generate_arguments(model, tmp_path, run_cli, args, word):
    args = tuple(str(tmp_path / a) if a in ("MISSING", "ct.dcm") else a for a in args)
    assert_clean_error(_gen(run_cli, model, *args, "--out", tmp_path / "o.nii.gz"), word)
    assert not any(tmp_path.iterdir())


def test_empty_report_file(model, tmp_path, run_cli):
    (tmp_path / "r.txt").write_text("  \n")
    assert_clean_error(
        _gen(run_cli, model, "--report-file", tmp_path / "r.txt", "--out", tmp_path / "o.nii.gz"), "empty"
    )


def test_broken_model_folders_are_refused(model, tmp_path, run_cli):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(model, bad)
    (bad / "vae" / "weights.pt").write_bytes(b"\x80\x04")
    assert_clean_error(_gen(run_cli, bad, REPORT, "--out", tmp_path / "o.nii.gz"), "pickle")
    (bad / "vae" / "weights.pt").unlink()
    shutil.rmtree(bad / "transformer")
    assert_clean_error(_gen(run_cli, bad, REPORT, "--out", tmp_path / "o.nii.gz"), "transformer/")
    assert_clean_error(_gen(run_cli, tmp_path / "none", REPORT, "--out", tmp_path / "o.nii.gz"), "not found")
    assert not (tmp_path / "o.nii.gz").exists()


def _prompts(path, n=4):
    rows = ["name,report,slices,seed"] + [f'case{i},"Findings: case {i}.",{4 + i},{i}' for i in range(n)]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_prompts_csv_is_resumable(model, tmp_path, run_cli):
    csv = _prompts(tmp_path / "p.csv", n=3)
    r = _gen(run_cli, model, "--prompts", csv, "--out", tmp_path / "out")
    assert r.code == 0 and "wrote" in r.err and "(rank" not in r.err  # one process: no rank to name
    done = sorted(p.name for p in (tmp_path / "out").glob("*.json"))
    assert done == ["case0.json", "case1.json", "case2.json"]
    assert read_volume(tmp_path / "out/case2.nii.gz").num_slices == 6
    assert not list((tmp_path / "out").glob(".*"))  # no row left marked as under way
    stamp = (tmp_path / "out/case1.json").stat().st_mtime_ns
    # the prompts file changed under a finished row: refused, not silently kept as "finished"
    csv.write_text(csv.read_text().replace("case 1.", "case one."))
    assert_clean_error(_gen(run_cli, model, "--prompts", csv, "--out", tmp_path / "out"), "--overwrite")
    assert (tmp_path / "out/case1.json").stat().st_mtime_ns == stamp


def test_a_prompts_file_saved_again_with_other_line_ends_resumes(model, tmp_path, run_cli):
    """A quoted multi-line report keeps its CRLF in the cell: the same file saved with LF was refused."""
    rows = 'name,report,slices,seed\r\nr1,"Findings:\r\n- No pleural effusion\r\n- Cardiomegaly",6,5\r\n'
    (tmp_path / "crlf.csv").write_bytes(rows.encode())
    (tmp_path / "lf.csv").write_bytes(rows.replace("\r\n", "\n").encode())
    assert _gen(run_cli, model, "--prompts", tmp_path / "crlf.csv", "--out", tmp_path / "out").code == 0
    stamp = (tmp_path / "out/r1.json").stat().st_mtime_ns
    r = _gen(run_cli, model, "--prompts", tmp_path / "lf.csv", "--out", tmp_path / "out")
    assert r.code == 0, r.err
    assert (tmp_path / "out/r1.json").stat().st_mtime_ns == stamp  # finished, not redone


def test_report_files_and_prompts_in_utf16_are_named(tmp_path):
    from ctflow.generate import read_prompts, read_report_file

    (tmp_path / "bom.txt").write_bytes("Left pleural effusion.".encode("utf-16"))
    (tmp_path / "le.txt").write_bytes(
        "Left pleural effusion.".encode("utf-16-le")
    )  # read as letters and NULs
    for name in ("bom.txt", "le.txt"):
        with pytest.raises(CTFlowError, match="is not UTF-8 text"):
            read_report_file(tmp_path / name)
    (tmp_path / "p.csv").write_bytes("name,report\na,Findings: x.\n".encode("utf-16-le"))
    with pytest.raises(CTFlowError, match="is not UTF-8 text \\(UTF-16\\?\\)"):
        read_prompts(tmp_path / "p.csv")
    (tmp_path / "seed.csv").write_text("name,report,seed\na,Findings: x.,12345678901234567.0\n")
    with pytest.raises(CTFlowError, match="whole numbers"):  # past 2**53 a float has lost the digits
        read_prompts(tmp_path / "seed.csv")


def test_prompts_redo_a_row_stopped_half_way_and_never_replace_other_files(
    model, tmp_path, run_cli, monkeypatch
):
    import ctflow.data.preview

    csv = _prompts(tmp_path / "p.csv", n=3)
    (tmp_path / "out").mkdir()
    (tmp_path / "out/case1.png").write_bytes(b"someone else's picture")
    r = _gen(run_cli, model, "--prompts", csv, "--out", tmp_path / "out")
    assert_clean_error(r, "case1.png already exists; pass --overwrite")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["case1.png"]  # nothing generated
    (tmp_path / "out/case1.png").unlink()
    real = ctflow.data.preview.write_preview

    def stopped_at_case2(volume, path, **kw):
        if "case2" in str(path):
            raise KeyboardInterrupt  # killed after case2's NIfTI, before its preview and sidecar
        return real(volume, path, **kw)

    monkeypatch.setattr(ctflow.data.preview, "write_preview", stopped_at_case2)
    assert _gen(run_cli, model, "--prompts", csv, "--out", tmp_path / "out").code != 0  # (Ctrl-C: Aborted)
    # the NIfTI written before the stop is taken back; the row's marker stays, so a rerun redoes it
    assert not (tmp_path / "out/case2.nii.gz").exists() and not (tmp_path / "out/case2.json").exists()
    assert (tmp_path / "out/.case2.pending").exists()
    stamp = (tmp_path / "out/case1.json").stat().st_mtime_ns
    monkeypatch.setattr(ctflow.data.preview, "write_preview", real)
    r = _gen(run_cli, model, "--prompts", csv, "--out", tmp_path / "out")
    assert r.code == 0 and "skip case1" in r.err and "wrote" in r.err
    assert (tmp_path / "out/case1.json").stat().st_mtime_ns == stamp  # finished rows kept
    assert json.loads((tmp_path / "out/case2.json").read_text())["report"] == "Findings: case 2."
    assert not list((tmp_path / "out").glob(".*"))


def test_prompts_redo_a_finished_row_that_lost_a_file_and_refuse_changed_settings(model, tmp_path, run_cli):
    csv = _prompts(tmp_path / "p.csv", n=3)
    args = ("--prompts", csv, "--out", tmp_path / "out", "--dicom", tmp_path / "dcm")
    assert _gen(run_cli, model, *args).code == 0
    (tmp_path / "out/case0.nii.gz").unlink()
    shutil.rmtree(tmp_path / "dcm/case2")
    stamp = (tmp_path / "out/case1.json").stat().st_mtime_ns
    r = _gen(run_cli, model, *args)
    assert r.code == 0 and "skip case1" in r.err and "skip case0" not in r.err and "skip case2" not in r.err
    assert read_volume(tmp_path / "out/case0.nii.gz").num_slices == 4
    assert read_volume(tmp_path / "dcm/case2").num_slices == 6
    assert (tmp_path / "out/case1.json").stat().st_mtime_ns == stamp
    # other settings than the finished rows': refused, not silently kept
    assert_clean_error(_gen(run_cli, model, *args, "--steps", 3), "generated with steps 2, not 3")
    # a rerun with another --max-slices or --dtype was skipped as finished (the file kept the old ones)
    assert_clean_error(
        _gen(run_cli, model, *args, "--max-slices", 24), "generated with max_slices None, not 24"
    )
    assert_clean_error(_gen(run_cli, model, *args, "--dtype", "bfloat16"), "dtype float32, not bfloat16")
    assert (tmp_path / "out/case1.json").stat().st_mtime_ns == stamp
    assert json.loads((tmp_path / "out/case1.json").read_text())["max_slices"] is None
    # a sidecar from before max_slices was recorded: not refused for it
    for sidecar in (tmp_path / "out").glob("*.json"):
        side = json.loads(sidecar.read_text())
        del side["max_slices"]
        sidecar.write_text(json.dumps(side))
    r = _gen(run_cli, model, *args, "--max-slices", 24)
    assert r.code == 0 and "skip case1" in r.err


@pytest.mark.parametrize(
    ("name", "word"),
    [
        ("x" * 250, "at most 200 bytes"),
        ("a/b", "plain file name"),
        ("c.nii.gz", "without its extension"),
        ("a\x00b", "control characters"),  # a NUL gave a traceback after the model had loaded
    ],
)
def test_prompt_names_that_cannot_be_file_names_are_refused(tmp_path, name, word):
    from ctflow.generate import read_prompts

    (tmp_path / "p.csv").write_text(f"name,report\n{name},Findings: clear.\n")
    with pytest.raises(CTFlowError, match=word):
        read_prompts(tmp_path / "p.csv")


def test_a_file_in_the_way_of_another_process_row_stops_this_process_before_it_writes(
    model, tmp_path, run_cli, monkeypatch
):
    """Under torchrun each process checked only its own rows: rank 0 wrote its rows (and was killed
    mid-row) while rank 1 refused a file in the way of one of its own."""
    csv = _prompts(tmp_path / "p.csv", n=4)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "case3.png").write_text("not ours")  # row 3: rank 1's
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert_clean_error(
        _gen(run_cli, model, "--prompts", csv, "--out", tmp_path / "out"), "case3.png", "--overwrite"
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["case3.png"]


def test_prompts_csv_saved_by_a_spreadsheet_with_a_byte_order_mark_is_read(tmp_path):
    from ctflow.generate import read_prompts

    (tmp_path / "p.csv").write_bytes(
        b"\xef\xbb\xbfreport,slices\nFindings: clear.,8\n"
    )  # Excel's "CSV UTF-8"
    assert [(r["report"], r["slices"]) for r in read_prompts(tmp_path / "p.csv")] == [("Findings: clear.", 8)]


def test_prompts_rows_that_would_make_the_same_volume_are_named(model, tmp_path, run_cli):
    csv = tmp_path / "p.csv"  # row b's seed 0 is the one row a gets from --seed 0 + its index 0
    csv.write_text(f'name,report,seed\na,"{REPORT}",\nb,"{REPORT}",0\nc,"{REPORT}",\n')
    r = _gen(run_cli, model, "--prompts", csv, "--out", tmp_path / "out", "--slices", 4, "--seed", 0)
    assert r.code == 0, r.err
    warned = [line for line in r.err.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and "rows 'a' and 'b' have the same report, slice count and seed (0)" in warned[0]
    a, b = (read_volume(tmp_path / f"out/{n}.nii.gz").array for n in "ab")
    np.testing.assert_array_equal(a, b)  # as warned
    # rows that differ only in a meta line their slices column replaces read the same text
    csv.write_text(f'name,report,seed,slices\nd,"Volume: 80 slices. {REPORT}",1,4\ne,"{REPORT}",1,4\n')
    r = _gen(run_cli, model, "--prompts", csv, "--out", tmp_path / "out2", "--seed", 0)
    assert "rows 'd' and 'e' have the same report, slice count and seed (1)" in r.err, r.err


def test_slices_and_max_slices_together_are_refused(model, tmp_path, run_cli):
    r = _gen(run_cli, model, REPORT, "--out", tmp_path / "ct.nii.gz", "--slices", 8, "--max-slices", 4)
    assert_clean_error(r, "--slices sets the count", "pass one")
    assert not (tmp_path / "ct.nii.gz").exists()


def test_prompts_csv_without_report_column(model, tmp_path, run_cli):
    (tmp_path / "p.csv").write_text("text\nhello\n")
    assert_clean_error(
        _gen(run_cli, model, "--prompts", tmp_path / "p.csv", "--out", tmp_path / "o"), "'report'"
    )


@pytest.mark.slow
def test_prompts_are_split_across_two_processes_without_gaps_or_duplicates(model, tmp_path):
    csv = _prompts(tmp_path / "p.csv", n=5)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "ctflow.cli",
        "generate",
        "--prompts",
        str(csv),
        "--out",
        str(tmp_path / "out"),
        "--model",
        str(model),
        "--steps",
        "1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [line for line in proc.stderr.splitlines() if "wrote" in line and "rank" in line]
    assert len(ranks) == 5
    assert {line.split("(rank ")[1][0] for line in ranks} == {"0", "1"}
    assert sorted(p.name for p in (tmp_path / "out").glob("*.json")) == [f"case{i}.json" for i in range(5)]


def test_generate_in_bfloat16_records_device_and_dtype(model, tmp_path, run_cli):
    args = (REPORT, "--slices", 6, "--seed", 3)
    assert _gen(run_cli, model, *args, "--out", tmp_path / "a.nii.gz").code == 0
    r = _gen(run_cli, model, *args, "--out", tmp_path / "b.nii.gz", "--dtype", "bfloat16", "--device", "cpu")
    assert r.code == 0, r.err
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert (a["device"], a["dtype"]) == ("cpu", "float32")
    assert (b["device"], b["dtype"]) == ("cpu", "bfloat16")
    assert read_volume(tmp_path / "b.nii.gz").array.shape == read_volume(tmp_path / "a.nii.gz").array.shape


def test_batch_size_generates_prompt_rows_together_as_each_would_alone(model, tmp_path, run_cli, monkeypatch):
    """--batch-size 2 makes one pipeline call per two rows, each row with its own seed and slice count,
    and gives the volumes --batch-size 1 gives, up to rounding."""
    from ctflow.pipeline import CTFlowPipeline

    csv = tmp_path / "p.csv"
    csv.write_text(
        "name,report,slices,seed\na,Findings: Left pleural effusion.,6,4\nb,Findings: Emphysema.,9,7\n"
        "c,Findings: Heart size is enlarged.,5,\n"
    )
    calls = []
    original = CTFlowPipeline.__call__

    def spy(self, report, *args, **kwargs):
        calls.append(len(report) if isinstance(report, list) else 1)
        return original(self, report, *args, **kwargs)

    monkeypatch.setattr(CTFlowPipeline, "__call__", spy)
    for size in (1, 2):
        calls.clear()
        args = ("--prompts", csv, "--out", tmp_path / f"b{size}", "--batch-size", size, "--seed", 10)
        assert _gen(run_cli, model, *args).code == 0
        assert calls == ([1, 1, 1] if size == 1 else [2, 1])
    for name, slices, seed in (("a", 6, 4), ("b", 9, 7), ("c", 5, 12)):
        one, two = (json.loads((tmp_path / f"b{s}" / f"{name}.json").read_text()) for s in (1, 2))
        assert one["seed"] == two["seed"] == seed and one["num_slices"] == two["num_slices"] == slices
        a, b = (read_volume(tmp_path / f"b{s}" / f"{name}.nii.gz").array for s in (1, 2))
        assert np.abs(a.astype(float) - b.astype(float)).max() <= 2  # HU, written as whole numbers
    sidecars = {n: json.loads((tmp_path / "b2" / f"{n}.json").read_text()) for n in "abc"}
    assert sidecars["a"]["generated_with"] == sidecars["b"]["generated_with"] == 2
    assert "generated_with" not in sidecars["c"] and "generated_with" not in one


def test_the_pipeline_takes_a_slice_count_and_a_generator_per_report():
    import torch

    from ctflow.errors import CTFlowError

    pipe = tiny_pipeline()
    reports = ["Findings: Left pleural effusion.", "Findings: Emphysema."]
    out = pipe(
        reports,
        num_slices=[5, 11],
        num_inference_steps=2,
        generator=[torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)],
    )
    assert [v.num_slices for v in out.volumes] == [5, 11] and out.end_reasons == ["num_slices"] * 2
    alone = pipe(reports[1], num_slices=11, num_inference_steps=2, generator=torch.Generator().manual_seed(2))
    assert np.abs(alone.volumes[0].array - out.volumes[1].array).max() < 0.05
    mixed = pipe(reports, num_slices=[5, None], max_slices=16, num_inference_steps=1)
    assert mixed.volumes[0].num_slices == 5 and mixed.end_reasons[0] == "num_slices"
    assert mixed.volumes[1].num_slices <= 16 and mixed.end_reasons[1] in ("eos", "max_slices")
    assert (
        mixed.reports[0].startswith("Volume: 5 slices") and mixed.reports[1] == reports[1]
    )  # no count asked
    with pytest.raises(CTFlowError, match="one each"):
        pipe(reports, num_slices=[5], num_inference_steps=1)
    with pytest.raises(CTFlowError, match="one each"):
        pipe(reports, num_inference_steps=1, generator=[torch.Generator()])


def test_prompts_with_dicom_write_a_series_per_row(model, tmp_path, run_cli):
    csv = _prompts(tmp_path / "p.csv", n=2)
    args = ("--prompts", csv, "--out", tmp_path / "out", "--dicom", tmp_path / "dcm")
    assert _gen(run_cli, model, *args).code == 0
    for i in range(2):
        assert read_volume(tmp_path / "dcm" / f"case{i}").num_slices == 4 + i
        side = json.loads((tmp_path / "out" / f"case{i}.json").read_text())
        # the files as seen from the sidecar's folder: no absolute path of the writing machine
        assert side["files"] == {
            "nifti": f"case{i}.nii.gz",
            "preview": f"case{i}.png",
            "sidecar": f"case{i}.json",
            "dicom": f"../dcm/case{i}",
        }
        assert str(tmp_path) not in (tmp_path / "out" / f"case{i}.json").read_text()


def test_prompts_report_progress_after_each_pipeline_call(tmp_path):
    from ctflow.generate import GenerationSettings, generate_prompts

    csv = _prompts(tmp_path / "p.csv", n=3)
    seen = []
    done = generate_prompts(
        tiny_pipeline(),
        csv,
        tmp_path / "out",
        GenerationSettings(steps=1),
        log=lambda _: None,
        batch_size=2,
        progress=lambda done, todo: seen.append((done, todo)),
    )
    assert done == ["case0", "case1", "case2"] and seen == [(2, 3), (3, 3)]


def test_prompt_errors_name_the_line_of_the_file_blank_lines_counted(tmp_path):
    from ctflow.generate import read_prompts

    (tmp_path / "p.csv").write_text(
        "name,report,slices\n\na,Findings: clear.,8\n\nb,Findings: clear.,eight\n"
    )
    with pytest.raises(CTFlowError, match="line 5: slices and seed must be whole numbers"):
        read_prompts(tmp_path / "p.csv")


@pytest.mark.parametrize(
    ("text", "word"),
    [
        ('name,report\na,"Findings: clear.\n', "cannot parse"),  # an unclosed quote ate the rest
        ("name,report,report\na,Findings: x.,Findings: y.\n", "more than one 'report' column"),
        ("name,report,,\r\na,Findings: x.,,\r\nb,Findings: y.,,\r\n", None),  # Excel's empty header cells
        ("name,report\na,Findings: a, b and c.\n", "line 2 has more fields than the header"),
        ("name,report\na,Findings: x.\nb,Findings: y.\na,Findings: z.\n", "duplicate names \\('a'\\)"),
        ("name,report,slices\na,Findings: x.,-5\n", "line 2: slices must be between 1 and"),
        ("name,report,seed\na,Findings: x.,-1\n", "line 2: seed must be between 0 and"),
        ("name,report,slices\na,Findings: x.,8.5\n", "line 2: slices and seed must be whole numbers"),
        # the header found, and why it may not have been read
        ("name;report\na;Findings: x.\n", "its header has 'name;report' \\(columns separated by ';'"),
        ("name,text\na,Findings: x.\n", "needs a 'report' column .*its header has 'name', 'text'"),
        # a meta line that cannot be used is found before any row is generated, not when its row comes
        (
            'name,report\na,Findings: x.\nb,"Volume: 40 slices, 0 mm spacing. Findings: x."\n',
            "line 3: the report",
        ),
    ],
)
def test_malformed_prompt_files_are_refused_before_generating(tmp_path, text, word):
    from ctflow.generate import read_prompts

    (tmp_path / "p.csv").write_text(text)
    if word is None:
        assert [r["name"] for r in read_prompts(tmp_path / "p.csv")] == ["a", "b"]
        return
    with pytest.raises(CTFlowError, match=word):
        read_prompts(tmp_path / "p.csv")


def test_prompt_headers_are_read_as_people_type_them_and_spreadsheet_numbers_taken(tmp_path):
    from ctflow.generate import read_prompts

    (tmp_path / "p.csv").write_text("Name, Report, Slices\na,Findings: x.,96.0\nb,Findings: y.,\n")
    rows = read_prompts(tmp_path / "p.csv")
    assert [(r["name"], r["report"], r["slices"]) for r in rows] == [
        ("a", "Findings: x.", 96),
        ("b", "Findings: y.", None),
    ]
    (tmp_path / "latin1.csv").write_bytes("name,report\na,Findings: épanchement.\n".encode("latin-1"))
    with pytest.raises(CTFlowError, match="is not UTF-8 text; save it as 'CSV UTF-8'"):
        read_prompts(tmp_path / "latin1.csv")


def test_a_write_that_fails_takes_back_the_volumes_other_files(model, tmp_path, run_cli):
    """The NIfTI, preview and DICOM were left when the sidecar could not be written, and a rerun was then
    refused for the NIfTI in its way."""
    (tmp_path / "ct.json").mkdir()  # a folder where the sidecar goes
    r = _gen(
        run_cli, model, REPORT, "--out", tmp_path / "ct.nii.gz", "--dicom", tmp_path / "dcm", "--overwrite"
    )
    assert_clean_error(r, "ct.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.json"]
    (tmp_path / "ct.json").rmdir()
    assert (
        _gen(run_cli, model, REPORT, "--out", tmp_path / "ct.nii.gz", "--dicom", tmp_path / "dcm").code == 0
    )
    # with --overwrite the old files go too: a preview and sidecar of a volume no longer there stayed
    import ctflow.data.preview

    def broken(*a, **k):
        raise CTFlowError("cannot write ct.png: No space left on device")

    real, ctflow.data.preview.write_preview = ctflow.data.preview.write_preview, broken
    try:
        args = ("--out", tmp_path / "ct.nii.gz", "--dicom", tmp_path / "dcm", "--overwrite")
        r = _gen(run_cli, model, REPORT, *args)
    finally:
        ctflow.data.preview.write_preview = real
    assert r.code != 0 and sorted(p.name for p in tmp_path.iterdir()) == []


def test_an_output_folder_that_is_not_writable_is_refused_before_generating(tmp_path, monkeypatch):
    """It was found only once the whole generation had run."""
    import ctflow.files

    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(ctflow.files.os, "access", lambda p, mode: Path(p) != locked and real(p, mode))
    with pytest.raises(CTFlowError, match="locked is not writable"):
        check_output(locked / "sub" / "ct.nii.gz")  # the nearest folder there is
    check_output(tmp_path / "ct.nii.gz")


def test_upper_case_nifti_names_and_a_prompts_folder_named_like_a_file(model, tmp_path, run_cli):
    """CT.NII.GZ was refused though the readers take it; --prompts --out o.nii.gz made a folder so named."""
    assert _gen(run_cli, model, REPORT, "--out", tmp_path / "UP.NII.GZ", "--slices", 4).code == 0
    assert sorted(p.name for p in tmp_path.glob("UP*")) == ["UP.NII.GZ", "UP.json", "UP.png"]
    csv = _prompts(tmp_path / "p.csv", n=1)
    assert_clean_error(_gen(run_cli, model, "--prompts", csv, "--out", tmp_path / "o.nii.gz"), "without .nii")
    assert not (tmp_path / "o.nii.gz").exists()
