import imageio.v3 as iio
import numpy as np

from ctflow.data.preview import LUNG_WINDOW, apply_window, triplanar_image, write_gif, write_preview
from ctflow.data.volume import Volume


def _volume():
    hu = np.full((20, 32, 40), -1000, np.float32)
    hu[:, 8:24, 5:35] = 40
    hu[:, 0, 0] = np.arange(20) * 50 - 900  # every slice differs (GIF writers merge identical frames)
    return Volume(hu, (2.0, 1.0, 1.0))


def test_window_maps_ends_to_black_and_white():
    out = apply_window(np.array([-2000.0, LUNG_WINDOW[0], LUNG_WINDOW[1], 3000.0]), LUNG_WINDOW)
    assert out.tolist() == [0, 0, 255, 255]


def test_triplanar_has_two_windows_and_physical_aspect():
    img = triplanar_image(_volume(), gap=4)
    # coronal is 20 slices * 2 mm = 40 px tall; axial 32 px: panels padded to 40 rows, two rows + gap
    assert img.shape == (2 * 40 + 4, 40 + 4 + 40 + 4 + 32)
    assert img.dtype == np.uint8 and img.max() > 0


def test_preview_and_gif_are_written_atomically(tmp_path):
    write_preview(_volume(), tmp_path / "p.png")
    write_gif(_volume(), tmp_path / "p.gif")
    small = triplanar_image(_volume())  # 84 rows: enlarged 5x (nearest) to at least 384
    assert np.array_equal(iio.imread(tmp_path / "p.png"), small.repeat(5, 0).repeat(5, 1))
    assert iio.imread(tmp_path / "p.gif", index=None).shape[0] == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.gif", "p.png"]


def test_gif_frames_have_square_pixels_as_the_png_does(tmp_path):
    hu = _volume().hu()
    write_gif(Volume(hu, (2.0, 2.0, 1.0)), tmp_path / "wide.gif")  # rows 2 mm apart, columns 1 mm
    frames = iio.imread(tmp_path / "wide.gif", index=None)
    assert frames.shape[1:3] == (64, 40)  # 32 rows stretched to 64: was 32 x 40, squashed


def test_preview_of_a_large_volume_is_not_enlarged(tmp_path):
    vol = Volume(np.zeros((200, 256, 256), np.float32), (1.0, 1.0, 1.0))
    write_preview(vol, tmp_path / "p.png")
    assert np.array_equal(iio.imread(tmp_path / "p.png"), triplanar_image(vol))


def test_a_one_slice_volume_keeps_a_row_in_its_coronal_and_sagittal_planes():
    from ctflow.data.preview import mid_planes

    planes = mid_planes(Volume(np.full((1, 64, 64), 40.0, np.float32), (2.5, 5.8, 5.8)))
    assert [p.shape[0] for p in planes[1:]] == [1, 1] and planes[1].max() == 40.0


def test_planes_follow_the_radiological_convention():
    """Axial and coronal: the patient's right on the viewer's left; coronal and sagittal: head at the
    top; axial and sagittal: anterior at the top / on the left. Canonical volumes are (I, P, L):
    slice 0 superior, row 0 anterior, column 0 the patient's right."""
    from ctflow.data.preview import mid_planes

    a = np.full((8, 16, 16), -1000.0, np.float32)
    a[4, 0, 0] = 1000.0  # axial mid-plane: anterior, right
    a[0, 8, 0] = 1000.0  # coronal mid-plane: superior, right
    a[0, 0, 8] = 1000.0  # sagittal mid-plane: superior, anterior
    axial, coronal, sagittal = mid_planes(Volume(a, (1.0, 1.0, 1.0)))
    for plane in (axial, coronal, sagittal):
        assert np.unravel_index(plane.argmax(), plane.shape) == (0, 0)
