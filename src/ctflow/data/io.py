"""Format dispatch: read or write a CT volume by path.

* a folder -> a DICOM series (:mod:`ctflow.data.dicom`);
* ``.nii`` / ``.nii.gz`` -> NIfTI (:mod:`ctflow.data.nifti`).
"""

from __future__ import annotations

import os
from pathlib import Path

from ctflow.data.dicom import read_dicom_series, write_dicom_series
from ctflow.data.nifti import is_nifti_path, read_nifti, write_nifti
from ctflow.data.volume import Volume
from ctflow.errors import CTFlowError

ACCEPTED_FORMATS = "a NIfTI file (.nii or .nii.gz) or a folder holding one DICOM series"


def read_volume(path: str | os.PathLike) -> Volume:
    """Read a CT from a NIfTI file or a DICOM series folder into a canonical :class:`Volume`."""
    path = Path(path)
    if not path.exists():
        raise CTFlowError(f"{path} does not exist; pass {ACCEPTED_FORMATS}")
    if path.is_dir():
        return read_dicom_series(path)
    if is_nifti_path(path):
        return read_nifti(path)
    if path.suffix.lower() in (".dcm", ".dicom", ".ima"):
        raise CTFlowError(
            f"{path} is a single DICOM file, i.e. one 2D slice; pass the folder holding the whole series"
        )
    raise CTFlowError(f"cannot read {path}: unsupported format; ctflow reads {ACCEPTED_FORMATS}")


def write_volume(volume: Volume, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``volume`` by the path's form: ``.nii`` / ``.nii.gz`` -> NIfTI, no extension -> DICOM folder.

    An existing folder is also written as a DICOM series (only with ``overwrite``).
    """
    path = Path(path)
    if is_nifti_path(path):
        return write_nifti(volume, path, overwrite=overwrite)
    if path.is_dir() or not path.suffix:
        return write_dicom_series(volume, path, overwrite=overwrite)
    raise CTFlowError(
        f"cannot write {path}: unknown extension {path.suffix!r}; use .nii / .nii.gz for NIfTI"
        " or a folder path without an extension for a DICOM series"
    )
