import csv
import json

import numpy as np
import pytest

from ctflow.data.ctrate import CTRateDataset, CTRateWriter, volume_relpath
from ctflow.data.labels import CTRATE_LABELS
from ctflow.data.nifti import write_nifti
from ctflow.data.volume import Volume
from ctflow.errors import CTFlowError


def _write_csv(path, columns, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)


def _fixture(root, n=3, drop_findings=False, raw=True):
    """A tiny data set written by hand in exactly the public CT-RATE layout."""
    reports, meta, labels = [], [], []
    for i in range(n):
        name = f"train_{i + 1}_a_1.nii.gz"
        hu = np.full((6 + i, 8, 8), -1000, np.int16)
        hu[:, 2:6, 2:6] = 40
        stored = hu + 1024 if raw else hu
        write_nifti(Volume(stored.astype(np.int16), (1.0, 1.0, 1.0)), root / volume_relpath(name))
        reports.append(
            {
                "VolumeName": name,
                "ClinicalInformation_EN": "Cough.",
                "Technique_EN": "Non-contrast.",
                "Findings_EN": f"Finding {i}.",
                "Impressions_EN": f"Impression {i}.",
            }
        )
        meta.append(
            {
                "VolumeName": name,
                "XYSpacing": "[0.75, 0.75]",
                "ZSpacing": "1.5",
                "RescaleSlope": "1",
                "RescaleIntercept": "-1024" if raw else "0",
            }
        )
        labels.append({"VolumeName": name, **{k: int(k == "Lung nodule" and i == 1) for k in CTRATE_LABELS}})
    report_cols = ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Impressions_EN"]
    if not drop_findings:
        report_cols.insert(3, "Findings_EN")
    else:
        for r in reports:
            del r["Findings_EN"]
    _write_csv(root / "radiology_text_reports" / "train_reports.csv", report_cols, reports)
    _write_csv(root / "metadata" / "train_metadata.csv", list(meta[0]), meta)
    _write_csv(root / "multi_abnormality_labels" / "train_predicted_labels.csv", list(labels[0]), labels)
    return reports


def test_volume_relpath_follows_ctrate_folders():
    assert (
        str(volume_relpath("valid_12_b_2.nii.gz")) == "dataset/valid/valid_12/valid_12_b/valid_12_b_2.nii.gz"
    )
    with pytest.raises(CTFlowError, match="CT-RATE form"):
        volume_relpath("scan.nii.gz")


def test_reader_takes_the_ctrate_download_layout_and_its_validation_names(tmp_path):
    """The download keeps everything under dataset/, the volumes in <split>_fixed/, and names the
    validation tables validation_*.csv but the labels valid_predicted_labels.csv."""
    import nibabel as nib

    root, tables = tmp_path, tmp_path / "dataset"
    names = ["valid_1_a_1.nii.gz", "valid_2_a_1.nii.gz"]
    hu = np.full((5, 8, 8), -1000, np.int16)
    hu[:, 2:6, 2:6] = 40
    for i, name in enumerate(names):
        path = tables / "valid_fixed" / name[:7] / name[:9] / name
        path.parent.mkdir(parents=True)
        img = nib.Nifti1Image((hu + 1024).astype(np.int16), np.diag([-0.75, -0.75, 1.5, 1]))
        if i == 1:  # this file scales itself: its header's intercept, not the metadata's, makes it HU
            img.header.set_slope_inter(1, -1024)
        nib.save(img, path)
    stale = tables / "valid" / "valid_1" / "valid_1_a" / names[0]  # the unfixed copy: not read
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"not a volume")
    _write_csv(
        tables / "radiology_text_reports" / "validation_reports.csv",
        ["VolumeName", "Findings_EN", "Impressions_EN"],
        [{"VolumeName": n, "Findings_EN": "Clear lungs.", "Impressions_EN": "Normal."} for n in names],
    )
    meta = {"XYSpacing": "[0.75, 0.75]", "ZSpacing": "1.5", "RescaleSlope": "1", "RescaleIntercept": "-1024"}
    _write_csv(
        tables / "metadata" / "validation_metadata.csv",
        ["VolumeName", *meta],
        [{"VolumeName": n, **meta} for n in names],
    )
    labels = [{"VolumeName": n, **dict.fromkeys(CTRATE_LABELS, int(i == 1))} for i, n in enumerate(names)]
    _write_csv(tables / "multi_abnormality_labels" / "valid_predicted_labels.csv", list(labels[0]), labels)
    for split in ("valid", "validation"):
        ds = CTRateDataset.open(root, split)
        assert len(ds) == 2 and ds.problems == []
        for i in range(2):
            s = ds.load(i)
            assert "valid_fixed" in str(s.record.path)
            assert s.volume.hu().min() == -1000 and s.volume.hu().max() == 40
            assert s.labels["Emphysema"] == i
    assert len(CTRateDataset.open(tables, "valid")) == 2  # the dataset/ folder itself works as the root


