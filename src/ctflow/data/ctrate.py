"""Read (and write) data sets in the layout of the public CT-RATE release.

::

    ROOT/dataset/<split>/<patient>/<study>/<volume>.nii.gz      e.g. train/train_1/train_1_a/train_1_a_1.nii.gz
    ROOT/radiology_text_reports/<split>_reports.csv              VolumeName, ClinicalInformation_EN, Technique_EN,
                                                                 Findings_EN, Impressions_EN
    ROOT/metadata/<split>_metadata.csv                           VolumeName, XYSpacing, ZSpacing, RescaleSlope,
                                                                 RescaleIntercept, ...
    ROOT/multi_abnormality_labels/<split>_predicted_labels.csv   VolumeName + 18 binary labels (optional)

That is what ``ctflow phantoms`` writes. The download from the CT-RATE repository keeps all four folders
under ``ROOT/dataset/``, holds volumes in ``<split>_fixed/`` (header-corrected; read before
``<split>/`` where both exist), and names the validation split's tables ``validation_reports.csv`` and
``validation_metadata.csv`` but ``valid_predicted_labels.csv`` and its volumes ``valid_*``: the reader
takes either layout and either name (``split="valid"`` or ``"validation"``).

CT-RATE stores raw scanner values: HU = raw * RescaleSlope + RescaleIntercept
from the metadata CSV (unless the NIfTI header scales them itself: then its
scl_slope/scl_inter, already applied on reading, win), and the metadata's
spacing is authoritative. One reader serves CT-RATE and the phantoms. Rows that
are missing or malformed are reported by volume name (``dataset.problems``) and
skipped, never crashed on mid-epoch.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ctflow.data.labels import CTRATE_LABELS
from ctflow.data.volume import Volume
from ctflow.errors import CTFlowError
from ctflow.files import atomic_path
from ctflow.models.text import format_report

REPORT_COLUMNS = ("VolumeName", "Findings_EN", "Impressions_EN")
METADATA_COLUMNS = ("VolumeName", "XYSpacing", "ZSpacing", "RescaleSlope", "RescaleIntercept")
NAME_PATTERN = re.compile(r"^(?P<split>[a-z]+)_(?P<patient>\d+)_(?P<study>[a-z]+)_(?P<rec>\d+)\.nii(\.gz)?$")


def volume_relpath(name: str) -> Path:
    """``train_1_a_1.nii.gz`` -> ``dataset/train/train_1/train_1_a/train_1_a_1.nii.gz``."""
    m = NAME_PATTERN.match(name)
    if not m:
        raise CTFlowError(f"volume name {name!r} is not in CT-RATE form <split>_<patient>_<study>_<n>.nii.gz")
    patient = f"{m['split']}_{m['patient']}"
    return Path("dataset", m["split"], patient, f"{patient}_{m['study']}", name)


# the names each split's tables go by in the CT-RATE download (validation_reports.csv, but
# valid_predicted_labels.csv and valid_* volumes)
SPLIT_NAMES = {"valid": ("valid", "validation"), "validation": ("validation", "valid")}


def tables_folder(root: Path) -> Path:
    """Where a data set's CSV folders are: ``ROOT`` (``ctflow phantoms``) or ``ROOT/dataset`` (the
    CT-RATE download)."""
    nested = root / "dataset"
    if not (root / "radiology_text_reports").is_dir() and (nested / "radiology_text_reports").is_dir():
        return nested
    return root


def table_path(folder: Path, split: str, stem: str) -> Path:
    """``folder/<split>_<stem>.csv`` under whichever name of the split exists (the first if none)."""
    paths = [folder / f"{name}_{stem}.csv" for name in SPLIT_NAMES.get(split, (split,))]
    return next((p for p in paths if p.is_file()), paths[0])


def volume_folders(root: Path, split: str) -> list[Path]:
    """The folders that may hold a split's patient folders, in the order they are searched."""
    return [base / name for base in (root / "dataset", root) for name in (f"{split}_fixed", split)]


