"""The command line: every bad input gives one `error:` line, a non-zero exit, no traceback, no output."""

import gzip
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from ctflow.data.dicom import write_dicom_series
from ctflow.data.nifti import read_nifti, write_nifti
from ctflow.data.volume import Volume
from tests.conftest import assert_clean_error


@pytest.fixture
def nifti(tmp_path):
    hu = np.full((8, 16, 16), -1000, np.int16)
    hu[:, 4:12, 4:12] = 40
    return write_nifti(Volume(hu, (2.0, 1.0, 1.0)), tmp_path / "v.nii.gz")


def _listing(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


# ---------------------------------------------------------------- preview / info: good paths
def test_preview_writes_png_and_gif(nifti, tmp_path, run_cli):
    assert run_cli("preview", nifti, "--out", tmp_path / "p.png").code == 0
    assert run_cli("preview", nifti, "--out", tmp_path / "p.gif", "--gif").code == 0
    assert (tmp_path / "p.png").stat().st_size > 0 and (tmp_path / "p.gif").stat().st_size > 0
    assert run_cli("preview", nifti, "--out", tmp_path / "q.gif").code == 0  # the suffix says GIF
    from PIL import Image

    assert Image.open(tmp_path / "q.gif").format == "GIF"
    assert_clean_error(run_cli("preview", nifti, "--out", tmp_path / "r.png", "--gif"), "must end in .gif")
    assert_clean_error(run_cli("preview", nifti, "--out", tmp_path / "r.jpg"), ".png (tri-planar) or .gif")


def test_info_says_when_the_values_look_stored_not_hu(tmp_path, run_cli):
    from ctflow.data.phantom import make_phantom, sample_spec

    vol, _ = make_phantom(sample_spec(5, size=32, num_slices=24))
    write_nifti(vol, tmp_path / "hu.nii.gz")
    assert "note" not in json.loads(run_cli("info", tmp_path / "hu.nii.gz").out)
    stored = Volume((vol.hu() + 1024).astype(np.int16), vol.spacing)  # CT-RATE's files before rescaling
    write_nifti(stored, tmp_path / "raw.nii.gz")
    assert "may be stored values, not HU" in json.loads(run_cli("info", tmp_path / "raw.nii.gz").out)["note"]


def test_info_prints_valid_json_for_huge_values(tmp_path, run_cli):
    """The float32 mean of 3e38s overflowed: "hu_mean": Infinity, which is not JSON."""
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    nib.save(nib.Nifti1Image(np.full((8, 8, 8), 3e38, np.float32), affine), tmp_path / "huge.nii.gz")
    result = run_cli("info", tmp_path / "huge.nii.gz")
    assert result.code == 0 and "overflow" not in result.err
    facts = json.loads(result.out, parse_constant=lambda c: pytest.fail(f"{c} in info's JSON"))
    assert facts["hu_mean"] == pytest.approx(3e38, rel=1e-6)


def test_info_prints_geometry_and_synthetic_flag(nifti, run_cli, tmp_path):
    r = run_cli("info", nifti)
    facts = json.loads(r.out)
    assert r.code == 0 and facts["shape"] == [8, 16, 16] and facts["spacing_mm"] == [2.0, 1.0, 1.0]
    # the file's own voxel order (write_nifti stores (W, H, S)), not the layout every volume is read into
    assert facts["orientation"] == "LPI" and facts["synthetic"] is False and facts["hu_max"] == 40
    raw = tmp_path / "ras.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), np.eye(4)), raw)
    assert json.loads(run_cli("info", raw).out)["orientation"] == "RAS"
    # a DICOM series in the same convention: columns, rows, then slices (sorted by position: superior)
    from ctflow.data.dicom import write_dicom_series
    from ctflow.data.io import read_volume

    write_dicom_series(read_volume(nifti), tmp_path / "dcm")
    assert json.loads(run_cli("info", tmp_path / "dcm").out)["orientation"] == "LPS"


def test_phantoms_command_writes_ctrate_layout(tmp_path, run_cli):
    r = run_cli(
        "phantoms", "--n", 2, "--out", tmp_path / "ph", "--size", 32, "--min-slices", 20, "--max-slices", 24
    )
    assert r.code == 0, r.err
    from ctflow.data.ctrate import CTRateDataset

    ds = CTRateDataset.open(tmp_path / "ph")
    s = ds.load(0)
    assert len(ds) == 2 and s.volume.shape[1:] == (32, 32) and 20 <= s.volume.num_slices <= 24
    assert s.report.startswith(f"Volume: {s.volume.num_slices} slices")
    assert json.loads(s.record.path.with_name("train_1_a_1.json").read_text())["labels"]
    # 20 to 24 slices at the 6 mm cap cover 120-144 mm of a 250-390 mm chest: said, once, in one line
    assert r.err.count("warning: phantoms of fewer than 63 slices may stop well short") == 1
    r = run_cli(
        "phantoms", "--n", 1, "--out", tmp_path / "ph2", "--size", 16, "--min-slices", 63, "--max-slices", 64
    )
    assert r.code == 0 and "warning" not in r.err


def test_phantoms_side_twins_follow_the_volumes(tmp_path, run_cli):
    from ctflow.data.ctrate import CTRateDataset, sidecar_path
    from ctflow.data.phantom import PhantomSpec, side_twin

    # seed 27 has a one-sided effusion, seed 28 none: three volumes, the third the twin of the first
    # (60+ slices: the stack reaches the lung bases, where the fluid lies)
    args = ("phantoms", "--n", 2, "--seed", 27, "--size", 32, "--min-slices", 60, "--max-slices", 64)
    r = run_cli(*args, "--out", tmp_path / "ph", "--side-twins")
    assert r.code == 0, r.err
    ds = CTRateDataset.open(tmp_path / "ph")
    specs = [json.loads(sidecar_path(ds.load(i).record.path).read_text())["spec"] for i in range(3)]
    assert len(ds) == 3 and [s["seed"] for s in specs] == [27, 28, 27]
    assert PhantomSpec(**specs[2]) == side_twin(PhantomSpec(**specs[0]))
    # the same wording, the other side (its left lower lobe nodule stays where it was)
    report, twin = ds.load(0).report, ds.load(2).report
    assert "Right pleural effusion." in report and "left lower lobe" in report
    assert twin == report.replace("right pleural", "left pleural").replace("Right pleural", "Left pleural")
    assert run_cli(*args, "--out", tmp_path / "plain").code == 0
    assert len(CTRateDataset.open(tmp_path / "plain")) == 2


def test_phantoms_clear_twins_follow_the_side_twins(tmp_path, run_cli):
    from ctflow.data.ctrate import CTRateDataset, sidecar_path
    from ctflow.data.phantom import PhantomSpec, clear_twin, side_twin
    from ctflow.data.reports import finding_vector

    # seed 27 has a right effusion (a side twin and a clear twin), seed 28 a bilateral one (a clear twin)
    args = ("phantoms", "--n", 2, "--seed", 27, "--size", 32, "--min-slices", 60, "--max-slices", 64)
    r = run_cli(*args, "--out", tmp_path / "ph", "--side-twins", "--clear-twins")
    assert r.code == 0, r.err
    assert "wrote 5 phantoms" in r.err and "3 of them side and clear twins" in r.err  # the console: stderr
    ds = CTRateDataset.open(tmp_path / "ph")
    specs = [
        PhantomSpec(**json.loads(sidecar_path(ds.load(i).record.path).read_text())["spec"]) for i in range(5)
    ]
    assert specs[2:] == [side_twin(specs[0]), clear_twin(specs[0]), clear_twin(specs[1])]
    reports = [ds.load(i).report for i in range(5)]
    assert "Right pleural effusion." in reports[0] and "Bilateral pleural effusion" in reports[1]
    assert [finding_vector(t)[:2] for t in reports] == [[0, 1], [1, 1], [1, 0], [0, 0], [0, 0]]  # left, right
    assert [ds.load(i).labels["Pleural effusion"] for i in range(5)] == [1, 1, 1, 0, 0]
    r = run_cli(*args, "--out", tmp_path / "clear", "--clear-twins")  # without side twins
    assert r.code == 0 and len(CTRateDataset.open(tmp_path / "clear")) == 4


def test_phantoms_nodule_twins_follow_the_other_twins(tmp_path, run_cli):
    from ctflow.data.ctrate import CTRateDataset, sidecar_path
    from ctflow.data.phantom import PhantomSpec, clear_twin

    # seed 27 has a left lower lobe nodule and a right effusion, seed 28 neither nodule
    args = ("phantoms", "--n", 2, "--seed", 27, "--size", 32, "--min-slices", 60, "--max-slices", 64)
    r = run_cli(*args, "--out", tmp_path / "ph", "--side-twins", "--clear-twins", "--nodule-twins")
    assert r.code == 0, r.err
    assert "4 of them side, clear and nodule twins" in r.err.replace("\n", " ")
    ds = CTRateDataset.open(tmp_path / "ph")
    specs = [
        PhantomSpec(**json.loads(sidecar_path(ds.load(i).record.path).read_text())["spec"])
        for i in range(len(ds))
    ]
    assert len(ds) == 6 and specs[5] == clear_twin(specs[0], "nodule")  # after 1 side and 2 clear twins
    assert "left lower lobe" in ds.load(0).report and "left lower lobe" not in ds.load(5).report
    assert [ds.load(i).labels["Lung nodule"] for i in (0, 5)] == [1, 0]


# ---------------------------------------------------------------- bad inputs
def test_missing_file(tmp_path, run_cli):
    assert_clean_error(run_cli("preview", tmp_path / "nope.nii.gz", "--out", tmp_path / "p.png"), "not")
    assert not (tmp_path / "p.png").exists()


def test_truncated_nifti(nifti, tmp_path, run_cli):
    data = nifti.read_bytes()
    (tmp_path / "t.nii.gz").write_bytes(data[: len(data) // 2])
    assert_clean_error(run_cli("preview", tmp_path / "t.nii.gz", "--out", tmp_path / "p.png"))
    assert not (tmp_path / "p.png").exists()


@pytest.mark.parametrize("shape", [(16, 16), (16, 16, 8, 3)])
def test_2d_and_4d_nifti(shape, tmp_path, run_cli):
    nib.save(nib.Nifti1Image(np.zeros(shape, np.int16), np.eye(4)), tmp_path / "x.nii.gz")
    assert_clean_error(run_cli("info", tmp_path / "x.nii.gz"), f"{len(shape)}d")


def test_nan_voxels(tmp_path, run_cli):
    a = np.zeros((8, 8, 4), np.float32)
    a[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(a, np.eye(4)), tmp_path / "x.nii.gz")
    assert_clean_error(
        run_cli("preview", tmp_path / "x.nii.gz", "--out", tmp_path / "p.png"), "NaN or infinite"
    )
    assert not (tmp_path / "p.png").exists()


def test_empty_dicom_folder(tmp_path, run_cli):
    (tmp_path / "dcm").mkdir()
    assert_clean_error(run_cli("info", tmp_path / "dcm"), "dicom")


def test_mixed_dicom_series(tmp_path, run_cli):
    vol = Volume(np.zeros((3, 8, 8), np.int16), (2.0, 1.0, 1.0))
    write_dicom_series(vol, tmp_path / "a")
    write_dicom_series(vol, tmp_path / "b")
    for f in (tmp_path / "b").iterdir():
        shutil.copy(f, tmp_path / "a" / ("b_" + f.name))
    assert_clean_error(run_cli("info", tmp_path / "a"), "series")


def test_csv_missing_findings_column(tmp_path, run_cli):
    assert (
        run_cli(
            "phantoms", "--n", 1, "--out", tmp_path / "ph", "--size", 32, "--min-slices", 8, "--max-slices", 8
        ).code
        == 0
    )
    csv = tmp_path / "ph/radiology_text_reports/train_reports.csv"
    csv.write_text(csv.read_text().replace("Findings_EN", "Findings"))
    r = run_cli("encode", "--data", tmp_path / "ph", "--vae", tmp_path / "novae", "--out", tmp_path / "lat")
    assert_clean_error(r, "Findings_EN")
    assert not (tmp_path / "lat").exists()
    r = run_cli(
        "encode",
        "--data",
        tmp_path / "ph",
        "--vae",
        tmp_path / "v",
        "--out",
        tmp_path / "lat",
        "--report-variants",
        -1,
    )
    assert_clean_error(r, "--report-variants must be 0 or more")
    assert not (tmp_path / "lat").exists()


@pytest.mark.parametrize("n", [0, 100000])
def test_absurd_slice_counts(n, tmp_path, run_cli):
    r = run_cli("generate", "Findings: normal.", "--slices", n, "--out", tmp_path / "g.nii.gz")
    assert_clean_error(r, "--slices")
    assert _listing(tmp_path) == []


def test_existing_output_needs_overwrite(nifti, tmp_path, run_cli):
    (tmp_path / "p.png").write_bytes(b"old")
    assert_clean_error(run_cli("preview", nifti, "--out", tmp_path / "p.png"), "--overwrite")
    assert (tmp_path / "p.png").read_bytes() == b"old"
    assert run_cli("preview", nifti, "--out", tmp_path / "p.png", "--overwrite").code == 0
    assert (tmp_path / "p.png").read_bytes() != b"old"


def test_phantoms_bad_count_and_existing_folder(tmp_path, run_cli):
    assert_clean_error(run_cli("phantoms", "--n", 0, "--out", tmp_path / "ph"), "--n")
    assert_clean_error(run_cli("phantoms", "--n", 1, "--seed", -3, "--out", tmp_path / "ph"), "--seed")
    assert not (tmp_path / "ph").exists()
    (tmp_path / "ph").mkdir()
    assert_clean_error(run_cli("phantoms", "--n", 1, "--out", tmp_path / "ph"), "--overwrite")


def test_wrong_preview_extension_and_unknown_format(nifti, tmp_path, run_cli):
    assert_clean_error(run_cli("preview", nifti, "--out", tmp_path / "p.jpg"), ".png")
    (tmp_path / "x.txt").write_text("hello")
    assert_clean_error(run_cli("info", tmp_path / "x.txt"))


def test_gzip_that_is_not_nifti(tmp_path, run_cli):
    (tmp_path / "x.nii.gz").write_bytes(gzip.compress(b"not a nifti header" * 40))
    assert_clean_error(run_cli("info", tmp_path / "x.nii.gz"))


def test_nifti_round_trip_through_cli_keeps_voxels(nifti):
    v = read_nifti(nifti)
    assert v.array.dtype == np.int16 and v.hu()[0, 5, 5] == 40


def test_evaluate_refuses_missing_folders(tmp_path, run_cli):
    r = run_cli(
        "evaluate", "--real", tmp_path / "none", "--fake", tmp_path / "none2", "--out", tmp_path / "ev"
    )
    assert_clean_error(r)
    assert not (tmp_path / "ev" / "results.json").exists()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["generate", "--bogus"], ["No such option: --bogus", "ctflow generate --help"]),
        (["generate", "x", "--out", "q.nii.gz", "--steps", "abc"], ["--steps", "integer"]),
        (["generate", "x", "--out", "q.nii.gz", "--overwrite", "true"], ["unexpected extra argument"]),
        (["info"], ["Missing argument", "ctflow info --help"]),
        (["nosuchcommand"], ["No such command", "ctflow --help"]),
    ],
)
def test_command_line_usage_errors_are_one_line(args, words, run_cli):
    """typer >= 0.29 raises its own copy of click's exceptions, which a click ``except`` let through as a
    traceback."""
    result = run_cli(*args)
    assert_clean_error(result, *words)
    assert result.code == 2


