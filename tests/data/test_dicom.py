"""DICOM series reading/writing: round trips, slice ordering and refusals."""

from __future__ import annotations

import random
import shutil

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from ctflow.data.dicom import CT_IMAGE_STORAGE, read_dicom_series, write_dicom_series
from ctflow.data.io import read_volume, write_volume
from ctflow.data.volume import Volume, canonical_affine
from ctflow.errors import CTFlowError

SPACING = (2.5, 0.7, 0.8)
ORIGIN = (12.3, -40.1, 55.5)
SHAPE = (6, 10, 12)


def marker_volume() -> Volume:
    rng = np.random.default_rng(0)
    array = rng.integers(-1024, 2000, SHAPE).astype(np.int16)
    array[0, 0, 0] = 3000  # superior-anterior-right corner
    return Volume(array, SPACING, canonical_affine(SPACING, ORIGIN), {"synthetic": True})


@pytest.fixture
def series(tmp_path):
    vol = marker_volume()
    return vol, write_dicom_series(vol, tmp_path / "series")


def _err(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def _edit(path, **changes):
    ds = pydicom.dcmread(path)
    for key, value in changes.items():
        setattr(ds, key, value)
    ds.save_as(path)


# --- round trips -----------------------------------------------------------------------------


def test_round_trip_int16(series):
    vol, folder = series
    back = read_dicom_series(folder)
    assert back.array.dtype == np.int16
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.spacing, vol.spacing, atol=1e-4)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-4)
    assert back.synthetic and back.metadata["format"] == "dicom"
    assert back.metadata["source"] == str(folder)


def test_written_files_are_valid_ct(series):
    vol, folder = series
    names = sorted(p.name for p in folder.iterdir())
    assert names == [f"slice_{k:04d}.dcm" for k in range(1, SHAPE[0] + 1)]
    first, second = (pydicom.dcmread(folder / n) for n in names[:2])
    assert first.SOPClassUID == CT_IMAGE_STORAGE == first.file_meta.MediaStorageSOPClassUID
    assert first.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert first.Modality == "CT" and list(first.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert "SYNTHETIC" in first.SeriesDescription and first.PatientID == "SYNTHETIC"
    assert first.SOPInstanceUID != second.SOPInstanceUID
    assert first.SeriesInstanceUID == second.SeriesInstanceUID
    assert (first.Rows, first.Columns) == SHAPE[1:]
    np.testing.assert_allclose([float(v) for v in first.PixelSpacing], SPACING[1:])
    assert float(first.SliceThickness) == float(first.SpacingBetweenSlices) == SPACING[0]
    assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    # slice_0001 is the most superior slice; LPS = RAS with x, y negated.
    np.testing.assert_allclose([float(v) for v in first.ImagePositionPatient], [-12.3, 40.1, 55.5])
    assert float(second.ImagePositionPatient[2]) == pytest.approx(55.5 - SPACING[0])
    hu = first.pixel_array * float(first.RescaleSlope) + float(first.RescaleIntercept)
    np.testing.assert_array_equal(hu, vol.array[0])
    assert hu[0, 0] == 3000


def test_shuffled_renamed_scrambled_series_reads_identical(series, tmp_path):
    vol, folder = series
    messy = tmp_path / "messy"
    messy.mkdir()
    files = sorted(folder.iterdir())
    rng = random.Random(7)
    numbers = list(range(1, len(files) + 1))
    rng.shuffle(numbers)
    names = [f"{rng.getrandbits(40):010x}" for _ in files]
    rng.shuffle(files)
    for src, name, number in zip(files, names, numbers, strict=True):
        shutil.copy(src, messy / name)
        _edit(messy / name, InstanceNumber=number)
    (messy / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(100))
    (messy / "README.txt").write_text("not dicom")
    back = read_dicom_series(messy)
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-4)


def test_float_volume_rounded_to_int16(tmp_path):
    vol = marker_volume()
    floaty = Volume(vol.array.astype(np.float32) + 0.3, vol.spacing, vol.affine)
    back = read_dicom_series(write_dicom_series(floaty, tmp_path / "f"))
    assert back.array.dtype == np.int16
    np.testing.assert_array_equal(back.array, vol.array)