def read_csv(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    """Rows of a CSV as dicts; refuse a missing file or missing required columns."""
    if not path.is_file():
        raise CTFlowError(f"{path} not found; expected the CT-RATE layout (see `ctflow phantoms --help`)")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as e:
        raise CTFlowError(f"cannot parse {path} as CSV: {e}") from None
    missing = [c for c in required if c not in columns]
    if missing:
        raise CTFlowError(
            f"{path.name} lacks column(s) {', '.join(missing)}; CT-RATE CSVs need {', '.join(required)}"
        )
    return rows


def _parse_xy(value: str) -> float:
    """The metadata's in-plane spacing (``[0.75, 0.75]``, ``(0.75, 0.75)`` or ``0.75``) in mm."""
    try:
        v = ast.literal_eval(value.strip()) if value.strip().startswith(("[", "(")) else float(value)
        pair = [float(x) for x in v] if isinstance(v, list | tuple) else [float(v)] * 2
    except (ValueError, SyntaxError, TypeError):
        pair = []
    if len(pair) != 2 or not all(np.isfinite(x) and x > 0 for x in pair):
        raise ValueError(f"metadata XYSpacing {value!r} is not two positive mm values like [0.75, 0.75]")
    if not np.isclose(pair[0], pair[1], rtol=1e-3):
        raise ValueError(f"metadata XYSpacing {value!r} is not square; ctflow reads square pixels only")
    return pair[0]


def _metadata_number(meta: dict, key: str) -> float:
    """A finite number from a metadata row; an empty cell is refused, not read as 0 (an empty
    RescaleIntercept would leave raw values 1024 above HU)."""
    raw = (meta.get(key) or "").strip()
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not np.isfinite(value):
        raise ValueError(f"metadata {key} {raw!r} is not a number; fill it in the metadata CSV")
    return value


@dataclass
class CTRateRecord:
    name: str
    path: Path
    findings: str
    impressions: str
    clinical: str = ""
    technique: str = ""
    xy_spacing: float = 1.0
    z_spacing: float = 1.0
    slope: float = 1.0
    intercept: float = 0.0
    labels: dict[str, int] | None = None


@dataclass
class CTRateSample:
    name: str
    volume: Volume
    report: str  # the conditioning text: meta line + Findings + Impressions
    record: CTRateRecord
    labels: dict[str, int] | None = None
    # slice extents of localized findings, where the data set has them (``ctflow phantoms`` writes its
    # ground truth beside each volume): [{"type", "first", "last"}]; None for CT-RATE itself
    finding_slices: list[dict] | None = None


@dataclass
class CTRateDataset:
    """Index of one split; ``problems`` lists every skipped row with the reason."""

    root: Path
    split: str = "train"
    records: list[CTRateRecord] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    _volume_folder: dict[str, list[Path]] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, root: str | Path, split: str = "train", check_files: bool = True) -> CTRateDataset:
        root = Path(root)
        if not root.is_dir():
            raise CTFlowError(f"data set folder {root} not found")
        ds = cls(root=root, split=split)
        tables = tables_folder(root)
        reports = read_csv(table_path(tables / "radiology_text_reports", split, "reports"), REPORT_COLUMNS)
        meta: dict[str, dict] = {}
        conflicting = set()  # metadata rows of one volume that disagree: which is right is unknown
        for r in read_csv(table_path(tables / "metadata", split, "metadata"), METADATA_COLUMNS):
            name = (r.get("VolumeName") or "").strip()
            if name in meta and meta[name] != r:
                conflicting.add(name)
            meta.setdefault(name, r)
        counts: dict[str, int] = {}
        for row in reports:
            name = (row.get("VolumeName") or "").strip()
            counts[name] = counts.get(name, 0) + 1
        label_path = table_path(tables / "multi_abnormality_labels", split, "predicted_labels")
        labels = (
            {r["VolumeName"]: r for r in read_csv(label_path, ("VolumeName",))}
            if label_path.exists()
            else None
        )
        for row in reports:
            name = (row.get("VolumeName") or "").strip()
            if name and counts[name] > 1:  # one volume, several reports: which one it has is unknown
                problem = f"{name}: {counts[name]} rows in the reports CSV; keep the one that describes it"
                if problem not in ds.problems:
                    ds.problems.append(problem)
                continue
            if name in conflicting:
                ds.problems.append(f"{name}: rows in the metadata CSV that disagree; keep the right one")
                continue
            try:
                ds.records.append(ds._record(row, name, meta.get(name), labels, check_files))
            except (CTFlowError, ValueError, SyntaxError) as e:
                ds.problems.append(f"{name or '<no VolumeName>'}: {e}")
        if check_files:  # a volume on disk that no report describes is skipped too: say so
            for name in sorted(set(ds.volumes_on_disk()) - set(counts)):
                ds.problems.append(f"{name}: no row in the reports CSV (the volume is skipped)")
        return ds

    def volumes_on_disk(self) -> list[str]:
        """The names of the split's volume files on disk (in any of :func:`volume_folders`)."""
        names = set()
        for split in SPLIT_NAMES.get(self.split, (self.split,)):
            for folder in volume_folders(self.root, split):
                if folder.is_dir():
                    names.update(p.name for p in folder.glob("*/*/*.nii*") if NAME_PATTERN.match(p.name))
        return sorted(names)

    def _record(self, row, name, meta, labels, check_files) -> CTRateRecord:
        if not name:
            raise ValueError("empty VolumeName")
        findings = (row.get("Findings_EN") or "").strip()
        impressions = (row.get("Impressions_EN") or "").strip()
        if not findings and not impressions:
            raise ValueError("empty Findings_EN and Impressions_EN")
        if meta is None:
            raise ValueError("no row in the metadata CSV")
        path = self.volume_path(name)
        if check_files and not path.is_file():
            raise ValueError(f"volume file {path} missing")
        z = _metadata_number(meta, "ZSpacing")
        if z <= 0:
            raise ValueError(f"metadata ZSpacing {meta['ZSpacing']!r} is not a positive spacing in mm")
        slope = _metadata_number(meta, "RescaleSlope")
        if slope == 0:
            raise ValueError("metadata RescaleSlope is 0, which maps every voxel to one value")
        rec = CTRateRecord(
            name=name,
            path=path,
            findings=findings,
            impressions=impressions,
            clinical=(row.get("ClinicalInformation_EN") or "").strip(),
            technique=(row.get("Technique_EN") or "").strip(),
            xy_spacing=_parse_xy(meta["XYSpacing"]),
            z_spacing=z,
            slope=slope,
            intercept=_metadata_number(meta, "RescaleIntercept"),
        )
        if labels is not None:
            lab = labels.get(name)
            if lab is None:
                raise ValueError("no row in the labels CSV")
            rec.labels = {k: int(float(lab[k])) for k in CTRATE_LABELS if k in lab and lab[k] != ""}
        return rec

    def volume_path(self, name: str) -> Path:
        """Where volume ``name`` is: under the first of :func:`volume_folders` that holds it (where
        none does, under the first that exists)."""
        relpath = volume_relpath(name)  # dataset/<split>/<patient>/<study>/<name>
        split = relpath.parts[1]
        if split not in self._volume_folder:
            self._volume_folder[split] = [f for f in volume_folders(self.root, split) if f.is_dir()] or [
                self.root / "dataset" / split
            ]
        paths = [folder.joinpath(*relpath.parts[2:]) for folder in self._volume_folder[split]]
        return next((p for p in paths if p.is_file()), paths[0])

    def __len__(self) -> int:
        return len(self.records)

    def load(self, i: int) -> CTRateSample:
        """Read one volume in HU (metadata rescale and spacing applied) with its report."""
        from ctflow.data.nifti import read_nifti

        rec = self.records[i]
        vol = read_nifti(rec.path)
        hu = vol.array.astype(np.float32)
        if vol.metadata.get("header_scaling") is None:  # else the header's own scaling made them HU
            hu = hu * rec.slope + rec.intercept
        spacing = (rec.z_spacing, rec.xy_spacing, rec.xy_spacing)
        affine = vol.affine.copy()
        for axis, sp in enumerate(spacing):  # metadata spacing is authoritative
            norm = np.linalg.norm(affine[:3, axis])
            affine[:3, axis] *= sp / norm if norm > 0 else 0.0
        # the file's synthetic mark (phantoms) goes with the volume, so a copy written out keeps it
        meta = {"source": str(rec.path), "name": rec.name, "synthetic": vol.synthetic}
        volume = Volume(hu, spacing, affine, meta)
        report = format_report(rec.findings, rec.impressions, volume.num_slices, rec.z_spacing)
        return CTRateSample(rec.name, volume, report, rec, rec.labels, _finding_slices(rec.path))

    def finding_mask(self, i: int) -> np.ndarray | None:
        """Volume ``i``'s finding voxels, a boolean map shaped like its HU array
        (:func:`ctflow.data.phantom.finding_mask`), from the phantom ground truth beside it; None when
        the data set has none (CT-RATE itself)."""
        from ctflow.data.phantom import finding_mask

        truth = _phantom_truth(self.records[i].path)
        if truth is None:
            return None
        try:
            return finding_mask(truth)
        except (CTFlowError, KeyError, TypeError, ValueError) as e:
            raise CTFlowError(
                f"{sidecar_path(self.records[i].path)} does not render its phantom ({e}); regenerate the data set"
            ) from None

    def __iter__(self) -> Iterator[CTRateSample]:
        """Every readable sample; unreadable volumes are added to ``problems`` and skipped."""
        for i in range(len(self)):
            try:
                yield self.load(i)
            except CTFlowError as e:
                self.problems.append(f"{self.records[i].name}: {e}")


