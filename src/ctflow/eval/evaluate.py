"""``ctflow evaluate``: score a folder of generated volumes against a real (phantom) data set.

::

    evaluate(real_dir, fake_dir, out_dir, overwrite=False) -> dict

* ``real_dir`` - a data set in the CT-RATE layout (``ctflow phantoms`` output);
  every split found under ``radiology_text_reports/`` is used.
* ``fake_dir`` - generated ``*.nii.gz`` / ``*.nii`` files, each with a JSON
  sidecar ``<stem>.json`` holding at least ``"report"`` (``ctflow generate``
  writes it, with ``requested_slices`` and ``num_slices``).
* ``out_dir`` - receives ``results.json`` and ``report.md`` (written atomically;
  existing files are refused unless ``overwrite``).

Computed: FID on three planes, FVD, CLIP score of the generated volumes against
the text they were generated from (sidecar ``conditioning_text``: the prompt with its
meta line, formatted as the real reports are; the prompt when absent), and of the
real volumes against their reports as a reference,
attribute accuracy (the phantom attribute reader on each generated volume vs the
findings its prompt asks for), slice-count accuracy (within one chunk of the
requested count: sidecar ``requested_slices`` or the prompt's ``Volume: N slices``
meta line; the chunk is the sidecar's ``chunk_slices``, 8 when it has none),
continuity (chunk seams, at the same chunk boundaries in the real volumes) and a
memorisation audit: against ``train_dir``, the model's training set, when given
(a held-out real set cannot hold a copy of a training volume), else the real set.
The FID's sample counts go into the results: under 128 slices a plane (the feature
width) the covariance is rank-deficient and the figure rough; so is the FVD under 128
volumes a side, which ``report.md`` says.

FID and FVD compare images resized to the feature networks' grids (64 x 64 slices, 32 x 64 x
64 volumes), whatever the spacing and field of view: a volume with a wider field of view or
another slice count is compared at the same grid size, so compare sets of like geometry.
What they detect and what they miss is measured by ``benchmarks/metric_sensitivity.py``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ctflow.errors import CTFlowError
from ctflow.files import check_output, write_text_atomic

CHUNK_SLICES = 8
REDUCED_SIZE = 64  # in-plane size volumes are kept at for the feature metrics
RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"


@dataclass
class _Item:
    """One volume kept in reduced form: (S, 64, 64) HU plus what was measured at full size."""

    name: str
    hu: np.ndarray  # (S, 64, 64) float32
    report: str
    num_slices: int
    attributes: dict | None = None
    continuity: float | None = None
    sidecar: dict = field(default_factory=dict)
    chunk: int = CHUNK_SLICES  # the generating model's chunk (sidecar chunk_slices)

    @property
    def conditioning_text(self) -> str:
        """The report as the model read it (sidecar conditioning_text: with its meta line, as a real
        volume's report is formatted), else the report; the CLIP score compares like with like."""
        text = self.sidecar.get("conditioning_text")
        return text if isinstance(text, str) and text.strip() else self.report


def _reduce(hu: np.ndarray) -> np.ndarray:
    """(S, H, W) -> (S, 64, 64) by antialiased bilinear resizing (unchanged when already 64)."""
    if hu.shape[1:] == (REDUCED_SIZE, REDUCED_SIZE):
        return np.ascontiguousarray(hu, dtype=np.float32)
    x = torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32))[:, None]
    x = F.interpolate(
        x, size=(REDUCED_SIZE, REDUCED_SIZE), mode="bilinear", antialias=True, align_corners=False
    )
    return x[:, 0].numpy()


def _read_attributes(volume) -> dict:
    from ctflow.eval.attributes import read_attributes

    return read_attributes(volume)


# ----------------------------------------------------------------------------- loading


def _splits(root: Path, option: str = "") -> list[str]:
    from ctflow.data.ctrate import tables_folder

    reports = tables_folder(root) / "radiology_text_reports"
    if not reports.is_dir():
        raise CTFlowError(
            f"{option + ' ' if option else ''}{root} is not a data set in the CT-RATE layout (no"
            " radiology_text_reports/ folder); make one with `ctflow phantoms`"
        )
    splits = sorted(p.name[: -len("_reports.csv")] for p in reports.glob("*_reports.csv"))
    if not splits:
        raise CTFlowError(f"{reports} holds no <split>_reports.csv file")
    return splits