def test_float_volume_out_of_int16_range_uses_slope(tmp_path):
    array = np.linspace(-1000, 100000, np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    back = read_dicom_series(write_dicom_series(Volume(array, SPACING), tmp_path / "big"))
    step = (100000 + 1000) / 65535
    np.testing.assert_allclose(back.array, array, atol=step)


def test_integers_16_bits_apart_are_stored_exactly_beyond_int16(tmp_path):
    """Whole numbers spanning at most 65535 fit int16 shifted by an intercept; they were scaled by a
    slope of about 0.63 (3 HU read back as 3.24)."""
    array = np.linspace(-1024, 40000, np.prod(SHAPE)).round().astype(np.int32).reshape(SHAPE)
    back = read_dicom_series(write_dicom_series(Volume(array, SPACING), tmp_path / "wide"))
    np.testing.assert_array_equal(back.hu(), array.astype(np.float32))


def test_ct_small_stacked_into_series(tmp_path):
    src = get_testdata_file("CT_small.dcm")
    base = pydicom.dcmread(src)
    folder = tmp_path / "ct_small"
    folder.mkdir()
    x, y, z = (float(v) for v in base.ImagePositionPatient)
    for k in range(4):  # increasing z = towards superior
        ds = pydicom.dcmread(src)
        ds.ImagePositionPatient = [x, y, z + 5.0 * k]
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(folder / f"img{k}.dcm")
    vol = read_dicom_series(folder)
    assert vol.shape == (4, 128, 128) and vol.array.dtype == np.int16
    expected = base.pixel_array.astype(np.int32) * int(base.RescaleSlope) + int(base.RescaleIntercept)
    for k in range(4):
        np.testing.assert_array_equal(vol.array[k], expected)
    np.testing.assert_allclose(vol.spacing, (5.0, 0.661468, 0.661468), atol=1e-6)
    # Voxel [0,0,0] is the most superior slice's first pixel: LPS (x, y, z+15) -> RAS (-x, -y, z+15).
    np.testing.assert_allclose(vol.affine[:3, 3], [-x, -y, z + 15.0], atol=1e-4)
    assert not vol.synthetic


# --- refusals --------------------------------------------------------------------------------


def test_a_one_slice_series_takes_its_depth_from_the_slice_thickness(tmp_path):
    """ctflow writes one-slice series (--slices 1 --dicom) and read them back as an error."""
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "CT_small.dcm")
    vol = read_dicom_series(folder)
    assert vol.shape == (1, 128, 128)
    np.testing.assert_allclose(vol.spacing, (5.0, 0.661468, 0.661468), rtol=1e-5)  # SliceThickness 5
    written = write_volume(Volume(vol.hu(), (2.5, 0.8, 0.8)), tmp_path / "mine")
    again = read_volume(written)
    assert again.shape == (1, 128, 128) and np.allclose(again.spacing, (2.5, 0.8, 0.8))
    np.testing.assert_array_equal(again.hu(), np.round(vol.hu()))
    ds = pydicom.dcmread(folder / "CT_small.dcm")  # no depth at all: a 2D image, refused
    del ds.SliceThickness, ds.SpacingBetweenSlices
    ds.save_as(folder / "CT_small.dcm")
    with pytest.raises(CTFlowError) as e:
        read_dicom_series(folder)
    assert "single DICOM slice" in _err(e) and "no depth" in _err(e)
    with pytest.raises(CTFlowError) as e:
        read_dicom_series(folder / "CT_small.dcm")
    assert "folder" in _err(e)


def test_empty_and_non_dicom_folders_refused(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CTFlowError) as e:
        read_dicom_series(empty)
    assert "empty" in _err(e)
    (empty / "series1").mkdir()  # a folder of series folders: not called empty
    with pytest.raises(CTFlowError) as e:
        read_dicom_series(empty)
    assert "only folders (series1): is a series one of them?" in _err(e)
    (empty / "notes.txt").write_text("hello")
    with pytest.raises(CTFlowError) as e:
        read_dicom_series(empty)
    assert "none of its 1 files" in _err(e)
    with pytest.raises(CTFlowError) as e:
        read_dicom_series(tmp_path / "missing")
    assert "does not exist" in _err(e)


def test_mixed_series_refused(series, tmp_path):
    vol, folder = series
    other = write_dicom_series(vol, tmp_path / "other")
    for p in other.iterdir():
        shutil.copy(p, folder / f"other_{p.name}")
    with pytest.raises(CTFlowError) as e:
        read_dicom_series(folder)
    assert "2 DICOM series" in _err(e) and "one series" in _err(e)


