"""NIfTI reading/writing: round trips, orientation handling, scaling and refusals."""

from __future__ import annotations

import gzip
import struct

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

from ctflow.data.io import read_volume, write_volume
from ctflow.data.nifti import read_nifti, write_nifti
from ctflow.data.orientation import reorient_to_canonical
from ctflow.data.volume import CANONICAL_AXCODES, Volume, canonical_affine
from ctflow.errors import CTFlowError

SPACING = (2.5, 0.7, 0.8)
ORIGIN = (12.3, -40.1, 55.5)
SHAPE = (5, 6, 7)


def marker_volume(dtype=np.int16) -> Volume:
    """A canonical volume: air background, a bright voxel at superior-anterior-right [0, 0, 0]
    and a dimmer one at [1, 2, 3]."""
    array = np.full(SHAPE, -1000, dtype=dtype)
    array[0, 0, 0] = 1000
    array[1, 2, 3] = 500
    return Volume(array, SPACING, canonical_affine(SPACING, ORIGIN), {"synthetic": True})


def world(affine, index):
    return (np.asarray(affine) @ np.array([*index, 1.0]))[:3]


def save_raw(tmp_path, data, affine, name="raw.nii.gz", **codes):
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=codes.get("sform", 1))
    img.set_qform(affine, code=codes.get("qform", 1))
    path = tmp_path / name
    nib.save(img, path)
    return path


# --- round trips -----------------------------------------------------------------------------


def test_round_trip_int16_exact(tmp_path):
    vol = marker_volume(np.int16)
    rng = np.random.default_rng(0)
    vol.array[:] = rng.integers(-1024, 3000, SHAPE, dtype=np.int16)
    path = write_nifti(vol, tmp_path / "ct.nii.gz")
    assert path == tmp_path / "ct.nii.gz"
    back = read_nifti(path)
    assert back.array.dtype == np.int16
    np.testing.assert_array_equal(back.array, vol.array)
    assert back.spacing == vol.spacing
    np.testing.assert_array_equal(back.affine, vol.affine)
    assert back.synthetic and back.metadata["descrip"] == "SYNTHETIC ctflow"
    assert back.metadata["source"] == str(path)


def test_round_trip_float32_exact(tmp_path):
    rng = np.random.default_rng(1)
    vol = Volume(rng.normal(0, 300, SHAPE).astype(np.float32), SPACING, canonical_affine(SPACING, ORIGIN))
    back = read_nifti(write_nifti(vol, tmp_path / "ct.nii"))
    assert back.array.dtype == np.float32
    np.testing.assert_array_equal(back.array, vol.array)
    assert back.spacing == vol.spacing
    np.testing.assert_array_equal(back.affine, vol.affine)
    assert not back.synthetic and back.metadata["descrip"] == "ctflow"


def test_on_disk_layout_is_slice_last(tmp_path):
    vol = marker_volume()
    path = write_nifti(vol, tmp_path / "ct.nii.gz")
    img = nib.load(path)
    assert img.shape == (SHAPE[2], SHAPE[1], SHAPE[0])  # (W, H, S)
    assert nib.aff2axcodes(img.affine) == ("L", "P", "I")
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    data = np.asanyarray(img.dataobj)
    np.testing.assert_array_equal(data, vol.array.transpose(2, 1, 0))
    # The same voxel sits at the same world position in both layouts.
    np.testing.assert_allclose(world(img.affine, (3, 2, 1)), world(vol.affine, (1, 2, 3)))
    np.testing.assert_allclose(img.header.get_zooms(), (0.8, 0.7, 2.5), rtol=1e-6)


def test_synthetic_flag_marks_a_volume_but_never_unmarks_a_synthetic_one(tmp_path):
    vol = marker_volume()  # marked synthetic: written marked whatever the argument, as DICOM is
    assert read_nifti(write_nifti(vol, tmp_path / "a.nii", synthetic=False)).synthetic
    vol.metadata["synthetic"] = False
    assert read_nifti(write_nifti(vol, tmp_path / "b.nii", synthetic=True)).synthetic
    assert not read_nifti(write_nifti(vol, tmp_path / "c.nii")).synthetic


# --- orientation -----------------------------------------------------------------------------