def check_data_set(folder: str | Path, option: str) -> Path:
    """``folder`` as a CT-RATE-layout data set with at least one split, or a one-line error naming the
    option it came from."""
    root = Path(folder)
    if not root.is_dir():
        raise CTFlowError(f"{option} data set {root} not found; pass a folder `ctflow phantoms` wrote")
    _splits(root, option)
    return root


def load_real(
    real_dir: str | Path,
    log=None,
    chunk: int = CHUNK_SLICES,
    measure: bool = True,
    option: str = "--real",
    skipped: list | None = None,
) -> list[_Item]:
    """Every readable volume of the real data set (all splits), reduced, with its report; ``measure``:
    with its attributes and its continuity at ``chunk``-slice boundaries too. Each volume it cannot
    read is named to ``log`` and appended to ``skipped``."""
    from ctflow.data.ctrate import CTRateDataset
    from ctflow.eval.metrics import continuity

    root = check_data_set(real_dir, option)
    items = []
    splits = _splits(root)
    for split in splits:
        ds = CTRateDataset.open(root, split)
        for sample in ds:
            hu = sample.volume.hu()
            items.append(
                _Item(
                    name=sample.name,
                    hu=_reduce(hu),
                    report=sample.report,
                    num_slices=sample.volume.num_slices,
                    attributes=_read_attributes(sample.volume) if measure else None,
                    continuity=continuity(hu, chunk)["ratio"] if measure else None,
                    chunk=chunk,
                )
            )
        for problem in ds.problems:
            if log is not None:
                log(f"{option} {split}: skipped {problem}")
            if skipped is not None:
                skipped.append(f"{split}: {problem}")
    if not items:
        raise CTFlowError(f"no readable volumes in {option} {root}")
    if len(splits) > 1 and log is not None:  # e.g. a whole CT-RATE download: its train split too
        log(f"{option} {root}: {len(items)} volumes from every split ({', '.join(splits)}), pooled")
    return items


def _stem(path: Path) -> str:
    name = path.name  # upper-case names too (`ctflow generate --out CT.NII.GZ` writes CT.json beside it)
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else name[: -len(".nii")]


def fake_paths(fake_dir: str | Path, log=None) -> list[Path]:
    """The generated NIfTI files of ``fake_dir``, refusing names that cannot be read or paired with one
    sidecar; ``log`` hears about the folders it does not read (DICOM series)."""
    root = Path(fake_dir)
    if root.is_file():
        raise CTFlowError(f"--fake {root} is a file; pass the folder of generated volumes and sidecars")
    if not root.is_dir():
        raise CTFlowError(f"generated-volume folder {root} not found")
    entries = sorted(root.iterdir())
    # hidden files are not volumes: a run killed mid-write leaves `.NAME.XXXX.tmp.nii.gz`, macOS `._NAME`
    hidden = [p.name for p in entries if p.name.startswith(".")]
    entries = [p for p in entries if not p.name.startswith(".")]
    if hidden and log is not None:
        log(f"{root}: not reading {len(hidden)} hidden file(s) ({', '.join(hidden[:3])})")
    paths = [p for p in entries if p.name.lower().endswith((".nii.gz", ".nii"))]
    for p in paths:
        if not p.is_file():
            raise CTFlowError(
                f"{p} is not a readable file (a folder or a broken link); remove it from --fake"
            )
    stems = [_stem(p) for p in paths]
    if dup := sorted({s for s in stems if stems.count(s) > 1}):
        raise CTFlowError(
            f"{root} holds {dup[0]}.nii and {dup[0]}.nii.gz, which share one sidecar; keep one of them"
        )
    folders = [p.name for p in entries if p.is_dir()]
    if not paths:
        from ctflow.data.ctrate import tables_folder

        if (tables_folder(root) / "radiology_text_reports").is_dir():
            raise CTFlowError(
                f"--fake {root} is a data set in the CT-RATE layout, not generated volumes; pass it as --real"
                " (or --train), and --fake the folder `ctflow generate --prompts` wrote"
            )
        dicom = " (DICOM files or series folders are not read: `ctflow generate` writes a NIfTI beside each)"
        found = dicom if folders or any(p.suffix.lower() == ".dcm" for p in entries) else ""
        raise CTFlowError(f"{root} holds no generated volumes (*.nii.gz / *.nii){found}")
    if folders and log is not None:
        log(f"{root}: not reading {len(folders)} folder(s) ({', '.join(folders[:3])}), only the NIfTI files")
    return paths