def test_localizer_beside_the_slices_is_skipped(series):
    vol, folder = series
    shutil.copy(folder / "slice_0002.dcm", folder / "scout.dcm")
    _edit(  # a coronal scout in the same series, as scanners often save it
        folder / "scout.dcm",
        SOPInstanceUID=generate_uid(),
        ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
        ImageOrientationPatient=[1, 0, 0, 0, 0, -1],
    )
    back = read_dicom_series(folder)
    np.testing.assert_array_equal(back.array, vol.array)


def test_zero_or_malformed_rescale_slope_refused(series):
    _, folder = series
    _edit(folder / "slice_0002.dcm", RescaleSlope="0")
    with pytest.raises(CTFlowError) as e:
        read_dicom_series(folder)
    assert "RescaleSlope is 0" in _err(e) and "slice_0002.dcm" in _err(e)
    _edit(folder / "slice_0002.dcm", RescaleSlope="")  # empty means the default, 1
    read_dicom_series(folder)


def test_missing_slice_refused(series):
    _, folder = series
    (folder / "slice_0003.dcm").unlink()
    with pytest.raises(CTFlowError) as e:
        read_dicom_series(folder)
    assert "missing slices or a change of spacing" in _err(e) and "(" not in _err(e).split("mm where")[1]


def test_a_change_of_spacing_is_named_as_one(series):
    _, folder = series
    for k in (5, 6):  # the last two steps twice as long
        path = folder / f"slice_{k:04d}.dcm"
        pos = [float(v) for v in pydicom.dcmread(path).ImagePositionPatient]
        _edit(path, ImagePositionPatient=[pos[0], pos[1], pos[2] - SPACING[0] * (k - 4)])
    with pytest.raises(CTFlowError) as e:
        read_dicom_series(folder)
    assert "missing slices or a change of spacing" in _err(e) and "(2 such steps)" in _err(e)


@pytest.mark.parametrize("name", ["slice_0001.dcm", "slice_0006.dcm"])  # the first and the last
@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_a_damaged_file_at_either_end_is_refused_not_skipped(series, name, damage):
    _, folder = series
    path = folder / name
    path.write_bytes(b"" if damage == "empty" else path.read_bytes()[:300])  # 300: the file meta alone
    with pytest.raises(CTFlowError) as e:
        read_dicom_series(folder)
    assert name in _err(e) and "cannot read this DICOM file" in _err(e)


def test_a_damaged_file_without_a_dicom_name_or_mark_is_still_skipped(series):
    vol, folder = series
    (folder / "._slice_0000").write_bytes(b"\x00\x05\x16\x07" + bytes(200))  # a macOS resource fork
    (folder / "empty").write_bytes(b"")
    (folder / "._slice_0001.dcm").write_bytes(b"\x00\x05\x16\x07" + bytes(200))  # macOS, on copied media
    np.testing.assert_array_equal(read_dicom_series(folder).array, vol.array)


def test_a_slice_off_the_line_of_the_others_is_refused(series):
    vol, folder = series
    path = folder / "slice_0003.dcm"
    pos = [float(v) for v in pydicom.dcmread(path).ImagePositionPatient]
    _edit(path, ImagePositionPatient=[pos[0] + 0.01, pos[1], pos[2]])  # rounding: kept
    np.testing.assert_array_equal(read_dicom_series(folder).array, vol.array)
    _edit(path, ImagePositionPatient=[pos[0] + 10, pos[1], pos[2]])
    with pytest.raises(CTFlowError) as e:
        read_dicom_series(folder)
    assert "slice_0003.dcm lies 10.00 mm off the line" in _err(e)


def test_truncated_uncompressed_pixel_data_is_not_called_compressed(series):
    _, folder = series
    path = folder / "slice_0002.dcm"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CTFlowError) as e:
        read_dicom_series(folder)
    assert "slice_0002.dcm" in _err(e) and "truncated or damaged" in _err(e) and "decompress" not in _err(e)


