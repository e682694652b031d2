"""DICOM CT series reading and writing.

Reading takes a folder holding one axial CT series, orders the slices by their
position along the slice normal (never by file name or InstanceNumber), applies
RescaleSlope/Intercept, checks the geometry (no gaps, even spacing, no
duplicates, no oblique orientation) and returns a canonical
:class:`~ctflow.data.volume.Volume` (DICOM LPS patient coordinates become the
RAS+ affine by flipping x and y).

Writing produces a CT Image Storage series: one Explicit VR Little Endian file
per slice (``slice_0001.dcm`` = the most superior slice), signed 16-bit pixels
with RescaleSlope/Intercept, fresh UIDs and ``SYNTHETIC`` in SeriesDescription,
PatientName and PatientID.
"""

from __future__ import annotations

import datetime
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from ctflow.data.hu import rescale_stored
from ctflow.data.orientation import axcodes, reorient_to_canonical, spacing_from_affine
from ctflow.data.volume import Volume
from ctflow.errors import CTFlowError, positive_number, warn
from ctflow.files import atomic_dir

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
MAX_GAP_RATIO = 1.5  # a step larger than this times the median step means missing slices
MAX_STEP_DEVIATION = 0.10  # steps may differ from the median by at most 10 %
DUPLICATE_TOLERANCE_MM = 1e-2
OFF_LINE_PIXELS = 0.1  # a slice further than this (in pixels) off the line through the stack is refused
_INT16 = np.iinfo(np.int16)
_REQUIRED = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")


DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")


def _claims_dicom(path: Path) -> bool:
    """Whether ``path`` says it is DICOM: by its extension or the "DICM" mark after the preamble. Hidden
    files (macOS's ``._IM0001.dcm`` resource forks on copied media) do not."""
    if path.name.startswith("."):
        return False
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _unreadable(path: Path, reason: str) -> CTFlowError:
    return CTFlowError(
        f"{path}: cannot read this DICOM file ({reason}); re-export the series, or remove the file if it is"
        " not part of it"
    )


