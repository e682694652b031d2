"""HU windowing and volume resampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctflow.data.hu import (
    HU_WINDOW,
    DenormalizeHU,
    NormalizeHU,
    denormalize_hu,
    normalize_hu,
    resample_volume,
    rescale_stored,
)
from ctflow.data.volume import Volume, canonical_affine
from ctflow.errors import CTFlowError

# --- normalize / denormalize -----------------------------------------------------------------


def test_window_constant():
    assert HU_WINDOW == (-1000.0, 1000.0)


def test_normalize_numpy_round_trip_and_clip():
    hu = np.array([-3000, -1000, -500, 0, 250, 1000, 4000], dtype=np.int16)
    x = normalize_hu(hu)
    assert isinstance(x, np.ndarray) and x.dtype == np.float32
    np.testing.assert_allclose(x, [-1, -1, -0.5, 0, 0.25, 1, 1], atol=1e-7)
    back = denormalize_hu(x)
    np.testing.assert_allclose(back, np.clip(hu, -1000, 1000), atol=1e-3)
    inside = np.linspace(-1000, 1000, 101)
    np.testing.assert_allclose(denormalize_hu(normalize_hu(inside)), inside, atol=1e-9)
    assert normalize_hu(inside).dtype == np.float64


def test_normalize_torch_keeps_type():
    hu = torch.tensor([[-2000.0, 0.0, 500.0]], dtype=torch.float32)
    x = normalize_hu(hu)
    assert isinstance(x, torch.Tensor) and x.dtype == torch.float32
    torch.testing.assert_close(x, torch.tensor([[-1.0, 0.0, 0.5]]))
    torch.testing.assert_close(denormalize_hu(x), torch.tensor([[-1000.0, 0.0, 500.0]]))
    assert normalize_hu(torch.tensor([0, 1000], dtype=torch.int16)).dtype == torch.float32


def test_custom_window_numbers_and_denormalize_clip():
    assert normalize_hu(40.0, window=(-160, 240)) == pytest.approx(0.0)
    assert denormalize_hu(1.5) == 1000.0
    assert denormalize_hu(1.5, clip=False) == pytest.approx(1500.0)
    assert denormalize_hu(np.array([-2.0]))[0] == -1000.0


SOFT = (-1000, -150, 150, 1000)


def test_piecewise_window_puts_its_knots_on_even_steps_and_round_trips():
    x = normalize_hu(np.array([-3000, -1000, -150, 0, 150, 1000, 3000], np.float32), SOFT)
    np.testing.assert_allclose(x, [-1, -1, -1 / 3, 0, 1 / 3, 1, 1], atol=1e-6)
    # soft tissue gets 2/3 of the range per 300 HU: 2.22x the slope of the linear window
    assert (normalize_hu(20.0, SOFT) - normalize_hu(10.0, SOFT)) / (
        normalize_hu(20.0) - normalize_hu(10.0)
    ) == pytest.approx(2000 / 900)
    hu = np.linspace(-1000, 1000, 401)
    y = normalize_hu(hu, SOFT)
    assert (np.diff(y) > 0).all()
    np.testing.assert_allclose(denormalize_hu(y, SOFT), hu, atol=1e-9)
    t = torch.tensor(hu, dtype=torch.float32)
    torch.testing.assert_close(normalize_hu(t, SOFT), torch.tensor(y, dtype=torch.float32))
    torch.testing.assert_close(denormalize_hu(normalize_hu(t, SOFT), SOFT), t, atol=1e-3, rtol=0)
    for v in (-700.0, -20.0, 400.0):  # numbers take the same path as arrays
        assert normalize_hu(v, SOFT) == pytest.approx(float(normalize_hu(np.array([v]), SOFT)[0]))
        assert denormalize_hu(normalize_hu(v, SOFT), SOFT) == pytest.approx(v)


def test_piecewise_window_clips_or_extends_its_end_segments():
    assert denormalize_hu(1.5, SOFT) == 1000.0
    # clip=False extends the last/first segment: 850 HU per 2/3 of the range
    assert denormalize_hu(1.5, SOFT, clip=False) == pytest.approx(1000 + 0.5 * 850 * 1.5)
    np.testing.assert_allclose(
        denormalize_hu(np.array([-1.5, 1.5]), SOFT, clip=False), [-1000 - 637.5, 1000 + 637.5]
    )
    torch.testing.assert_close(
        denormalize_hu(torch.tensor([-1.5, 0.0]), SOFT, clip=False), torch.tensor([-1637.5, 0.0])
    )


@pytest.mark.parametrize("window", [(100, 100), (200, -200), (0, float("nan")), "ab", (1, 3, 2), (5,)])
def test_bad_window(window):
    with pytest.raises(CTFlowError) as e:
        normalize_hu(np.zeros(3), window=window)
    assert "window" in str(e.value)


def test_named_transforms():
    sample = {"image": np.array([-1000.0, 0.0, 1000.0]), "text": "report"}
    out = NormalizeHU(keys=["image"])(sample)
    np.testing.assert_allclose(out["image"], [-1, 0, 1])
    assert out["text"] == "report" and sample["image"][0] == -1000.0  # input not mutated
    np.testing.assert_allclose(NormalizeHU(keys=["image"]).inverse(out)["image"], sample["image"])
    np.testing.assert_allclose(DenormalizeHU()(np.array([0.5])), [500.0])
    with pytest.raises(CTFlowError):
        NormalizeHU(keys=["missing"])(sample)


# --- resampling ------------------------------------------------------------------------------

SPACING = (2.0, 0.8, 0.8)
SHAPE = (16, 32, 40)
ORIGIN = (10.0, -20.0, 30.0)


def block_volume(dtype=np.float32) -> tuple[Volume, tuple[slice, slice, slice]]:
    array = np.full(SHAPE, -1000, dtype=dtype)
    block = (slice(4, 8), slice(8, 16), slice(20, 28))
    array[block] = 1000
    return Volume(array, SPACING, canonical_affine(SPACING, ORIGIN)), block


def world_centroid(vol: Volume) -> np.ndarray:
    weights = np.clip(vol.array.astype(np.float64) + 1000.0, 0, None)
    idx = np.indices(vol.shape).reshape(3, -1)
    centroid = (idx * weights.ravel()).sum(axis=1) / weights.sum()
    return (vol.affine @ np.array([*centroid, 1.0]))[:3]


def fov_centre(vol: Volume) -> np.ndarray:
    return (vol.affine @ np.array([*((np.array(vol.shape) - 1) / 2.0), 1.0]))[:3]


def test_double_spacing_halves_shape():
    vol, _ = block_volume()
    out = resample_volume(vol, spacing=(4.0, 1.6, 1.6))
    assert out.shape == (8, 16, 20)
    assert out.spacing == (4.0, 1.6, 1.6)
    np.testing.assert_allclose(np.linalg.norm(out.affine[:3, :3], axis=0), out.spacing)
    np.testing.assert_allclose(fov_centre(out), fov_centre(vol), atol=1e-9)
    np.testing.assert_allclose(world_centroid(out), world_centroid(vol), atol=0.05)
    # The block's centre voxel is still bright, a far corner still air.
    centre_world = world_centroid(vol)
    centre_idx = np.rint(np.linalg.solve(out.affine, [*centre_world, 1.0])[:3]).astype(int)
    assert out.array[tuple(centre_idx)] > 800  # slightly blurred by anti-aliasing
    assert out.array[-1, -1, -1] == pytest.approx(-1000)
    assert out.array.dtype == np.float32
    assert out.metadata["resampled_from"]["shape"] == SHAPE


def test_upsample_and_nearest_marker_world_position():
    vol, block = block_volume()
    out = resample_volume(vol, spacing=(1.0, 0.4, 0.4), order=0)
    assert out.shape == (32, 64, 80)
    np.testing.assert_allclose(world_centroid(out), world_centroid(vol), atol=1e-6)
    assert set(np.unique(out.array)) == {-1000.0, 1000.0}


def test_size_keeps_field_of_view():
    vol, _ = block_volume()
    out = resample_volume(vol, size=(16, 20))
    assert out.shape == (16, 16, 20)
    np.testing.assert_allclose(out.spacing, (2.0, 1.6, 1.6))
    extent = np.array(out.shape) * np.array(out.spacing)
    np.testing.assert_allclose(extent, np.array(SHAPE) * np.array(SPACING))
    np.testing.assert_allclose(fov_centre(out), fov_centre(vol), atol=1e-9)
    np.testing.assert_allclose(world_centroid(out), world_centroid(vol), atol=0.05)


def test_spacing_and_size_pads_with_air():
    vol, _ = block_volume(np.int16)
    vol.array[vol.array == -1000] = 0  # soft tissue background, so padding is visible
    out = resample_volume(vol, spacing=(2.0, 0.8, 0.8), size=(48, 40))
    assert out.shape == (16, 48, 40) and out.array.dtype == np.int16
    assert np.all(out.array[:, :8] == -1024) and np.all(out.array[:, -8:] == -1024)
    np.testing.assert_array_equal(out.array[:, 8:40], vol.array)  # same grid: copied exactly
    np.testing.assert_allclose(fov_centre(out), fov_centre(vol), atol=1e-9)


def test_no_target_is_a_copy_and_bad_args():
    vol, _ = block_volume()
    same = resample_volume(vol)
    np.testing.assert_array_equal(same.array, vol.array)
    assert same.array is not vol.array
    with pytest.raises(CTFlowError):
        resample_volume(vol, spacing=(1.0, 0.0, 1.0))
    with pytest.raises(CTFlowError):
        resample_volume(vol, spacing=(1.0, 1.0))
    with pytest.raises(CTFlowError):
        resample_volume(vol, size=(0, 10))
    with pytest.raises(CTFlowError):
        resample_volume(vol, size=(10.5, 10))
    with pytest.raises(CTFlowError):
        resample_volume(vol, spacing=(1, 1, 1), order=7)


def test_antialias_blur_matches_scipy():
    from scipy import ndimage

    from ctflow.data.hu import _gaussian_along

    x = np.random.default_rng(0).normal(size=(7, 9, 11)).astype(np.float32)
    for axis in range(3):
        expected = ndimage.gaussian_filter1d(x, 1.5, axis=axis, mode="nearest")
        np.testing.assert_allclose(_gaussian_along(x, 1.5, axis), expected, atol=1e-5)


def test_infinite_hu_clip_to_the_window_ends():
    for window in ((-1000, 1000), (-1000, -150, 150, 1000)):  # (they were NaN)
        assert normalize_hu(np.array([np.inf, -np.inf]), window).tolist() == pytest.approx([1.0, -1.0])
        ends = normalize_hu(torch.tensor([float("inf"), float("-inf")]), window).tolist()
        assert ends == pytest.approx([1.0, -1.0])


def test_rescale_stored_is_exact_int16_when_it_can_be():
    stored = np.array([[[0, 4095]], [[10, 20]]], np.uint16)
    out = rescale_stored(stored, [1.0, 2.0], [-1024.0, -1000.0])  # per slice, as DICOM
    assert out.dtype == np.int16 and out.tolist() == [[[-1024, 3071]], [[-980, -960]]]
    assert rescale_stored(stored, -1.0, 0.0).tolist() == (-stored.astype(int)).tolist()  # negative slope
    # big stored values that the intercept brings back into range: no int16/int32 wrap on the way
    big = np.array([2**31 - 1, 2**31 - 2], np.int64)
    assert rescale_stored(big, 1, -(2**31) + 1).tolist() == [0, -1]
    assert rescale_stored(np.zeros((0, 3), np.int16), 1, -1024).dtype == np.int16


def test_rescale_stored_falls_back_to_float32():
    stored = np.array([0, 1, 2], np.int16)
    half = rescale_stored(stored, 0.5, -1024)
    assert half.dtype == np.float32 and half.tolist() == [-1024.0, -1023.5, -1023.0]
    wide = rescale_stored(np.array([0, 40000], np.uint16), 1, 0)  # past int16
    assert wide.dtype == np.float32 and wide.tolist() == [0.0, 40000.0]
    per_slice = rescale_stored(np.ones((2, 2), np.int16), [1.0, 0.5], [0.0, 0.0])  # one slice not whole
    assert per_slice.dtype == np.float32 and per_slice.tolist() == [[1.0, 1.0], [0.5, 0.5]]
    # 32-bit stored values are scaled in float64 before the float32 result: 2**26 + 1 is not a float32
    precise = rescale_stored(np.array([2**26 + 1], np.int32), 0.5, -(2**25))
    assert precise.tolist() == [0.5]
    floats = rescale_stored(np.array([1.5], np.float16), 2.0, 0.0)
    assert floats.dtype == np.float32 and floats.tolist() == [3.0]


def test_rescale_stored_never_wraps_and_leaves_the_callers_array_alone():
    huge = rescale_stored(np.array([1, 2], np.int16), 2.0**63, 0)  # a whole slope past int64
    assert huge.dtype == np.float32 and huge.tolist() == [2.0**63, 2.0**64]
    assert rescale_stored(np.array([2**64 - 1], np.uint64), 1, 0).tolist() == [2.0**64]
    mine = np.arange(3.0)
    assert rescale_stored(mine, 2, 1).tolist() == [1.0, 3.0, 5.0] and mine.tolist() == [0.0, 1.0, 2.0]
