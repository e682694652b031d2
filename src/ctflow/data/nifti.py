"""NIfTI (``.nii`` / ``.nii.gz``) reading and writing.

Reading applies ``scl_slope`` / ``scl_inter``, refuses images we cannot use
(2D, 4D, oblique, NaN voxels, zero spacing, corrupt files) and reorients to the
canonical ``(S, H, W)`` layout of :mod:`ctflow.data.volume`.

On disk, :func:`write_nifti` stores the canonical array transposed to
``(W, H, S)`` (the usual slice-last NIfTI order, axis codes ``("L", "P", "I")``)
with the affine permuted to match, as NIfTI-1 with ``sform_code = qform_code = 1``
(scanner anatomical). Viewers therefore show it the right way round and
``read_nifti(write_nifti(v))`` returns the same array (bit-exact for int16 and
float32), spacing and affine.

NIfTI-1 stores the affine as float32. When reading, each float32 affine entry is
converted to float64 through its shortest decimal representation, so a spacing
written as ``0.7`` reads back as exactly ``0.7`` (not ``0.699999988``).
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from ctflow.data.hu import rescale_stored
from ctflow.data.orientation import axcodes, reorient_to_canonical, spacing_from_affine
from ctflow.data.volume import Volume
from ctflow.errors import CTFlowError, warn
from ctflow.files import atomic_path

NIFTI_SUFFIXES = (".nii", ".nii.gz")
SYNTHETIC_DESCRIP = "SYNTHETIC ctflow"
_READ_ERRORS = (OSError, EOFError, zlib.error, gzip.BadGzipFile, ValueError, ImageFileError, HeaderDataError)


def is_nifti_path(path: str | os.PathLike) -> bool:
    name = Path(path).name.lower()
    return name.endswith(NIFTI_SUFFIXES)


def _float32_to_decimal(values: np.ndarray) -> np.ndarray:
    """float32-stored numbers -> float64 via their shortest round-tripping decimal."""
    flat = [float(str(np.float32(v))) for v in values.ravel()]
    return np.array(flat, dtype=np.float64).reshape(values.shape)


def _header_scaling(img: nib.Nifti1Image) -> list[float] | None:
    slope = float(getattr(img.dataobj, "slope", 1.0))
    inter = float(getattr(img.dataobj, "inter", 0.0))
    return None if (slope, inter) == (1.0, 0.0) else [slope, inter]


def _scaled_data(img: nib.Nifti1Image, path: Path) -> np.ndarray:
    """Voxel values with scl_slope/inter applied: int16 when exactly integer and in range, else float32."""
    proxy = img.dataobj
    raw = np.asarray(proxy.get_unscaled())
    slope = float(getattr(proxy, "slope", 1.0))
    inter = float(getattr(proxy, "inter", 0.0))
    if not (np.isfinite(slope) and np.isfinite(inter)):
        raise CTFlowError(f"{path}: scl_slope/scl_inter ({slope}, {inter}) are not finite; fix the header")
    if raw.dtype.kind == "b":
        raw = raw.astype(np.uint8)
    if raw.dtype.kind not in "iuf":
        raise CTFlowError(
            f"{path}: voxel type {raw.dtype} is not supported; store the CT as integers or floats in HU"
        )
    out = rescale_stored(raw, slope, inter)
    bad = out.size - int(np.count_nonzero(np.isfinite(out)))
    if bad:
        raise CTFlowError(
            f"{path}: {bad} of {out.size} voxels are NaN or infinite; replace them (e.g. with"
            " numpy.nan_to_num or a fill of -1024 HU) before using the volume"
        )
    return out


def _load(path: Path) -> nib.Nifti1Image:
    """Load the whole file (decompressing and CRC-checking gzip) and parse it as NIfTI-1 or -2."""
    try:
        with open(path, "rb") as fh:
            gzipped = fh.read(2) == b"\x1f\x8b"
        if gzipped:
            with gzip.open(path, "rb") as fh:
                blob = fh.read()  # reads to the end: the CRC and length are verified
        else:
            blob = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise CTFlowError(
            f"{path} is truncated or corrupt ({type(exc).__name__}: {exc}); re-export or re-download it"
        ) from None
    klass = None
    if len(blob) >= 348:
        for order in "<>":
            (sizeof_hdr,) = struct.unpack(order + "i", blob[:4])
            if sizeof_hdr == 348 and blob[344:348] == b"n+1\x00":
                klass = nib.Nifti1Image
            elif sizeof_hdr == 540 and len(blob) >= 540 and blob[4:8] == b"n+2\x00":
                klass = nib.Nifti2Image
            elif sizeof_hdr in (348, 540):
                raise CTFlowError(
                    f"{path} is an Analyze/NIfTI header-image pair or has a bad magic string;"
                    " convert it to a single .nii or .nii.gz file"
                )
    if klass is None:
        raise CTFlowError(f"{path} is not a readable NIfTI file (no NIfTI header); pass a .nii or .nii.gz CT")
    try:
        return klass.from_bytes(blob)
    except _READ_ERRORS as exc:
        raise CTFlowError(
            f"{path} is not a readable NIfTI file ({type(exc).__name__}: {exc}); pass a .nii or .nii.gz CT"
        ) from None


# mm per spatial unit of xyzt_units (its low 3 bits): 0 unknown (read as mm, as most tools mean it),
# 1 metre, 2 mm, 3 micron
_MM_PER_UNIT = {0: 1.0, 1: 1000.0, 2: 1.0, 3: 0.001}


def _mm_per_unit(header, path: Path) -> float:
    """How many mm the header's spatial unit (xyzt_units) is: its affine and spacing are in that unit."""
    code = int(np.asarray(header["xyzt_units"])) & 0x07
    if code not in _MM_PER_UNIT:
        warn(f"{path}: xyzt_units gives spatial unit code {code}, which NIfTI does not define; read as mm")
    return _MM_PER_UNIT.get(code, 1.0)