def _read_header(path: Path) -> Dataset | None:
    """The header of a DICOM image file, or None for non-DICOM files and non-image DICOM objects.

    A file that says it is DICOM (see :func:`_claims_dicom`) but cannot be read is refused: skipping it
    would lose a slice without a word when it is the first or last one."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # not DICOM (.DS_Store, notes), or damaged
        if _claims_dicom(path):
            reason = "it is empty" if path.stat().st_size == 0 else f"{type(exc).__name__}: {exc}"
            raise _unreadable(path, reason) from None
        return None
    if "Rows" not in ds or "Columns" not in ds:
        meta = getattr(ds, "file_meta", None)
        sop = getattr(ds, "SOPClassUID", None) or getattr(meta, "MediaStorageSOPClassUID", None)
        if "Image Storage" in str(getattr(sop, "name", "")):  # an image without its size: cut short
            raise _unreadable(path, f"a {sop.name} file without Rows or Columns: truncated or damaged")
        return None  # DICOMDIR, structured reports, presentation states, ...
    if "LOCALIZER" in [str(v).upper() for v in _multi(getattr(ds, "ImageType", ()))]:
        return None  # a scout image saved beside the axial slices
    return ds


def _multi(value) -> list:
    """A DICOM value as a list (a multi-valued tag is a MultiValue, a single value is not)."""
    return [value] if isinstance(value, str) else list(value)


def _floats(ds: Dataset, keyword: str, n: int, path: Path) -> np.ndarray:
    try:
        values = np.array([float(v) for v in ds[keyword].value], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        values = np.array([])
    if values.shape != (n,) or not np.all(np.isfinite(values)):
        raise CTFlowError(f"{path}: {keyword} is missing or malformed; the series cannot be placed in space")
    return values


def _pixels(path: Path) -> tuple[np.ndarray, float, float]:
    ds = pydicom.dcmread(path)
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        raise CTFlowError(
            f"{path}: multi-frame (enhanced) DICOM is not supported; convert it to NIfTI (e.g. dcm2niix)"
        )
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2") or int(getattr(ds, "SamplesPerPixel", 1)) != 1:
        raise CTFlowError(f"{path}: {photometric} colour images are not CT; pass a greyscale CT series")
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for missing decoders / bad pixel data
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        fix = (
            "decompress the series first (e.g. gdcmconv --raw or dcmdjpeg)"
            if getattr(syntax, "is_compressed", True)
            else "the file is uncompressed, so it is truncated or damaged: re-export the series"
        )
        raise CTFlowError(
            f"{path}: cannot decode the pixel data (transfer syntax {getattr(syntax, 'name', syntax)}:"
            f" {exc}); {fix}"
        ) from None
    if pixels.ndim != 2:
        raise CTFlowError(f"{path}: expected a 2D slice, got pixel data of shape {pixels.shape}")
    slope = _value(ds, "RescaleSlope", 1.0, path)
    if slope == 0.0:
        raise CTFlowError(f"{path}: RescaleSlope is 0, which maps every pixel to one value; fix the header")
    return pixels, slope, _value(ds, "RescaleIntercept", 0.0, path)


def _value(ds: Dataset, keyword: str, default: float, path: Path) -> float:
    """A numeric tag; ``default`` when it is absent or empty."""
    raw = getattr(ds, keyword, None)
    if raw is None or str(raw).strip() == "":
        return default
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = float("nan")
    if not np.isfinite(value):
        raise CTFlowError(f"{path}: {keyword} {str(raw)!r} is not a number; fix the header")
    return value


def _slice_thickness(ds: Dataset) -> float | None:
    """SpacingBetweenSlices, else SliceThickness, in mm: the depth of a one-slice series (None: neither
    is a number above 0)."""
    for key in ("SpacingBetweenSlices", "SliceThickness"):
        try:
            value = float(getattr(ds, key))
        except (AttributeError, TypeError, ValueError):
            continue
        if positive_number(value):
            return value
    return None


def check_stack(folder, slices, along, positions, pixel_spacing) -> None:
    """Refuse a sorted stack of two or more slices that is not one even, straight series: duplicate
    positions, missing slices, uneven steps, or a slice off the line through the others."""
    steps = np.diff(along)
    dup = np.flatnonzero(steps < DUPLICATE_TOLERANCE_MM)
    if dup.size:
        i = int(dup[0])
        raise CTFlowError(
            f"{folder}: {dup.size} duplicate slice position(s), e.g. {slices[i][0].name} and"
            f" {slices[i + 1][0].name} are both at {along[i]:.3f} mm; remove duplicate files or split"
            " the series (it may hold several acquisitions)"
        )
    median = float(np.median(steps))
    gaps = np.flatnonzero(steps > MAX_GAP_RATIO * median)
    if gaps.size:
        i = int(gaps[0])
        more = f" ({gaps.size} such steps)" if gaps.size > 1 else ""
        raise CTFlowError(
            f"{folder}: missing slices or a change of spacing: a {steps[i]:.3f} mm step between positions"
            f" {along[i]:.3f} and {along[i + 1]:.3f} mm where the usual step is {median:.3f} mm{more};"
            " re-export the complete series, or resample it to even spacing"
        )
    uneven = np.flatnonzero(np.abs(steps - median) > MAX_STEP_DEVIATION * median)
    if uneven.size:
        raise CTFlowError(
            f"{folder}: inconsistent slice spacing (steps from {steps.min():.3f} to {steps.max():.3f} mm,"
            f" more than {MAX_STEP_DEVIATION:.0%} apart); resample the series to even spacing first"
        )

    # every slice on the straight line from the first to the last (as the affine will place it)
    share = (along - along[0]) / (along[-1] - along[0])
    off = np.linalg.norm(positions - (positions[0] + share[:, None] * (positions[-1] - positions[0])), axis=1)
    if off.max() > OFF_LINE_PIXELS * min(pixel_spacing):
        i = int(np.argmax(off))
        raise CTFlowError(
            f"{folder}: {slices[i][0].name} lies {off[i]:.2f} mm off the line through the other slices'"
            " ImagePositionPatient; the slices do not form one straight stack: re-export the series, or"
            " resample it first"
        )


def read_dicom_series(folder: str | os.PathLike) -> Volume:
    """Read the single CT series in ``folder`` into a canonical :class:`Volume`.

    Non-DICOM files (``.DS_Store``, text files), non-image DICOM objects and
    localizer (scout) images are ignored. ``metadata`` gets ``source``, ``format`` (``"dicom"``),
    ``original_axcodes`` (columns, rows, slices in position order, as a NIfTI's x, y, z),
    ``series_description``, ``series_instance_uid``, ``patient_id`` and ``synthetic``
    (``"SYNTHETIC"`` in SeriesDescription).
    """
    folder = Path(folder)
    if not folder.exists():
        raise CTFlowError(f"{folder} does not exist; pass the folder that holds the DICOM series")
    if not folder.is_dir():
        raise CTFlowError(
            f"{folder} is a file, not a folder; a single DICOM file is one 2D slice,"
            " pass the folder that holds the whole series"
        )
    files = sorted(p for p in folder.iterdir() if p.is_file())
    headers = [(p, ds) for p in files if (ds := _read_header(p)) is not None]
    if not headers:
        folders = [p.name for p in folder.iterdir() if p.is_dir()]
        if files:
            what = f"none of its {len(files)} files are DICOM image slices (localizers are skipped)"
        elif folders:
            names = ", ".join(sorted(folders)[:3]) + (", ..." if len(folders) > 3 else "")
            what = f"it holds no files, only folders ({names}): is a series one of them?"
        else:
            what = "it is empty, no DICOM images"
        raise CTFlowError(f"{folder}: {what}; pass a folder holding one CT series")

    series: dict[str, list[tuple[Path, Dataset]]] = defaultdict(list)
    for p, ds in headers:
        series[str(getattr(ds, "SeriesInstanceUID", ""))].append((p, ds))
    if len(series) > 1:
        raise CTFlowError(
            f"{folder} holds {len(series)} DICOM series (different SeriesInstanceUIDs);"
            " pass a folder holding only one series (sort the files into one folder per series first)"
        )
    (slices,) = series.values()
    thickness = None  # a one-slice series' spacing, which no second position gives
    if len(slices) == 1:
        thickness = _slice_thickness(slices[0][1])
        if thickness is None:
            raise CTFlowError(
                f"{folder} holds a single DICOM slice ({slices[0][0].name}) without a SliceThickness or"
                " SpacingBetweenSlices above 0, so it has no depth; a 2D image is not read as a CT volume"
            )

    p0, ds0 = slices[0]
    for key in _REQUIRED:
        for p, ds in slices:
            if key not in ds:
                raise CTFlowError(f"{p}: the {key} tag is missing; the series cannot be placed in space")
    rows, cols = int(ds0.Rows), int(ds0.Columns)
    iop = _floats(ds0, "ImageOrientationPatient", 6, p0)
    pixel_spacing = _floats(ds0, "PixelSpacing", 2, p0)
    for p, ds in slices:
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise CTFlowError(
                f"{folder}: slices differ in size ({p.name} is {int(ds.Rows)}x{int(ds.Columns)},"
                f" {p0.name} is {rows}x{cols}); pass a folder holding one consistent series"
            )
        if not np.allclose(_floats(ds, "ImageOrientationPatient", 6, p), iop, atol=1e-4):
            raise CTFlowError(
                f"{folder}: slices have different ImageOrientationPatient ({p.name} vs {p0.name});"
                " pass a folder holding one consistent series"
            )
        if not np.allclose(_floats(ds, "PixelSpacing", 2, p), pixel_spacing, rtol=1e-3, atol=1e-6):
            raise CTFlowError(f"{folder}: slices have different PixelSpacing ({p.name} vs {p0.name})")
    if min(pixel_spacing) <= 0:
        raise CTFlowError(f"{p0}: PixelSpacing {tuple(pixel_spacing)} must be positive; fix the header")

    row_dir, col_dir = iop[:3], iop[3:]
    if min(np.linalg.norm(row_dir), np.linalg.norm(col_dir)) < 1e-6:
        raise CTFlowError(f"{p0}: ImageOrientationPatient {tuple(iop)} has a zero vector; fix the header")
    row_dir, col_dir = row_dir / np.linalg.norm(row_dir), col_dir / np.linalg.norm(col_dir)
    normal = np.cross(row_dir, col_dir)
    positions = np.array([_floats(ds, "ImagePositionPatient", 3, p) for p, ds in slices])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along, positions = along[order], positions[order]
    slices = [slices[i] for i in order]

    if thickness is None:
        check_stack(folder, slices, along, positions, pixel_spacing)
        step = (positions[-1] - positions[0]) / (len(slices) - 1)
    else:  # a unit normal: with a slightly skewed orientation the cross product is shorter
        step = normal / np.linalg.norm(normal) * thickness

    # LPS affine of the (slice, row, column) array in sorted order.
    lps = np.eye(4)
    lps[:3, 0] = step
    lps[:3, 1] = col_dir * pixel_spacing[0]  # rows advance along the column direction
    lps[:3, 2] = row_dir * pixel_spacing[1]  # columns advance along the row direction
    lps[:3, 3] = positions[0]
    affine = LPS_TO_RAS @ lps

    planes, slopes, intercepts = [], np.ones(len(slices)), np.zeros(len(slices))
    for k, (p, _) in enumerate(slices):
        pixels, slopes[k], intercepts[k] = _pixels(p)
        if pixels.shape != (rows, cols):
            raise CTFlowError(f"{p}: pixel data shape {pixels.shape} does not match Rows x Columns")
        planes.append(pixels)
    data = rescale_stored(np.stack(planes), slopes, intercepts)
    del planes

    # (column, row, slice) with the slices in the sorted order: a NIfTI's (x, y, z) axes, so `ctflow
    # info` gives one convention for both formats (LPS for an axial series)
    original = tuple(reversed(axcodes(affine)))
    array, affine = reorient_to_canonical(data, affine, source=str(folder))
    description = str(getattr(ds0, "SeriesDescription", "") or "")
    modality = str(getattr(ds0, "Modality", "") or "").upper()
    if modality not in ("", "CT"):
        warn(f"{folder}: the series' Modality is {modality}, not CT; its values are read as HU all the same")
    metadata = {
        "source": str(folder),
        "format": "dicom",
        "original_axcodes": original,
        "series_description": description,
        "series_instance_uid": str(getattr(ds0, "SeriesInstanceUID", "")),
        "patient_id": str(getattr(ds0, "PatientID", "")),
        "synthetic": "SYNTHETIC" in description.upper(),
    }
    return Volume(array=array, spacing=spacing_from_affine(affine), affine=affine, metadata=metadata)


def _ds(value: float) -> str:
    return format_number_as_ds(float(value))


def _to_stored(array: np.ndarray) -> tuple[np.ndarray, float, float]:
    """int16 stored values plus (slope, intercept) such that value = stored * slope + intercept."""
    if array.dtype.kind == "b":
        array = array.astype(np.int16)
    if array.dtype.kind not in "iuf":
        raise CTFlowError(f"cannot write voxels of type {array.dtype} to DICOM; convert to int16 or float32")
    if array.size == 0:
        raise CTFlowError("cannot write an empty volume to DICOM")
    if array.dtype.kind == "f":
        bad = array.size - int(np.count_nonzero(np.isfinite(array)))
        if bad:
            raise CTFlowError(
                f"the volume has {bad} NaN or infinite voxels; replace them (numpy.nan_to_num) before writing"
            )
    lo, hi = float(array.min()), float(array.max())
    if array.dtype.kind in "iu" and lo >= _INT16.min and hi <= _INT16.max:
        return array.astype(np.int16), 1.0, 0.0
    if array.dtype.kind == "f" and np.rint(lo) >= _INT16.min and np.rint(hi) <= _INT16.max:
        return np.rint(array).astype(np.int16), 1.0, 0.0
    if array.dtype.kind in "iu" and hi - lo <= 65535:  # whole numbers 16 bits apart: exact, shifted
        intercept = lo - _INT16.min
        return (array.astype(np.int64) - int(intercept)).astype(np.int16), 1.0, intercept
    # Out of int16 range: map [lo, hi] linearly onto the int16 range.
    slope = float(_ds((hi - lo) / 65535.0)) or 1.0
    intercept = float(_ds(lo - _INT16.min * slope))
    stored = np.rint((array.astype(np.float64) - intercept) / slope)
    return np.clip(stored, _INT16.min, _INT16.max).astype(np.int16), slope, intercept


def not_series(folder: Path) -> Path | None:
    """The first entry of ``folder`` that is not a ``.dcm`` file (None: it holds a series alone, which
    writing a series may replace)."""
    return next(
        (p for p in sorted(folder.iterdir()) if not (p.is_file() and p.suffix.lower() == ".dcm")), None
    )


def check_series_folder(folder: str | Path, replacing: bool = False) -> Path:
    """Refuse a series folder named like a file (``ct.dcm``): a series is a folder of slices; and, when
    it is to be ``replacing``'d (--overwrite), a folder holding anything but DICOM files, which
    replacing it would delete."""
    folder = Path(folder)
    if folder.suffix.lower() in (".dcm", ".nii", ".gz"):
        raise CTFlowError(
            f"a DICOM series is written as a folder of slices; give {folder} without an extension"
        )
    if replacing and folder.is_dir():
        if (other := not_series(folder)) is not None:
            raise CTFlowError(
                f"{folder} holds {other.name}, not only a DICOM series: writing the series replaces the whole"
                " folder; give the series a folder of its own"
            )
    return folder


def write_dicom_series(
    volume: Volume,
    folder: str | os.PathLike,
    overwrite: bool = False,
    series_description: str = "SYNTHETIC ctflow",
    patient_id: str = "SYNTHETIC",
) -> Path:
    """Write ``volume`` as a CT DICOM series into ``folder`` (created atomically); return the folder.

    One file per axial slice, ``slice_0001.dcm`` being ``volume.array[0]`` (the
    most superior slice). int16 volumes are stored exactly; float volumes are
    rounded to integer HU (or scaled with a RescaleSlope when they exceed the
    int16 range). A synthetic volume (``volume.synthetic``) always gets
    ``SYNTHETIC`` in its SeriesDescription, even if ``series_description`` lacks
    it. Refuses to replace an existing folder unless ``overwrite``.
    """
    folder = check_series_folder(folder, replacing=overwrite)
    array = np.asarray(volume.array)
    if array.ndim != 3:
        raise CTFlowError(f"cannot write a {array.ndim}D array as a DICOM series; expected (S, H, W)")
    if array.shape[1] > 65535 or array.shape[2] > 65535:
        raise CTFlowError(f"slices of {array.shape[1]}x{array.shape[2]} are too large for DICOM")
    stored, slope, intercept = _to_stored(array)

    ras = np.asarray(volume.affine, dtype=np.float64)
    if not np.all(np.isfinite(ras)):
        raise CTFlowError("the volume's affine has NaN/inf entries; fix it before writing")
    lps = LPS_TO_RAS @ ras  # the flip is its own inverse
    spacing = spacing_from_affine(lps)
    if min(spacing) <= 0:
        raise CTFlowError(f"the volume's affine has a zero voxel size {spacing}; fix it before writing")
    row_dir = lps[:3, 2] / spacing[2]  # along a row = increasing column index
    col_dir = lps[:3, 1] / spacing[1]  # down a column = increasing row index
    normal = np.cross(row_dir, col_dir)

    now = datetime.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    if volume.synthetic and "SYNTHETIC" not in series_description.upper():
        series_description = f"SYNTHETIC {series_description}".strip()  # generated CTs stay marked
    synthetic = "SYNTHETIC" in series_description.upper() or "SYNTHETIC" in patient_id.upper()
    window = (40.0, 400.0)

    with atomic_dir(folder, overwrite) as tmp:
        for k in range(stored.shape[0]):
            position = lps[:3, :3] @ np.array([k, 0.0, 0.0]) + lps[:3, 3]
            sop_uid = generate_uid()

            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
            meta.MediaStorageSOPInstanceUID = sop_uid
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            meta.ImplementationVersionName = "CTFLOW"

            ds = Dataset()
            ds.file_meta = meta
            ds.SpecificCharacterSet = "ISO_IR 100"
            # SOP common
            ds.SOPClassUID = CT_IMAGE_STORAGE
            ds.SOPInstanceUID = sop_uid
            # Patient
            ds.PatientName = "SYNTHETIC^CTFLOW" if synthetic else "ANONYMOUS"
            ds.PatientID = patient_id
            ds.PatientBirthDate = ""
            ds.PatientSex = "O"
            ds.PatientIdentityRemoved = "YES"
            # General study
            ds.StudyInstanceUID = study_uid
            ds.StudyDate, ds.StudyTime = date, time
            ds.ReferringPhysicianName = ""
            ds.StudyID = "1"
            ds.AccessionNumber = ""
            ds.StudyDescription = series_description
            # General series
            ds.Modality = "CT"
            ds.PatientPosition = "HFS"  # (type 2C in CT series) head first, supine: the axes written
            ds.SeriesInstanceUID = series_uid
            ds.SeriesNumber = 1
            ds.SeriesDescription = series_description
            ds.SeriesDate, ds.SeriesTime = date, time
            # Frame of reference
            ds.FrameOfReferenceUID = frame_uid
            ds.PositionReferenceIndicator = ""
            # General equipment
            ds.Manufacturer = "ctflow"
            ds.SoftwareVersions = "ctflow"
            # General image / CT image
            ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
            ds.InstanceNumber = k + 1
            ds.ContentDate, ds.ContentTime = date, time
            ds.AcquisitionNumber = 1
            ds.BurnedInAnnotation = "NO"
            if synthetic:
                ds.ImageComments = "SYNTHETIC image generated by ctflow; not a real patient"
            ds.KVP = ""
            # Image plane
            ds.ImagePositionPatient = [_ds(v) for v in position]
            ds.ImageOrientationPatient = [_ds(v) for v in (*row_dir, *col_dir)]
            ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[2])]
            ds.SliceThickness = _ds(spacing[0])
            ds.SpacingBetweenSlices = _ds(spacing[0])
            ds.SliceLocation = _ds(float(position @ normal))
            # Image pixel
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows, ds.Columns = int(stored.shape[1]), int(stored.shape[2])
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
            ds.PixelRepresentation = 1
            ds.RescaleIntercept = _ds(intercept)
            ds.RescaleSlope = _ds(slope)
            ds.RescaleType = "HU"
            ds.WindowCenter, ds.WindowWidth = _ds(window[0]), _ds(window[1])
            ds.PixelData = np.ascontiguousarray(stored[k]).astype("<i2").tobytes()
            ds.save_as(tmp / f"slice_{k + 1:04d}.dcm", enforce_file_format=True)
    return folder