def test_tables_with_a_byte_order_mark_are_read(tmp_path):
    _fixture(tmp_path)
    for path in tmp_path.rglob("*.csv"):
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    ds = CTRateDataset.open(tmp_path)
    assert len(ds) == 3 and ds.problems == []


def test_reader_applies_metadata_rescale_and_spacing(tmp_path):
    _fixture(tmp_path)
    ds = CTRateDataset.open(tmp_path)
    assert len(ds) == 3 and ds.problems == []
    s = ds.load(1)
    assert s.volume.spacing == (1.5, 0.75, 0.75)
    assert s.volume.hu()[0, 0, 0] == -1000 and s.volume.hu()[0, 3, 3] == 40
    assert s.report.startswith("Volume: 7 slices, 1.5 mm spacing. Findings: Finding 1.")
    assert "Impressions: Impression 1." in s.report
    assert s.labels["Lung nodule"] == 1 and len(s.labels) == 18


def test_reader_reports_bad_rows_by_name_and_skips_them(tmp_path):
    _fixture(tmp_path)
    (tmp_path / volume_relpath("train_2_a_1.nii.gz")).unlink()
    path = tmp_path / "metadata" / "train_metadata.csv"
    path.write_text(path.read_text().replace('"[0.75, 0.75]",1.5', '"[0.75, 0.75]",oops', 1))
    ds = CTRateDataset.open(tmp_path)
    names = " ".join(ds.problems)
    assert "train_2_a_1.nii.gz" in names and "train_1_a_1.nii.gz" in names
    assert [r.name for r in ds.records] == ["train_3_a_1.nii.gz"]


def test_a_volume_without_a_report_row_is_named_not_dropped_silently(tmp_path):
    _fixture(tmp_path)
    path = tmp_path / "radiology_text_reports" / "train_reports.csv"
    path.write_text("\n".join(line for line in path.read_text().splitlines() if "train_3_a_1" not in line))
    ds = CTRateDataset.open(tmp_path)
    assert len(ds) == 2 and ds.problems == [
        "train_3_a_1.nii.gz: no row in the reports CSV (the volume is skipped)"
    ]
    (
        tmp_path / volume_relpath("train_3_a_1.nii.gz")
    ).unlink()  # metadata for volumes not downloaded: no noise
    assert CTRateDataset.open(tmp_path).problems == []