def _codes(affine) -> str:
    return "".join(c or "?" for c in axcodes(affine))


def _check_orientation_codes(header, path: Path) -> None:
    """Warn when the header does not say how the voxels lie in the body, or says it two ways."""
    try:
        qform, qcode = header.get_qform(coded=True)
    except ValueError:  # a quaternion nibabel cannot read (the sform places the volume): no qform
        qform, qcode = None, 0
    sform, scode = header.get_sform(coded=True)
    if not qcode and not scode:
        warn(
            f"{path}: the header gives no orientation (qform_code and sform_code are 0), so which side is"
            f" the patient's left is unknown; it is read as {_codes(header.get_best_affine())},"
            " the NIfTI default: check left and right, or set the sform"
        )
    elif qcode and scode and np.all(np.isfinite(qform)) and np.all(np.isfinite(sform)):
        if _codes(qform) != _codes(sform):
            warn(
                f"{path}: the qform ({_codes(qform)}) and the sform ({_codes(sform)})"
                " disagree on the orientation; the sform is used, as the NIfTI standard says: check left"
                " and right"
            )


def read_nifti(path: str | os.PathLike) -> Volume:
    """Read a 3D ``.nii`` / ``.nii.gz`` CT into a canonical :class:`Volume`.

    ``metadata`` gets ``source`` (the path), ``format`` (``"nifti"``), ``descrip``
    (the header description), ``synthetic`` (``"SYNTHETIC"`` in ``descrip``) and
    ``original_axcodes`` (the orientation on disk).
    """
    path = Path(path)
    if not path.exists():
        raise CTFlowError(f"{path} does not exist; check the path to the NIfTI file")
    if path.is_dir():
        raise CTFlowError(f"{path} is a folder, not a NIfTI file; use read_dicom_series for a DICOM folder")
    img = _load(path)

    shape = tuple(int(v) for v in img.shape)
    if len(shape) < 3:
        raise CTFlowError(f"{path} is a 2D image (shape {shape}); ctflow needs a 3D CT volume")
    squeeze = 0
    while len(shape) - squeeze > 3 and shape[len(shape) - 1 - squeeze] == 1:
        squeeze += 1
    if len(shape) - squeeze > 3:
        raise CTFlowError(
            f"{path} is {len(shape)}D (shape {shape}); pass a single 3D volume"
            " (extract one time point, e.g. nibabel img.slicer[..., 0] or fslroi)"
        )
    if 0 in shape[:3]:
        raise CTFlowError(f"{path} holds no voxels (shape {shape[:3]}); pass a volume with slices in it")

    try:
        data = _scaled_data(img, path)
    except CTFlowError:
        raise
    except (*_READ_ERRORS, MemoryError) as exc:
        raise CTFlowError(
            f"{path} is truncated or corrupt ({type(exc).__name__}: {exc}); re-export or re-download it"
        ) from None
    data = data.reshape(shape[:3])

    affine = np.asarray(img.affine, dtype=np.float64)
    # NIfTI-1 holds the sform, the qform's pixdim and offsets and the fallback pixdim all as float32
    if isinstance(img, nib.Nifti1Image) and not isinstance(img, nib.Nifti2Image):
        affine[:3] = _float32_to_decimal(affine[:3])
    affine[:3] *= _mm_per_unit(img.header, path)
    _check_orientation_codes(img.header, path)
    original = axcodes(affine) if np.all(np.isfinite(affine)) else None
    data, affine = reorient_to_canonical(data, affine, source=str(path))
    spacing = spacing_from_affine(affine)

    descrip = img.header["descrip"]
    descrip = descrip.item() if hasattr(descrip, "item") else descrip
    if isinstance(descrip, bytes):
        descrip = descrip.split(b"\x00", 1)[0].decode("latin-1", errors="replace")
    descrip = str(descrip).strip()
    metadata = {
        "source": str(path),
        "format": "nifti",
        "descrip": descrip,
        "synthetic": "SYNTHETIC" in descrip.upper(),
        "original_axcodes": original,
        # the header's scl_slope/scl_inter where they scale the values (already applied), else None
        "header_scaling": _header_scaling(img),
    }
    return Volume(array=data, spacing=spacing, affine=affine, metadata=metadata)