def load_fake(fake_dir: str | Path, log=None) -> list[_Item]:
    """Every generated NIfTI in ``fake_dir`` with its sidecar; refuses a volume without one."""
    from ctflow.data.nifti import read_nifti
    from ctflow.eval.metrics import continuity

    paths = fake_paths(fake_dir, log)
    items = []
    for path in paths:
        stem = _stem(path)
        side = path.with_name(stem + ".json")
        if not side.is_file():
            raise CTFlowError(
                f"{path.name} has no sidecar {side.name}; each generated volume needs one with its 'report'"
            )
        try:
            meta = json.loads(side.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CTFlowError(f"cannot read sidecar {side}: {e}") from None
        report = meta.get("report") if isinstance(meta, dict) else None
        if not isinstance(report, str) or not report.strip():
            raise CTFlowError(f"sidecar {side.name} has no 'report' text")
        chunk = meta.get("chunk_slices", CHUNK_SLICES)
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 2:
            raise CTFlowError(
                f"sidecar {side.name}: chunk_slices must be a whole number of at least 2, got {chunk!r}"
            )
        vol = read_nifti(path)
        hu = vol.hu()
        items.append(
            _Item(
                name=stem,
                hu=_reduce(hu),
                report=report,
                num_slices=vol.num_slices,
                attributes=_read_attributes(vol),
                continuity=continuity(hu, chunk)["ratio"],
                sidecar=meta,
                chunk=chunk,
            )
        )
    return items


# ----------------------------------------------------------------------------- scoring


def requested_slices(item: _Item) -> int | None:
    """The slice count the prompt asked for: sidecar ``requested_slices``, else the report's meta line."""
    from ctflow.models.text import parse_meta

    req = item.sidecar.get("requested_slices")
    if isinstance(req, int | float) and not isinstance(req, bool) and math.isfinite(req) and req > 0:
        return int(req)
    return parse_meta(item.report)[0]


def _finite(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def score(real: list[_Item], fake: list[_Item], train: list[_Item] | None = None) -> dict:
    """All metrics for loaded sets (see the module docstring); the memorisation audit is against
    ``train`` when given, else ``real``."""
    from ctflow.eval.attributes import ATTRIBUTE_KEYS, attribute_accuracy, attributes_from_report
    from ctflow.eval.features import load_features, plane_indices
    from ctflow.eval.metrics import FID_SLICES, clip_score, fid_planes, fvd, memorization
    from ctflow.models.text import clean_report

    model = load_features()
    rv, fv = [i.hu for i in real], [i.hu for i in fake]
    results: dict = {"n_real": len(real), "n_generated": len(fake)}
    results["fid"] = fid_planes(rv, fv, model=model)
    results["fid_mean"] = float(np.mean(list(results["fid"].values())))
    # distinct slices in the plane with fewest (a short volume's axial slices repeat to make up FID_SLICES)
    results["fid_slices"] = {
        side: sum(min(len(plane_indices(n, FID_SLICES)) for n in i.hu.shape) for i in items)
        for side, items in (("real", real), ("generated", fake))
    }
    results["fvd"] = fvd(rv, fv, model=model) if len(real) >= 2 and len(fake) >= 2 else None
    results["clip_score"] = {
        "generated": clip_score(fv, [i.conditioning_text for i in fake], model=model),
        "real": clip_score(rv, [i.conditioning_text for i in real], model=model),
    }
    # the reports as the model read them (clean_report: a line break read as it was then)
    targets = [attributes_from_report(clean_report(i.report)) for i in fake]

    def scored(item: _Item) -> dict:
        # a volume the reader finds no lungs in shows neither its report's findings nor their absence:
        # wrong on every attribute (a blank volume was 100% right under a normal report)
        return item.attributes if item.attributes.get("has_lungs", True) else dict.fromkeys(ATTRIBUTE_KEYS)

    acc = attribute_accuracy([scored(i) for i in fake], targets)
    real_acc = attribute_accuracy([scored(i) for i in real], [attributes_from_report(i.report) for i in real])
    results["no_lungs"] = {
        side: [i.name for i in items if not i.attributes.get("has_lungs", True)]
        for side, items in (("generated", fake), ("real", real))
    }
    results["attribute_accuracy"] = {
        "generated": acc,
        "generated_mean": float(np.mean([acc[k] for k in ATTRIBUTE_KEYS])),
        "real": real_acc,
        "real_mean": float(np.mean([real_acc[k] for k in ATTRIBUTE_KEYS])),
    }
    # (slices off, the model's chunk) for every generated volume whose prompt asked for a count
    misses = [(abs(i.num_slices - req), i.chunk) for i in fake if (req := requested_slices(i)) is not None]

    def share(values) -> float | None:
        return float(np.mean(values)) if misses else None

    results["slice_count"] = {
        "n": len(misses),
        "within_chunk": share([off <= chunk for off, chunk in misses]),
        "mean_abs_error": share([off for off, _ in misses]),
        # one tolerance for every model, for tables that compare models of different chunk sizes
        f"within_{CHUNK_SLICES}_slices": share([off <= CHUNK_SLICES for off, _ in misses]),
    }
    results["continuity"] = {
        "generated": _mean(i.continuity for i in fake),
        "real": _mean(i.continuity for i in real),
        "chunk": _chunk_of(fake),
    }
    against = train if train is not None else real
    mem = memorization(fv, [i.hu for i in against], model=model)
    results["memorization"] = {
        k: mem[k]
        for k in (
            "threshold",
            "max_correlation",
            "mean_correlation",
            "max_cosine",
            "fraction_flagged",
            "flagged",
        )
    }
    results["memorization"]["against"] = "train" if train is not None else "real"
    results["memorization"]["flagged"] = [
        {"generated": fake[i].name, "nearest": against[mem["nearest_correlation_index"][i]].name,
         "correlation": mem["nearest_correlation"][i]}
        for i in mem["flagged"]
    ]  # fmt: skip
    results["per_volume"] = [
        {
            "name": item.name,
            "num_slices": item.num_slices,
            "requested_slices": requested_slices(item),
            "continuity": _finite(item.continuity),
            "attributes": {k: item.attributes[k] for k in ATTRIBUTE_KEYS},
            "has_lungs": bool(item.attributes.get("has_lungs", True)),
            "prompt_attributes": targets[n],
            "nearest": against[mem["nearest_correlation_index"][n]].name,
            "nearest_correlation": mem["nearest_correlation"][n],
        }
        for n, item in enumerate(fake)
    ]
    return results


def _chunk_of(items: list[_Item]) -> int:
    """The chunk size most of the generated volumes were made with (on a tie, the smallest)."""
    chunks = [i.chunk for i in items]
    return max(sorted(set(chunks)), key=chunks.count) if chunks else CHUNK_SLICES


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown_report(results: dict) -> str:
    """The Markdown summary table written to ``report.md``."""
    from ctflow.eval.attributes import ATTRIBUTE_KEYS
    from ctflow.eval.features import FEATURE_DIM

    fid = results["fid"]
    att = results["attribute_accuracy"]
    fewest = min(results["fid_slices"].values())
    fid_note = "lower is better" + (
        f"; rough: {fewest} slices a plane, fewer than the {FEATURE_DIM} features"
        if fewest < FEATURE_DIM
        else ""
    )
    fewest_volumes = min(results["n_real"], results["n_generated"])
    fvd_note = (
        "needs 2 volumes on each side"
        if results["fvd"] is None
        else "lower is better"
        + (
            f"; rough: {fewest_volumes} volumes a side, fewer than the {FEATURE_DIM} features"
            if fewest_volumes < FEATURE_DIM
            else ""
        )
    )
    mem = results["memorization"]
    against = (
        "the training set"
        if mem["against"] == "train"
        else "the real set (pass --train for the training set)"
    )
    rows = [
        ("FID axial", fid["axial"], fid_note),
        ("FID coronal", fid["coronal"], fid_note),
        ("FID sagittal", fid["sagittal"], fid_note),
        ("FVD", results["fvd"], fvd_note),
        ("CLIP score (generated vs prompt)", results["clip_score"]["generated"], "higher is better, 0-100"),
        ("CLIP score (real vs report)", results["clip_score"]["real"], "reference"),
        ("Attribute accuracy (mean)", att["generated_mean"], f"reader on real data: {_fmt(att['real_mean'])}"),
        *[(f"Attribute: {k}", att["generated"][k], f"real: {_fmt(att['real'][k])}") for k in ATTRIBUTE_KEYS],
        (f"Slice count within one chunk ({results['continuity']['chunk']})", results["slice_count"]["within_chunk"], f"{results['slice_count']['n']} with a request"),
        ("Continuity (chunk seams)", results["continuity"]["generated"], f"~1 is seamless; real: {_fmt(results['continuity']['real'])}"),
        ("Memorisation: flagged fraction", mem["fraction_flagged"], f"detail correlation >= {mem['threshold']}, against {against}"),
        ("Memorisation: max correlation", mem["max_correlation"], "nearest volume"),
    ]  # fmt: skip
    lines = [
        "# ctflow evaluation",
        "",
        f"{results['n_generated']} generated volume(s) from `{results.get('fake_dir', '?')}` against "
        f"{results['n_real']} real volume(s) from `{results.get('real_dir', '?')}`.",
        "",
        "| Metric | Value | Note |",
        "|---|---:|---|",
        *[f"| {name} | {_fmt(value)} | {note} |" for name, value, note in rows],
        "",
    ]
    for side, names in results.get("no_lungs", {}).items():
        if names:
            lines += [
                f"{len(names)} {side} volume(s) without recognisable lungs, counted wrong on every attribute:"
                f" {', '.join(f'`{n}`' for n in names[:5])}{' and more' if len(names) > 5 else ''}.",
                "",
            ]
    flagged = mem["flagged"]
    if flagged:
        lines += [f"Possible copies of volumes of {against.split(' (')[0]}:", ""]
        lines += [
            f"- `{f['generated']}` ~ `{f['nearest']}` (correlation {f['correlation']:.3f})" for f in flagged
        ]
        lines.append("")
    return "\n".join(lines)


def evaluate(real_dir, fake_dir, out_dir, overwrite: bool = False, log=None, train_dir=None) -> dict:
    """Score ``fake_dir`` against ``real_dir``; write ``results.json`` and ``report.md`` into ``out_dir``.
    ``train_dir``: the model's training set, for the memorisation audit (else it uses ``real_dir``)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CTFlowError(f"output {out} exists and is not a folder")
    for name in (RESULTS_FILE, REPORT_FILE):
        check_output(out / name, overwrite)  # refuse before any work is done
    fake_paths(fake_dir)  # every input checked before the slow loading starts
    check_data_set(real_dir, "--real")
    if train_dir is not None:
        check_data_set(train_dir, "--train")
    start = time.perf_counter()
    fake = load_fake(fake_dir, log=log)
    skipped: dict[str, list] = {"real": [], "train": []}
    real = load_real(real_dir, log=log, chunk=_chunk_of(fake), skipped=skipped["real"])
    train = (
        load_real(train_dir, log=log, measure=False, option="--train", skipped=skipped["train"])
        if train_dir is not None
        else None
    )
    results = {
        "real_dir": str(real_dir),
        "fake_dir": str(fake_dir),
        **({"train_dir": str(train_dir)} if train_dir is not None else {}),
        **score(real, fake, train),
        # volumes of the data sets that could not be read, each with why
        "skipped": {k: v for k, v in skipped.items() if v},
    }
    results["seconds"] = round(time.perf_counter() - start, 2)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / RESULTS_FILE, json.dumps(results, indent=1) + "\n", overwrite=overwrite)
    write_text_atomic(out / REPORT_FILE, markdown_report(results), overwrite=overwrite)
    return results


def evaluate_command(real, fake, out, overwrite: bool = False, log=print, train=None, show=None) -> dict:
    """CLI entry (``ctflow evaluate --real --fake --out [--train] [--overwrite]``): run, ``show`` the
    table (default: ``log``; the CLI prints it on stdout, its notes on stderr), return results."""
    results = evaluate(real, fake, out, overwrite=overwrite, log=log, train_dir=train)
    (show or log)(markdown_report(results))
    log(f"wrote {Path(out) / RESULTS_FILE} and {Path(out) / REPORT_FILE}")
    return results