def _edit_csv(path, name, **changes):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows, columns = list(reader), reader.fieldnames
    for row in rows:
        if row["VolumeName"] == name:
            row.update(changes)
    _write_csv(path, columns, rows)


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("RescaleIntercept", "", "metadata RescaleIntercept '' is not a number"),  # was read as 0: +1024 HU
        ("RescaleSlope", "nan", "metadata RescaleSlope 'nan' is not a number"),  # every voxel NaN
        ("RescaleSlope", "0", "RescaleSlope is 0"),
        ("XYSpacing", "[0.75 0.75]", "XYSpacing '[0.75 0.75]' is not two positive mm values"),
        ("XYSpacing", "[0.6, 0.9]", "is not square"),  # was read as 0.6 on both axes
        ("ZSpacing", "", "metadata ZSpacing '' is not a number"),
    ],
)
def test_metadata_a_volume_cannot_be_read_right_with_is_named(tmp_path, key, value, problem):
    _fixture(tmp_path)
    _edit_csv(tmp_path / "metadata" / "train_metadata.csv", "train_2_a_1.nii.gz", **{key: value})
    ds = CTRateDataset.open(tmp_path)
    assert [r.name for r in ds.records] == ["train_1_a_1.nii.gz", "train_3_a_1.nii.gz"]
    assert (
        len(ds.problems) == 1
        and ds.problems[0].startswith("train_2_a_1.nii.gz: ")
        and problem in ds.problems[0]
    )


def test_a_volume_with_two_reports_or_disagreeing_metadata_is_named_and_skipped(tmp_path):
    """Two report rows of one volume were both encoded, the second's embedding overwriting the first's
    under the first's finding flags."""
    reports = _fixture(tmp_path)
    _write_csv(
        tmp_path / "radiology_text_reports" / "train_reports.csv",
        list(reports[0]),
        [*reports, {**reports[0], "Findings_EN": "Emphysema."}],
    )
    path = tmp_path / "metadata" / "train_metadata.csv"
    path.write_text(path.read_text() + 'train_3_a_1.nii.gz,"[0.75, 0.75]",3,1,-1024\n')
    ds = CTRateDataset.open(tmp_path)
    assert [r.name for r in ds.records] == ["train_2_a_1.nii.gz"]
    assert ds.problems == [
        "train_1_a_1.nii.gz: 2 rows in the reports CSV; keep the one that describes it",
        "train_3_a_1.nii.gz: rows in the metadata CSV that disagree; keep the right one",
    ]


def test_volumes_are_found_per_file_across_fixed_and_plain_folders_and_strays_are_named(tmp_path):
    import shutil

    _fixture(tmp_path)
    fixed = tmp_path / "dataset" / "train_fixed" / "train_1" / "train_1_a"
    fixed.mkdir(parents=True)  # the fixed folder holds volume 1 only; 2 and 3 are in train/ alone
    shutil.move(tmp_path / volume_relpath("train_1_a_1.nii.gz"), fixed / "train_1_a_1.nii.gz")
    stray = tmp_path / volume_relpath("train_9_a_1.nii.gz")  # on disk, in no table at all
    stray.parent.mkdir(parents=True)
    shutil.copy(fixed / "train_1_a_1.nii.gz", stray)
    ds = CTRateDataset.open(tmp_path)
    assert [r.name for r in ds.records] == [f"train_{i}_a_1.nii.gz" for i in (1, 2, 3)]
    assert ds.records[0].path == fixed / "train_1_a_1.nii.gz"
    assert ds.problems == ["train_9_a_1.nii.gz: no row in the reports CSV (the volume is skipped)"]


def test_iteration_skips_unreadable_volumes_instead_of_crashing(tmp_path):
    _fixture(tmp_path)
    (tmp_path / volume_relpath("train_2_a_1.nii.gz")).write_bytes(b"\x1f\x8b broken")
    ds = CTRateDataset.open(tmp_path)
    assert [s.name for s in ds] == ["train_1_a_1.nii.gz", "train_3_a_1.nii.gz"]
    assert any("train_2_a_1" in p for p in ds.problems)


def test_missing_findings_column_is_refused_with_the_column_name(tmp_path):
    _fixture(tmp_path, drop_findings=True)
    with pytest.raises(CTFlowError, match="Findings_EN"):
        CTRateDataset.open(tmp_path)