def test_ras_file_built_by_hand_reads_canonical(tmp_path):
    vol = marker_volume()
    ds, dh, dw = SPACING
    s, h, w = SHAPE
    # RAS+: i -> right, j -> anterior, k -> superior; voxel 0 is left-posterior-inferior.
    ras = vol.array.transpose(2, 1, 0)[::-1, ::-1, ::-1]
    corner = world(vol.affine, (s - 1, h - 1, w - 1))
    affine = np.diag([dw, dh, ds, 1.0])
    affine[:3, 3] = corner
    assert ras[w - 1, h - 1, s - 1] == 1000  # the marker is the most right-anterior-superior voxel
    back = read_nifti(save_raw(tmp_path, ras, affine))
    np.testing.assert_array_equal(back.array, vol.array)
    assert back.array[0, 0, 0] == 1000 and back.array[1, 2, 3] == 500
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-4)
    np.testing.assert_allclose(back.spacing, SPACING, rtol=1e-6)
    assert back.metadata["original_axcodes"] == ("R", "A", "S")


def test_lps_file_built_by_hand_reads_canonical(tmp_path):
    vol = marker_volume()
    ds, _, _ = SPACING
    s = SHAPE[0]
    # LPS (DICOM-like): i -> left, j -> posterior, k -> superior.
    lps = vol.array.transpose(2, 1, 0)[:, :, ::-1]
    affine = np.diag([-SPACING[2], -SPACING[1], ds, 1.0])
    affine[:3, 3] = world(vol.affine, (s - 1, 0, 0))
    back = read_nifti(save_raw(tmp_path, lps, affine, "lps.nii"))
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-4)


@pytest.mark.parametrize(
    "codes",
    [("R", "A", "S"), ("L", "P", "S"), ("L", "A", "S"), ("P", "I", "R"), ("S", "R", "A"), ("I", "P", "L")],
)
def test_any_axis_order_reads_canonical(tmp_path, codes):
    vol = marker_volume()
    transform = ornt_transform(axcodes2ornt(CANONICAL_AXCODES), axcodes2ornt(codes))
    data = apply_orientation(vol.array, transform)
    affine = vol.affine @ inv_ornt_aff(transform, vol.array.shape)
    assert nib.aff2axcodes(affine) == codes
    back = read_nifti(save_raw(tmp_path, data, affine, qform=0))
    np.testing.assert_array_equal(back.array, vol.array)
    assert np.unravel_index(np.argmax(back.array), back.shape) == (0, 0, 0)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-4)
    # The marker keeps its world position.
    np.testing.assert_allclose(world(back.affine, (1, 2, 3)), world(vol.affine, (1, 2, 3)), atol=1e-4)


def test_qform_only_file(tmp_path):
    vol = marker_volume()
    data = vol.array.transpose(2, 1, 0)
    affine = vol.affine @ np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1.0]])
    back = read_nifti(save_raw(tmp_path, data, affine, sform=0, qform=1))
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-4)
    assert back.spacing == SPACING  # the qform's float32 pixdim as its decimals, as an sform's are


def test_reorient_helper_flip_and_slight_obliquity():
    vol = marker_volume()
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, SHAPE[0] - 1  # index s' = S-1-s
    array, affine = reorient_to_canonical(vol.array[::-1], vol.affine @ flip)
    np.testing.assert_array_equal(array, vol.array)
    np.testing.assert_allclose(affine, vol.affine)
    angle = np.radians(0.5)  # below the 1 degree limit: accepted, geometry kept as is
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    array, affine = reorient_to_canonical(vol.array, rot @ vol.affine)
    np.testing.assert_array_equal(array, vol.array)
    np.testing.assert_allclose(affine, rot @ vol.affine)


# --- scaling ---------------------------------------------------------------------------------


def _patch_scaling(path, slope, inter):
    with open(path, "r+b") as fh:
        fh.seek(112)
        fh.write(struct.pack("<ff", slope, inter))


def test_scl_slope_inter_integer_keeps_int16(tmp_path):
    raw = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    path = save_raw(tmp_path, raw, np.diag([1.0, 1.0, 1.0, 1.0]), "s.nii")
    _patch_scaling(path, 2.0, -1024.0)
    assert nib.load(path).dataobj.slope == 2.0
    vol = read_nifti(path)
    assert vol.array.dtype == np.int16
    np.testing.assert_array_equal(np.sort(vol.array.ravel()), np.sort(raw.ravel() * 2 - 1024))