def test_inconsistent_spacing_refused(series):
    _, folder = series
    path = folder / "slice_0003.dcm"
    pos = [float(v) for v in pydicom.dcmread(path).ImagePositionPatient]
    _edit(path, ImagePositionPatient=[pos[0], pos[1], pos[2] + 0.6])  # steps 1.9 / 3.1 mm
    with pytest.raises(CTFlowError) as e:
        read_dicom_series(folder)
    assert "inconsistent slice spacing" in _err(e)


def test_duplicate_position_refused(series):
    _, folder = series
    shutil.copy(folder / "slice_0002.dcm", folder / "dup.dcm")
    _edit(folder / "dup.dcm", SOPInstanceUID=generate_uid())
    with pytest.raises(CTFlowError) as e:
        read_dicom_series(folder)
    assert "duplicate slice position" in _err(e)


def test_differing_rows_refused(series):
    _, folder = series
    path = folder / "slice_0002.dcm"
    ds = pydicom.dcmread(path)
    ds.Rows = SHAPE[1] - 2
    ds.PixelData = ds.PixelData[: 2 * (SHAPE[1] - 2) * SHAPE[2]]
    ds.save_as(path)
    with pytest.raises(CTFlowError) as e:
        read_dicom_series(folder)
    assert "differ in size" in _err(e)


def test_oblique_series_refused(series):
    _, folder = series
    c, s = np.cos(np.radians(15)), np.sin(np.radians(15))
    for path in folder.iterdir():
        _edit(path, ImageOrientationPatient=[c, s, 0.0, -s, c, 0.0])
    with pytest.raises(CTFlowError) as e:
        read_dicom_series(folder)
    assert "oblique" in _err(e) and "resample" in _err(e)


# --- writing safety --------------------------------------------------------------------------


def test_existing_folder_untouched_without_overwrite(series):
    vol, folder = series
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(CTFlowError) as e:
        write_dicom_series(vol, folder)
    assert "overwrite" in _err(e)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    small = Volume(vol.array[:3], vol.spacing, vol.affine)
    write_dicom_series(small, folder, overwrite=True)
    assert len(list(folder.iterdir())) == 3
    np.testing.assert_array_equal(read_dicom_series(folder).array, small.array)
    (folder / "notes.txt").write_text("keep me")  # a folder with more than a series: replacing it deleted it
    with pytest.raises(CTFlowError) as e:
        write_dicom_series(vol, folder, overwrite=True)
    assert "holds notes.txt, not only a DICOM series" in _err(e)
    assert (folder / "notes.txt").read_text() == "keep me" and len(list(folder.glob("*.dcm"))) == 3
    assert {str(pydicom.dcmread(p).PatientPosition) for p in folder.glob("*.dcm")} == {"HFS"}


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = pydicom.Dataset.save_as

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pydicom.Dataset, "save_as", flaky)
    with pytest.raises(CTFlowError, match="cannot write .*: disk full"):  # one line, not a traceback
        write_dicom_series(marker_volume(), tmp_path / "series")
    assert list(tmp_path.iterdir()) == []


def test_nan_volume_refused(tmp_path):
    array = np.zeros(SHAPE, np.float32)
    array[0, 0, 0] = np.nan
    with pytest.raises(CTFlowError) as e:
        write_dicom_series(Volume(array), tmp_path / "nan")
    assert "1 NaN" in _err(e)
    assert list(tmp_path.iterdir()) == []


def test_io_dispatch_dicom(tmp_path):
    vol = marker_volume()
    folder = write_volume(vol, tmp_path / "case01")
    assert folder.is_dir()
    np.testing.assert_array_equal(read_volume(folder).array, vol.array)
    with pytest.raises(CTFlowError):
        write_volume(vol, tmp_path / "case01")  # exists, no overwrite
    write_volume(vol, tmp_path / "case01", overwrite=True)


def test_synthetic_volume_always_marked(tmp_path):
    folder = write_dicom_series(marker_volume(), tmp_path / "s", series_description="chest CT")
    ds = pydicom.dcmread(folder / "slice_0001.dcm")
    assert ds.SeriesDescription == "SYNTHETIC chest CT"
    assert read_dicom_series(folder).synthetic


def test_a_series_of_another_modality_is_warned(series):
    from ctflow.errors import CTFlowWarning

    _, folder = series
    for path in folder.iterdir():
        _edit(path, Modality="MR")
    with pytest.warns(CTFlowWarning, match="Modality is MR, not CT"):
        read_dicom_series(folder)