def test_writer_output_reads_back_through_the_reader(tmp_path):
    w = CTRateWriter(tmp_path, "valid")
    hu = np.linspace(-1000, 500, 5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7).round()
    w.add(
        0,
        Volume(hu, (2.5, 0.8, 0.8)),
        {"Findings_EN": "Clear.", "Impressions_EN": "Normal."},
        {"Emphysema": 1},
        extra={"truth": 1},
    )
    w.close()
    s = CTRateDataset.open(tmp_path, "valid").load(0)
    np.testing.assert_array_equal(s.volume.hu(), hu)
    assert s.volume.spacing == (2.5, 0.8, 0.8) and s.labels["Emphysema"] == 1
    assert (tmp_path / "dataset/valid/valid_1/valid_1_a/valid_1_a_1.json").exists()
    assert s.finding_slices is None  # a sidecar without phantom findings
    assert not s.volume.synthetic  # as written: unmarked
    w = CTRateWriter(tmp_path / "ph", "train")
    w.add(0, Volume(hu, (2.5, 0.8, 0.8), metadata={"synthetic": True}), {"Findings_EN": "Clear."}, {})
    w.close()
    # a phantom read through the data set stays marked, so a copy written out is marked too
    assert CTRateDataset.open(tmp_path / "ph").load(0).volume.synthetic


def test_phantom_ground_truth_beside_a_volume_gives_its_finding_slices(tmp_path):
    truth = {
        "num_slices": 5,
        "spacing": [2.5, 0.8, 0.8],
        "findings": [{"type": "effusion", "visible": True, "slice_range": [2, 4]}],
    }
    w = CTRateWriter(tmp_path, "valid")
    volume = Volume(np.zeros((5, 6, 7), np.float32), (2.5, 0.8, 0.8))
    w.add(0, volume, {"Findings_EN": "Fluid.", "Impressions_EN": "Effusion."}, {}, extra=truth)
    w.close()
    ds = CTRateDataset.open(tmp_path, "valid")
    assert ds.load(0).finding_slices == [{"type": "effusion", "first": 2, "last": 4}]
    sidecar = tmp_path / "dataset/valid/valid_1/valid_1_a/valid_1_a_1.json"
    sidecar.write_text('{"findings": [{"type": "effusion", "visible": true}]}')  # no num_slices
    with pytest.raises(CTFlowError, match="valid_1_a_1.json is not a readable phantom ground truth"):
        ds.load(0)
    _fixture(tmp_path / "ctrate")  # CT-RATE itself: no ground truth beside the volumes
    assert CTRateDataset.open(tmp_path / "ctrate").load(0).finding_slices is None
    assert CTRateDataset.open(tmp_path / "ctrate").finding_mask(0) is None


def test_finding_mask_of_a_written_phantom_lines_up_with_the_volume_read_back(tmp_path):
    from ctflow.data.phantom import PhantomSpec, finding_mask, render_phantom

    spec = PhantomSpec(seed=5, size=48, num_slices=30, slice_spacing=6.0, pixel_spacing=7.0)
    spec.findings = [{"type": "effusion", "side": "right"}]
    r = render_phantom(spec)
    w = CTRateWriter(tmp_path, "valid")
    w.add(0, r.volume, {"Findings_EN": "Fluid.", "Impressions_EN": "Effusion."}, {}, extra=r.ground_truth)
    w.close()
    ds = CTRateDataset.open(tmp_path, "valid")
    mask = ds.finding_mask(0)
    assert mask.any()
    np.testing.assert_array_equal(mask, finding_mask(r.ground_truth))
    # the same voxels in the volume the reader returns: the rendered volume, voxel for voxel
    np.testing.assert_array_equal(ds.load(0).volume.hu(), r.volume.hu())
    sidecar = tmp_path / "dataset/valid/valid_1/valid_1_a/valid_1_a_1.json"
    truth = json.loads(sidecar.read_text())
    truth["spec"]["size"] = 2  # no longer renders
    sidecar.write_text(json.dumps(truth))
    with pytest.raises(CTFlowError, match="valid_1_a_1.json does not render its phantom"):
        ds.finding_mask(0)