def test_scl_slope_fractional_gives_float32(tmp_path):
    raw = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    path = save_raw(tmp_path, raw, np.diag([1.0, 1.0, 1.0, 1.0]), "f.nii")
    _patch_scaling(path, 0.5, 10.0)
    vol = read_nifti(path)
    assert vol.array.dtype == np.float32
    np.testing.assert_allclose(np.sort(vol.array.ravel()), np.sort(raw.ravel() * 0.5 + 10.0))


def test_uint8_and_float64_inputs(tmp_path):
    path = save_raw(tmp_path, np.full((2, 3, 4), 200, np.uint8), np.eye(4), "u.nii")
    assert read_nifti(path).array.dtype == np.int16
    path = save_raw(tmp_path, np.full((2, 3, 4), 0.25, np.float64), np.eye(4), "d.nii")
    vol = read_nifti(path)
    assert vol.array.dtype == np.float32 and np.all(vol.array == 0.25)


def test_int64_volumes_are_written_in_the_narrowest_type_that_holds_them(tmp_path):
    # np.full with an int fill is int64, which nibabel refuses to store
    for fill, stored in ((-1000, np.int16), (100_000, np.int32)):
        path = write_nifti(Volume(np.full((4, 8, 8), fill), (1.0, 1.0, 1.0)), tmp_path / f"{fill}.nii.gz")
        assert nib.load(path).get_data_dtype() == stored and np.all(read_nifti(path).array == fill)
    with pytest.raises(CTFlowError, match="do not fit 32-bit integers"):
        write_nifti(Volume(np.full((2, 2, 2), 2**40), (1.0, 1.0, 1.0)), tmp_path / "big.nii.gz")
    assert not (tmp_path / "big.nii.gz").exists()


# --- refusals --------------------------------------------------------------------------------


def _err(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_missing_file(tmp_path):
    with pytest.raises(CTFlowError) as e:
        read_nifti(tmp_path / "nope.nii.gz")
    assert "does not exist" in _err(e)


def test_folder_is_not_nifti(tmp_path):
    with pytest.raises(CTFlowError) as e:
        read_nifti(tmp_path)
    assert "folder" in _err(e)


def test_not_a_nifti(tmp_path):
    path = tmp_path / "notes.nii"
    path.write_text("this is not an image\n" * 50)
    with pytest.raises(CTFlowError) as e:
        read_nifti(path)
    assert "not a readable NIfTI" in _err(e)
    gz = tmp_path / "notes.nii.gz"
    gz.write_bytes(b"plain bytes, not gzip" * 30)
    with pytest.raises(CTFlowError):
        read_nifti(gz)


def test_truncated_gzip(tmp_path):
    rng = np.random.default_rng(2)
    vol = Volume(rng.integers(-1000, 1000, (8, 16, 16)).astype(np.int16))
    path = write_nifti(vol, tmp_path / "ct.nii.gz")
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CTFlowError) as e:
        read_nifti(path)
    assert "truncated or corrupt" in _err(e) or "not a readable" in _err(e)


def test_corrupt_gzip(tmp_path):
    rng = np.random.default_rng(3)
    vol = Volume(rng.integers(-1000, 1000, (8, 16, 16)).astype(np.int16))
    path = write_nifti(vol, tmp_path / "ct.nii.gz")
    blob = bytearray(path.read_bytes())
    mid = len(blob) // 2
    blob[mid : mid + 64] = bytes(64)  # zero out a run inside the deflate stream
    path.write_bytes(bytes(blob))
    with pytest.raises(CTFlowError):
        read_nifti(path)


def test_truncated_uncompressed(tmp_path):
    vol = Volume(np.zeros((8, 16, 16), np.int16))
    path = write_nifti(vol, tmp_path / "ct.nii")
    blob = path.read_bytes()
    path.write_bytes(blob[: 352 + 100])
    with pytest.raises(CTFlowError):
        read_nifti(path)