def test_bare_ctflow_prints_the_help_without_a_traceback(run_cli):
    result = run_cli()
    assert "generate" in result.out + result.err and "Traceback" not in result.err


def test_main_gives_the_callers_sigterm_handler_back(run_cli):
    import signal

    def mine(*_):
        pass

    before = signal.signal(signal.SIGTERM, mine)
    try:
        run_cli("info")  # a usage error: main returns early
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, before)


def test_sigterm_mid_write_leaves_no_temporary_file(tmp_path):
    """SIGTERM unwinds like Ctrl-C: the temporary NIfTI being written is removed (it was left behind)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    marker, out = tmp_path / "writing", tmp_path / "out"
    script = (
        "import time, pathlib, nibabel\n"
        "import ctflow.data.nifti as n\n"
        "save = nibabel.save\n"
        "def slow(img, path):\n"
        "    save(img, path)\n"
        f"    pathlib.Path({str(marker)!r}).touch()\n"
        "    time.sleep(120)\n"
        "n.nib.save = slow\n"
        "from ctflow.cli import main\n"
        f"raise SystemExit(main(['generate', 'Findings: Normal.', '--out', {str(out / 'ct.nii.gz')!r},"
        " '--slices', '8', '--steps', '1', '--seed', '0']))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert marker.exists(), proc.stderr.read() if proc.poll() is not None else "no write within 240 s"
        assert any(out.iterdir())  # the temporary file is there
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
    assert list(out.iterdir()) == []