def sidecar_path(volume_path: Path) -> Path:
    """The JSON beside a volume (``<volume>.json``): where ``CTRateWriter.add`` puts its ``extra``, such as a
    phantom's ground truth."""
    return volume_path.with_name(re.sub(r"\.nii(\.gz)?$", ".json", volume_path.name))


def _phantom_truth(path: Path) -> dict | None:
    """The phantom ground truth beside a volume, if any."""
    sidecar = sidecar_path(path)
    if not sidecar.exists():
        return None
    try:
        truth = json.loads(sidecar.read_text())
    except ValueError as e:
        raise CTFlowError(
            f"{sidecar} is not a readable phantom ground truth ({e!r}); regenerate the data set or delete the file"
        ) from None
    return truth if isinstance(truth, dict) and "findings" in truth else None


def _finding_slices(path: Path) -> list[dict] | None:
    """Finding extents from the phantom ground truth beside a volume, if any."""
    from ctflow.data.phantom import finding_extents

    truth = _phantom_truth(path)
    try:
        return None if truth is None else finding_extents(truth)
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise CTFlowError(
            f"{sidecar_path(path)} is not a readable phantom ground truth ({e!r}); regenerate the data set or"
            " delete the file"
        ) from None


def _csv_text(columns: list[str], rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


class CTRateWriter:
    """Write volumes + reports + metadata + labels in the CT-RATE layout.

    Volumes are stored directly in HU (int16), so any viewer shows them right;
    the metadata says so with RescaleSlope 1 / RescaleIntercept 0. (Real CT-RATE
    files hold raw values with intercept -1024; the reader handles both.) The
    CSVs are written atomically by :meth:`close`.
    """

    def __init__(self, root: str | Path, split: str = "train", overwrite: bool = False):
        self.root, self.split, self.overwrite = Path(root), split, overwrite
        self.reports: list[dict] = []
        self.metadata: list[dict] = []
        self.labels: list[dict] = []

    def add(
        self,
        index: int,
        volume: Volume,
        report: dict[str, str],
        labels: dict[str, int],
        extra: dict | None = None,
    ):
        from ctflow.data.nifti import write_nifti

        name = f"{self.split}_{index + 1}_a_1.nii.gz"
        path = self.root / volume_relpath(name)
        hu = np.clip(np.rint(volume.hu()), -32768, 32767).astype(np.int16)
        write_nifti(Volume(hu, volume.spacing, volume.affine, dict(volume.metadata)), path, self.overwrite)
        if extra is not None:
            with atomic_path(sidecar_path(path), self.overwrite) as tmp:
                tmp.write_text(json.dumps(extra, indent=1))
        self.reports.append({"VolumeName": name, **report})
        self.metadata.append(
            {
                "VolumeName": name,
                "XYSpacing": f"[{volume.spacing[1]:g}, {volume.spacing[2]:g}]",
                "ZSpacing": f"{volume.spacing[0]:g}",
                "RescaleSlope": 1,
                "RescaleIntercept": 0,
                "Rows": volume.shape[1],
                "Columns": volume.shape[2],
                "NumberofSlices": volume.shape[0],
            }
        )
        self.labels.append({"VolumeName": name, **{k: int(labels.get(k, 0)) for k in CTRATE_LABELS}})
        return path

    def close(self) -> None:
        report_cols = [
            "VolumeName",
            "ClinicalInformation_EN",
            "Technique_EN",
            "Findings_EN",
            "Impressions_EN",
        ]
        outputs = [
            ("radiology_text_reports", "reports", report_cols, self.reports),
            (
                "metadata",
                "metadata",
                list(self.metadata[0]) if self.metadata else list(METADATA_COLUMNS),
                self.metadata,
            ),
            ("multi_abnormality_labels", "predicted_labels", ["VolumeName", *CTRATE_LABELS], self.labels),
        ]
        for folder, stem, cols, rows in outputs:
            rows = [{c: r.get(c, "") for c in cols} for r in rows]
            path = self.root / folder / f"{self.split}_{stem}.csv"
            with atomic_path(path, self.overwrite) as tmp:
                tmp.write_text(_csv_text(cols, rows))