def test_2d_image_refused(tmp_path):
    path = save_raw(tmp_path, np.zeros((8, 9), np.int16), np.eye(4))
    with pytest.raises(CTFlowError) as e:
        read_nifti(path)
    assert "2D" in _err(e)


def test_a_file_without_slices_is_refused(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 0), np.int16), np.eye(4)), tmp_path / "empty.nii.gz")
    with pytest.raises(CTFlowError, match="empty.nii.gz holds no voxels"):
        read_nifti(tmp_path / "empty.nii.gz")
    with pytest.raises(CTFlowError, match="none of them 0"):
        Volume(np.zeros((0, 8, 8)))


def test_4d_refused_but_trailing_singleton_squeezed(tmp_path):
    path = save_raw(tmp_path, np.zeros((4, 5, 6, 2), np.int16), np.eye(4), "4d.nii")
    with pytest.raises(CTFlowError) as e:
        read_nifti(path)
    assert "4D" in _err(e) and "single 3D volume" in _err(e)
    path = save_raw(tmp_path, np.zeros((4, 5, 6, 1), np.int16), np.eye(4), "4d1.nii")
    assert read_nifti(path).shape == (6, 5, 4)


def test_nan_voxels_refused_with_count(tmp_path):
    data = np.zeros((4, 5, 6), np.float32)
    data[0, 0, :3] = np.nan
    data[1, 1, 1] = np.inf
    path = save_raw(tmp_path, data, np.eye(4))
    with pytest.raises(CTFlowError) as e:
        read_nifti(path)
    assert "4 of 120 voxels" in _err(e)