# (W, H, S) on disk <- (S, H, W) in memory: voxel (i, j, k) on disk is (k, j, i) canonical.
_DISK_PERMUTATION = np.array(
    [[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]],
    dtype=np.float64,
)


def _disk_array(volume: Volume) -> np.ndarray:
    array = np.asarray(volume.array)
    if array.dtype.kind == "b":
        array = array.astype(np.uint8)
    elif array.dtype.kind == "f" and array.dtype != np.float32:
        array = array.astype(np.float32)
    elif array.dtype.kind not in "iuf":
        raise CTFlowError(f"cannot write voxels of type {array.dtype} to NIfTI; convert to int16 or float32")
    elif array.dtype.kind in "iu" and array.dtype.itemsize == 8:  # nibabel refuses 64-bit integers
        lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
        narrow = next(
            (t for t in (np.int16, np.int32) if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max), None
        )
        if narrow is None:
            raise CTFlowError(
                f"voxel values {lo}..{hi} do not fit 32-bit integers; store HU as int16 or float32"
            )
        array = array.astype(narrow)
    if array.dtype.kind == "f":
        bad = array.size - int(np.count_nonzero(np.isfinite(array)))
        if bad:
            raise CTFlowError(
                f"the volume has {bad} NaN or infinite voxels; replace them (numpy.nan_to_num) before writing"
            )
    return np.ascontiguousarray(array.transpose(2, 1, 0))


def write_nifti(
    volume: Volume,
    path: str | os.PathLike,
    overwrite: bool = False,
    synthetic: bool | None = None,
) -> Path:
    """Write ``volume`` to ``path`` (``.nii`` or ``.nii.gz``) atomically; return the path.

    The array is stored as ``(W, H, S)`` with the matching affine (see module
    docstring). ``descrip`` is ``"SYNTHETIC ctflow"`` when ``synthetic`` or the
    volume is marked synthetic (``volume.metadata["synthetic"]``: ``synthetic=False``
    cannot unmark a generated volume), else ``"ctflow"``. Refuses to replace an
    existing file unless ``overwrite``.
    """
    path = Path(path)
    if not is_nifti_path(path):
        raise CTFlowError(f"cannot write {path} as NIfTI: the name must end in .nii or .nii.gz")
    synthetic = bool(synthetic) or volume.synthetic
    data = _disk_array(volume)
    affine = np.asarray(volume.affine, dtype=np.float64) @ _DISK_PERMUTATION
    if not np.all(np.isfinite(affine)):
        raise CTFlowError("the volume's affine has NaN/inf entries; fix it before writing")

    img = nib.Nifti1Image(data, affine)
    header = img.header
    header.set_data_dtype(data.dtype)
    header.set_xyzt_units(xyz="mm", t="sec")
    header.set_dim_info(slice=2)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    header["descrip"] = SYNTHETIC_DESCRIP if synthetic else "ctflow"
    header.set_slope_inter(1.0, 0.0)
    header["cal_min"], header["cal_max"] = 0, 0
    with atomic_path(path, overwrite) as tmp:
        nib.save(img, tmp)
    return path
