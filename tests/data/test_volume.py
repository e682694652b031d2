"""The Volume type's geometry: spacing and affine agree however a volume is built."""

import numpy as np
import pytest

from ctflow.data.hu import resample_volume
from ctflow.data.volume import Volume, canonical_affine


def test_a_volume_built_from_an_affine_takes_its_voxel_sizes():
    """An affine alone once left spacing at 1 mm: resampling then made 6 slices of a 16-slice 5 mm
    volume where 32 were due, and previews squashed the coronal views five times."""
    v = Volume(np.zeros((16, 20, 24), np.int16), affine=canonical_affine((5, 0.7, 0.5)))
    assert v.spacing == pytest.approx((5, 0.7, 0.5))
    r = resample_volume(v, spacing=(2.5, 0.35, 0.25))
    assert r.shape[0] == 32 and np.allclose(np.linalg.norm(r.affine[:3, :3], axis=0), r.spacing)
    assert Volume(np.zeros((2, 3, 4))).spacing == (1.0, 1.0, 1.0)  # neither given: 1 mm
    assert Volume(np.zeros((2, 3, 4)), (2, 1, 1)).affine[2, 0] == -2.0  # spacing alone: its affine


def test_a_spacing_that_disagrees_with_the_affine_is_refused():
    with pytest.raises(ValueError, match="disagrees with the affine"):
        Volume(np.zeros((2, 3, 4)), (1, 1, 1), canonical_affine((5, 1, 1)))
    Volume(
        np.zeros((2, 3, 4)), (5.0000001, 1, 1), canonical_affine((5, 1, 1))
    )  # rounding is not a disagreement


@pytest.mark.parametrize(
    ("spacing", "affine", "match"),
    [
        ((float("nan"), 1, 1), None, "three positive numbers"),
        ((2, float("inf"), 1), None, "three positive numbers"),
        (None, np.eye(4), r"orders the axes \('R', 'A', 'S'\), not the canonical"),  # a file's, unreoriented
        (None, np.full((4, 4), np.nan), "finite 4x4"),
    ],
)
def test_a_spacing_or_affine_no_volume_can_have_is_refused(spacing, affine, match):
    """An identity affine on an (S, H, W) array was accepted and written out with its axes swapped."""
    from ctflow.errors import CTFlowError

    with pytest.raises(CTFlowError, match=match):
        Volume(np.zeros((2, 4, 4)), spacing, affine)