def test_oblique_refused(tmp_path):
    angle = np.radians(10)
    affine = np.eye(4)
    affine[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    path = save_raw(tmp_path, np.zeros((4, 5, 6), np.int16), affine)
    with pytest.raises(CTFlowError) as e:
        read_nifti(path)
    msg = _err(e)
    assert "oblique" in msg and "10.0 degrees" in msg and "resample" in msg


def test_zero_spacing_refused(tmp_path):
    path = save_raw(tmp_path, np.zeros((4, 5, 6), np.int16), np.eye(4), "z.nii", qform=0)
    with open(path, "r+b") as fh:  # srow_y (bytes 296-311) := 0: the second voxel axis has no length
        fh.seek(296)
        fh.write(bytes(16))
    with pytest.raises(CTFlowError) as e:
        read_nifti(path)
    assert "spacing" in _err(e) and "zero" in _err(e)


# --- writing safety --------------------------------------------------------------------------


def test_existing_file_untouched_without_overwrite(tmp_path):
    path = tmp_path / "ct.nii.gz"
    path.write_bytes(b"old contents")
    with pytest.raises(CTFlowError) as e:
        write_nifti(marker_volume(), path)
    assert "overwrite" in _err(e)
    assert path.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz"]
    write_nifti(marker_volume(), path, overwrite=True)
    np.testing.assert_array_equal(read_nifti(path).array, marker_volume().array)


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def broken_save(img, filename):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", broken_save)
    with pytest.raises(CTFlowError, match="cannot write .*: disk full"):  # one line, not a traceback
        write_nifti(marker_volume(), tmp_path / "ct.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_write_refusals(tmp_path):
    with pytest.raises(CTFlowError) as e:
        write_nifti(marker_volume(), tmp_path / "ct.mha")
    assert ".nii" in _err(e)
    bad = Volume(np.full((2, 3, 4), np.nan, np.float32))
    with pytest.raises(CTFlowError) as e:
        write_nifti(bad, tmp_path / "nan.nii")
    assert "24 NaN" in _err(e)
    assert list(tmp_path.iterdir()) == []


# --- io dispatch -----------------------------------------------------------------------------


def test_read_write_volume_dispatch_nifti(tmp_path):
    vol = marker_volume()
    path = write_volume(vol, tmp_path / "ct.nii.gz")
    np.testing.assert_array_equal(read_volume(path).array, vol.array)
    with pytest.raises(CTFlowError) as e:
        write_volume(vol, tmp_path / "ct.png")
    assert ".nii" in _err(e) and "folder" in _err(e)
    other = tmp_path / "ct.png"
    other.write_bytes(b"x")
    with pytest.raises(CTFlowError) as e:
        read_volume(other)
    assert "NIfTI" in _err(e) and "DICOM" in _err(e)
    with pytest.raises(CTFlowError):
        read_volume(tmp_path / "missing.nii")
    single = tmp_path / "one.dcm"
    single.write_bytes(b"x")
    with pytest.raises(CTFlowError) as e:
        read_volume(single)
    assert "2D slice" in _err(e)


def test_gzip_is_really_compressed(tmp_path):
    path = write_nifti(marker_volume(), tmp_path / "ct.nii.gz")
    with gzip.open(path) as fh:
        assert len(fh.read()) > 352


@pytest.mark.parametrize(
    ("unit", "mm"), [("meter", 1000.0), ("micron", 0.001), ("unknown", 1.0), ("mm", 1.0)]
)
def test_the_header_spatial_unit_is_converted_to_mm(tmp_path, unit, mm):
    affine = np.diag([0.7 / mm, 0.8 / mm, 2.5 / mm, 1.0])
    affine[:3, 3] = np.array(ORIGIN) / mm
    img = nib.Nifti1Image(np.zeros((7, 6, 5), np.int16), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units(xyz=unit)
    nib.save(img, tmp_path / "u.nii.gz")
    v = read_nifti(tmp_path / "u.nii.gz")
    np.testing.assert_allclose(v.spacing, (2.5, 0.8, 0.7), rtol=1e-6)
    np.testing.assert_allclose(world(v.affine, (0, 0, 0))[0], ORIGIN[0] + 0.7 * 6, rtol=1e-6)


def test_missing_or_conflicting_orientation_codes_are_warned(tmp_path):
    from ctflow.errors import CTFlowWarning

    data = np.zeros((7, 6, 5), np.int16)
    ras, lps = np.diag([0.7, 0.8, 2.5, 1.0]), np.diag([-0.7, -0.8, 2.5, 1.0])
    save_raw(tmp_path, data, ras, "none.nii.gz", sform=0, qform=0)
    with pytest.warns(CTFlowWarning, match="no orientation"):
        read_nifti(tmp_path / "none.nii.gz")
    img = nib.Nifti1Image(data, ras)
    img.set_qform(ras, code=1)
    img.set_sform(lps, code=1)
    nib.save(img, tmp_path / "both.nii.gz")
    with pytest.warns(CTFlowWarning, match=r"qform \(RAS\) and the sform \(LPS\) disagree"):
        v = read_nifti(tmp_path / "both.nii.gz")
    assert v.metadata["original_axcodes"] == ("L", "P", "S")  # the sform
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_nifti(marker_volume(), tmp_path / "own.nii.gz")
        read_nifti(tmp_path / "own.nii.gz")  # ctflow's own files: no warning


@pytest.mark.parametrize("name", ["CT.NII.GZ", "c.nii.GZ", "d.Nii.Gz", "e.NII"])
def test_upper_case_extensions_are_written(tmp_path, name):
    write_volume(marker_volume(), tmp_path / name)
    assert np.array_equal(read_volume(tmp_path / name).array, marker_volume().array)
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_odd_headers_that_nibabel_reads_still_load(tmp_path):
    """A qform nibabel cannot turn into an affine (the sform places the volume), and an undefined unit
    code: they loaded before the orientation and unit checks, which must not turn them into tracebacks."""
    from ctflow.errors import CTFlowWarning

    data = np.zeros((7, 6, 5), np.int16)
    path = save_raw(tmp_path, data, np.diag([0.7, 0.6, 2.5, 1.0]), "q.nii")
    raw = bytearray(path.read_bytes())
    struct.pack_into("<3f", raw, 256, 1.0, 1.0, 1.0)  # quatern_b, c, d: b^2 + c^2 + d^2 > 1
    path.write_bytes(bytes(raw))
    np.testing.assert_allclose(read_nifti(path).spacing, (2.5, 0.6, 0.7), rtol=1e-6)
    img = nib.load(path)
    img.header["xyzt_units"] = 6  # spatial code 6: not defined by NIfTI
    nib.save(img, tmp_path / "u.nii")
    with pytest.warns(CTFlowWarning, match="spatial unit code 6"):
        np.testing.assert_allclose(read_nifti(tmp_path / "u.nii").spacing, (2.5, 0.6, 0.7), rtol=1e-6)
