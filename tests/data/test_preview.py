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
    assert iio.imread(tmp_path / "p.png").ndim == 2
    assert iio.imread(tmp_path / "p.gif", index=None).shape[0] == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.gif", "p.png"]
