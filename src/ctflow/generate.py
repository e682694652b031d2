"""Writing generated volumes to disk: NIfTI (+ DICOM), preview PNG and a JSON sidecar.

Used by ``ctflow generate``. A prompts CSV generates many volumes; finished
outputs are skipped (resumable) and, under ``accelerate launch`` or
``torchrun``, rows are split across processes by index (row i goes to
process i mod N): no duplicates, no gaps.
"""

from __future__ import annotations

import csv
import json
import os
import secrets
import shutil
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ctflow import __version__
from ctflow.errors import CTFlowError, warn
from ctflow.files import check_output, write_text_atomic
from ctflow.models.text import clean_report, parse_meta, strip_meta
from ctflow.pipeline import MAX_GUIDANCE, MAX_SLICES, report_problem


@dataclass
class GenerationSettings:
    num_slices: int | None = None
    max_slices: int | None = None
    steps: int = 20
    guidance: float = 2.0
    seed: int | None = None
    dicom: Path | None = None
    overwrite: bool = False
    finding_guidance: float | None = None  # None: the same as guidance
    dicom_is_series: bool = True  # False: --prompts' folder of one series folder per row

    def check(self) -> None:
        if self.num_slices is not None and not 1 <= self.num_slices <= MAX_SLICES:
            raise CTFlowError(f"--slices must be between 1 and {MAX_SLICES}, got {self.num_slices}")
        if self.max_slices is not None and not 1 <= self.max_slices <= MAX_SLICES:
            raise CTFlowError(f"--max-slices must be between 1 and {MAX_SLICES}, got {self.max_slices}")
        if self.steps < 1 or self.steps > 1000:
            raise CTFlowError(f"--steps must be between 1 and 1000, got {self.steps}")
        for option, scale in (("--guidance", self.guidance), ("--finding-guidance", self.finding_guidance)):
            if scale is not None and not 0 <= scale <= MAX_GUIDANCE:
                raise CTFlowError(f"{option} must be between 0 and {MAX_GUIDANCE}, got {scale}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise CTFlowError(f"--seed must be between 0 and 2**63 - 1, got {self.seed}")
        if self.dicom is not None:  # before generating, not after the NIfTI is written
            from ctflow.data.dicom import check_series_folder

            check_series_folder(self.dicom, replacing=self.overwrite and self.dicom_is_series)


def output_paths(out: Path) -> dict[str, Path]:
    """The files one generation writes, from its NIfTI path."""
    name, lower = out.name, out.name.lower()  # CT.NII.GZ too, as the readers take it
    if not (lower.endswith(".nii.gz") or lower.endswith(".nii")):
        raise CTFlowError(f"--out must be a .nii.gz or .nii path, got {out}")
    stem = name[: -len(".nii.gz")] if lower.endswith(".nii.gz") else name[: -len(".nii")]
    if not stem:
        raise CTFlowError(f"--out {out} has no name before its extension; give one, e.g. ct.nii.gz")
    return {"nifti": out, "preview": out.with_name(stem + ".png"), "sidecar": out.with_name(stem + ".json")}


def sidecar_files(files: dict[str, Path], dicom: Path | None) -> dict[str, str]:
    """The sidecar's record of the files: names beside the sidecar (they move with it, and a shared
    sidecar does not show the folders of the machine that wrote it); the DICOM series relative to
    the sidecar's folder."""
    here = files["sidecar"].parent
    named = {k: v.name for k, v in files.items()}
    return named | ({"dicom": Path(os.path.relpath(dicom, here)).as_posix()} if dicom else {})


def every_output(out: Path, dicom: Path | None) -> list[Path]:
    """Every path one generation writes: its files (:func:`output_paths`) and its DICOM series, which
    may not hold the files (writing the series replaces its folder) nor be one of them."""
    files = list(output_paths(out).values())
    if dicom:
        series = Path(os.path.abspath(dicom))
        for f in files:
            where = Path(os.path.abspath(f))
            if where == series or series in where.parents:
                raise CTFlowError(
                    f"--dicom {dicom} would hold {f}, another output of this generation (the series"
                    " replaces its folder); give the DICOM series a folder of its own"
                )
    return [*files, *([dicom] if dicom else [])]


def read_report_file(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Notepad) would hide the meta line
    except FileNotFoundError:
        raise CTFlowError(f"report file {path} not found") from None
    except UnicodeDecodeError:
        raise CTFlowError(f"report file {path} is not UTF-8 text; save it as UTF-8") from None
    except OSError as e:
        raise CTFlowError(f"cannot read report file {path}: {e}") from None
    if not text.strip():
        raise CTFlowError(f"report file {path} is empty")
    if "\x00" in text:  # UTF-16 without its byte-order mark reads as letters between NULs
        raise CTFlowError(f"report file {path} is not UTF-8 text (UTF-16?); save it as UTF-8")
    return text


def generate_one(
    pipe, report: str, out: Path, settings: GenerationSettings, progress=None, on_chunk=None
) -> dict:
    """Generate one volume and write its files; returns the sidecar dict."""
    return generate_batch(pipe, [report], [out], [settings], progress, on_chunk)[0]


def generate_batch(
    pipe,
    reports: list[str],
    outs: list[Path],
    settings: list[GenerationSettings],
    progress=None,
    on_chunk=None,
) -> list[dict]:
    """Generate one volume per report in one pipeline call, each with its own seed and slice count
    (the other settings shared), and write each one's files; returns the sidecars. Each volume is
    the one its seed gives alone, up to rounding (one generator per report). ``progress`` and
    ``on_chunk`` go to the pipeline as its ``callback`` and ``on_chunk``."""
    from ctflow.data.dicom import not_series, write_dicom_series
    from ctflow.data.nifti import write_nifti
    from ctflow.data.preview import write_preview

    first = settings[0]
    shared = ("max_slices", "steps", "guidance", "finding_guidance", "overwrite")
    if any(getattr(s, key) != getattr(first, key) for s in settings for key in shared):
        raise CTFlowError(f"volumes generated together must share {', '.join(shared)}")
    paths = [output_paths(out) for out in outs]
    for s, out in zip(settings, outs, strict=True):
        for p in every_output(out, s.dicom):
            check_output(p, s.overwrite)
    seeds = [s.seed if s.seed is not None else secrets.randbelow(2**31) for s in settings]
    start = time.perf_counter()
    result = pipe(
        reports,
        num_slices=[s.num_slices for s in settings],
        max_slices=first.max_slices,
        num_inference_steps=first.steps,
        guidance_scale=first.guidance,
        finding_guidance=first.finding_guidance,
        generator=[torch.Generator().manual_seed(seed) for seed in seeds],
        callback=progress,
        on_chunk=on_chunk,
    )
    seconds = time.perf_counter() - start
    sidecars = []
    for i, (report, s, files) in enumerate(zip(reports, settings, paths, strict=True)):
        volume, end = result.volumes[i], result.end_reasons[i]
        sidecar = {
            "report": report,
            "conditioning_text": result.reports[i],
            "seed": seeds[i],
            "steps": s.steps,
            "guidance": s.guidance,
            **({"finding_guidance": s.finding_guidance} if s.finding_guidance is not None else {}),
            "requested_slices": s.num_slices,
            "max_slices": s.max_slices,
            "num_slices": volume.num_slices,
            "spacing_mm": list(volume.spacing),
            "end_reason": end,
            "chunk_slices": pipe.chunk_slices,  # `ctflow evaluate` judges slice counts and seams by it
            # tokens of the conditioning text past the report encoder's limit: the model never read them
            "report_tokens_truncated": result.truncated_tokens[i],
            # what the CLI warned about: a slice count the model never trained on, a report cut short
            **({"warning": note} if (note := warnings_of(pipe, result, i)) else {}),
            **({"finding_flags": flags} if (flags := pipe.finding_flags(result.reports[i])) else {}),
            "model": pipe.name,
            "model_weights_sha256": pipe.weights_hash,
            "device": str(pipe.device),
            "dtype": str(pipe.dtype).removeprefix("torch."),
            "ctflow_version": __version__,
            "synthetic": True,
            "seconds": round(seconds, 3),
            **({"generated_with": len(reports)} if len(reports) > 1 else {}),  # volumes in the same call
            "files": sidecar_files(files, s.dicom),
        }
        try:  # all of a volume's files or none: a write that fails (or a stop) takes back the others
            write_nifti(volume, files["nifti"], overwrite=s.overwrite, synthetic=True)
            if s.dicom:
                write_dicom_series(volume, s.dicom, overwrite=s.overwrite)
            write_preview(volume, files["preview"], overwrite=s.overwrite)
            write_text_atomic(files["sidecar"], json.dumps(sidecar, indent=1), overwrite=s.overwrite)
        except BaseException:
            # every output file of the volume goes: the new ones, and (with --overwrite) old ones that
            # would describe a volume no longer there; a folder only if it holds a series alone (a
            # folder standing where a file goes is the user's). Without --overwrite none existed before.
            for path in every_output(files["nifti"], s.dicom):
                if path.is_file() or path.is_symlink():
                    path.unlink(missing_ok=True)
                elif path == s.dicom and path.is_dir() and not_series(path) is None:
                    shutil.rmtree(path, ignore_errors=True)
            raise
        sidecars.append(sidecar)
    return sidecars


def warnings_of(pipe, result, i: int) -> str | None:
    """The warnings generating volume ``i`` of ``result`` gave, as one line (None without any)."""
    text, cut = result.reports[i], result.truncated_tokens[i]
    notes = [pipe.untrained_count(text), pipe.text.truncation_note(text, cut) if cut else None]
    return "; ".join(n for n in notes if n) or None


def _repeated(items) -> list[str]:
    """The items that occur more than once, sorted."""
    return sorted(k for k, n in Counter(items).items() if n > 1)


def _lines(text):
    """A report with its line ends as "\\n" (a CSV saved on Windows keeps "\\r\\n" in a quoted cell)."""
    return text.replace("\r\n", "\n").replace("\r", "\n") if isinstance(text, str) else text


def _whole_cell(cell: str | None) -> int | None:
    """A CSV cell as a whole number ("96", or "96.0" as a spreadsheet writes it), None when empty;
    ValueError otherwise ("96.5", "eight")."""
    text = (cell or "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        number = float(text)  # ValueError for words
        if not number.is_integer() or abs(number) > 2**53:  # past 2**53 a float has lost the digits
            raise
        return int(number)


def read_prompts(path: Path) -> list[dict]:
    """Rows of a prompts CSV: a ``report`` column, optional ``name``, ``slices`` and ``seed``."""
    if not path.is_file():
        raise CTFlowError(f"prompts file {path} not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, strict=True)  # an unclosed quote is an error, not the rest of the file
            rows = [(reader.line_num, row) for row in reader]  # the file's line, blank lines counted
            header = reader.fieldnames or []
    except UnicodeDecodeError:
        raise CTFlowError(f"{path} is not UTF-8 text; save it as 'CSV UTF-8' (Excel) or convert it") from None
    except csv.Error as e:
        raise CTFlowError(f"cannot parse {path} as CSV: {e}") from None
    if any("\x00" in (c or "") for c in header):  # UTF-16 without its byte-order mark
        raise CTFlowError(f"{path} is not UTF-8 text (UTF-16?); save it as 'CSV UTF-8' (Excel) or convert it")
    # header names as people type them: "Report", "name, report" (a space after the comma)
    columns = [c.strip().lower() if c else c for c in header]
    rows = [(line, {(k.strip().lower() if k else k): v for k, v in row.items()}) for line, row in rows]
    if "report" not in columns:
        found = ", ".join(repr(c) for c in header[:5]) or "nothing"
        other = (
            " (columns separated by ';' or tabs? use commas)"
            if any(";" in c or "\t" in c for c in header if c)
            else ""
        )
        raise CTFlowError(
            f"{path} needs a 'report' column (optional: name, slices, seed); its header has {found}{other}"
        )
    if twice := _repeated(c for c in columns if c and c.strip()):  # Excel pads a header with empty cells
        raise CTFlowError(f"{path} has more than one {', '.join(map(repr, twice))} column; keep one of each")
    out = []
    for i, (line, row) in enumerate(rows):
        if None in row:  # more fields than the header names: a comma in an unquoted report
            raise CTFlowError(
                f"{path} line {line} has more fields than the header; put a report holding commas in quotes"
            )
        if not (row.get("report") or "").strip():
            raise CTFlowError(f"{path} line {line} has an empty report")
        name = (row.get("name") or "").strip() or f"{i:05d}"
        odd = "/" in name or "\\" in name or any(ord(c) < 32 or ord(c) == 127 for c in name)
        if odd or name.startswith(".") or len(name.encode()) > 200:
            raise CTFlowError(
                f"{path} line {line}: name {name[:60]!r} must be a plain file name of at most 200 bytes,"
                " without slashes or control characters"
            )
        if name.lower().endswith((".nii", ".nii.gz", ".gz", ".dcm")):
            raise CTFlowError(f"{path} line {line}: give the name {name!r} without its extension")
        try:
            slices, seed = (_whole_cell(row.get(key)) for key in ("slices", "seed"))
        except ValueError:
            raise CTFlowError(f"{path} line {line}: slices and seed must be whole numbers") from None
        if slices is not None and not 1 <= slices <= MAX_SLICES:
            raise CTFlowError(f"{path} line {line}: slices must be between 1 and {MAX_SLICES}, got {slices}")
        if seed is not None and not 0 <= seed < 2**63:
            raise CTFlowError(f"{path} line {line}: seed must be between 0 and 2**63 - 1, got {seed}")
        if problem := report_problem(row["report"], slices):  # every row before the first is generated
            raise CTFlowError(f"{path} line {line}: {problem}")
        out.append({"index": i, "name": name, "report": row["report"], "slices": slices, "seed": seed})
    if not out:
        raise CTFlowError(f"{path} holds no prompts")
    if twice := _repeated(r["name"] for r in out):
        listed = ", ".join(map(repr, twice[:3])) + (", ..." if len(twice) > 3 else "")
        raise CTFlowError(f"{path} has duplicate names ({listed}); each output needs its own name")
    return out


def _pending(out: Path) -> Path:
    """The marker of a prompt row under way (``.<name>.pending`` beside its NIfTI)."""
    return out.with_name(f".{output_paths(out)['sidecar'].stem}.pending")


def _finished(pipe, row: dict, out: Path, settings: GenerationSettings, prompts: Path) -> bool:
    """Whether a prompt row's outputs are finished (skip it), or under way from an earlier run that was
    stopped or lost one of its files (redo it); refuse files this row did not write, and a finished
    row whose report, settings or model have changed since: replacing either needs --overwrite."""
    if _pending(out).exists():
        return False
    sidecar = output_paths(out)["sidecar"]
    if sidecar.exists():
        try:
            side = json.loads(sidecar.read_text())
            side = side if isinstance(side, dict) else {}
        except ValueError:
            side = {}
        if _lines(side.get("report")) != _lines(row["report"]):  # a CSV saved again with other line ends
            raise CTFlowError(
                f"{sidecar} is not the output of {prompts}'s row {row['name']!r} (another report); pass"
                " --overwrite to generate it again"
            )
        wanted = {
            "seed": settings.seed,
            "steps": settings.steps,
            "guidance": settings.guidance,
            "finding_guidance": settings.finding_guidance,
            "requested_slices": settings.num_slices,
            "max_slices": settings.max_slices,
            "model_weights_sha256": pipe.weights_hash,
            "dtype": str(pipe.dtype).removeprefix("torch."),
        }
        if "max_slices" not in side:  # sidecars before 2026-12-05 did not record it
            wanted.pop("max_slices")
        for key, want in wanted.items():
            if side.get(key) != want:
                raise CTFlowError(
                    f"{sidecar} was generated with {key} {side.get(key)}, not {want}; pass --overwrite to"
                    " generate every row again, or another --out"
                )
        return all(p.exists() for p in every_output(out, settings.dicom))  # else redo the row's files
    for path in every_output(out, settings.dicom):
        check_output(path)  # not ours to replace
    return False


def warn_identical_rows(rows: list[dict], settings: list[GenerationSettings], prompts: Path) -> None:
    """Warn about rows that would generate the same volume: the same report, slice count and seed (a
    row's explicit seed can equal the seed another row gets from its place, ``--seed`` + row index)."""
    first: dict[tuple, str] = {}
    for row, s in zip(rows, settings, strict=True):
        count, spacing = parse_meta(row["report"])  # the text the model reads, meta line and all
        key = (clean_report(strip_meta(row["report"])), s.num_slices or count, spacing, s.seed)
        if key in first:
            warn(
                f"{prompts}: rows {first[key]!r} and {row['name']!r} have the same report, slice count and"
                f" seed ({s.seed}), so the same volume; give one of them a seed of its own"
            )
        first.setdefault(key, row["name"])


def process_rank() -> tuple[int, int]:
    """(rank, world size) under accelerate launch / torchrun; (0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def generate_prompts(
    pipe,
    prompts: Path,
    out_dir: Path,
    settings: GenerationSettings,
    log=print,
    batch_size: int = 1,
    progress=None,
) -> list[str]:
    """Generate every row of a prompts CSV into ``out_dir``, ``batch_size`` rows per pipeline call;
    skip finished ones; this process's share only. With ``settings.dicom`` each row also writes a
    DICOM series into ``settings.dicom / name``. ``progress(rows_done, rows_to_do)`` is called after
    each pipeline call."""
    if out_dir.name.lower().endswith((".nii", ".nii.gz")):
        raise CTFlowError(
            f"with --prompts, --out is a folder for every row's files; give {out_dir} without .nii"
        )
    rows = read_prompts(prompts)
    rank, world = process_rank()
    row_settings = [
        replace(
            settings,
            overwrite=True,  # checked below: only this run's own unfinished files are replaced
            num_slices=row["slices"] if row["slices"] is not None else settings.num_slices,
            seed=row["seed"] if row["seed"] is not None else (settings.seed or 0) + row["index"],
            dicom=settings.dicom / row["name"] if settings.dicom else None,  # a series folder per row
            dicom_is_series=True,
        )
        for row in rows
    ]
    if rank == 0:
        warn_identical_rows(rows, row_settings, prompts)
    todo = []
    # every row is checked by every process, before any generates: a file in the way of another
    # process's row stops this one too, not after it has written its own rows
    for i, (row, s) in enumerate(zip(rows, row_settings, strict=True)):
        out = out_dir / f"{row['name']}.nii.gz"
        s.check()
        finished = not settings.overwrite and _finished(pipe, row, out, s, prompts)
        if i % world != rank:
            continue
        if finished:
            log(f"skip {row['name']} (finished)")
            continue
        todo.append((row, out, s))
    done = []
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        for _, out, _ in batch:  # rows under way: a rerun after a kill redoes them
            out.parent.mkdir(parents=True, exist_ok=True)
            _pending(out).touch()
        generate_batch(
            pipe, [r["report"] for r, _, _ in batch], [o for _, o, _ in batch], [s for _, _, s in batch]
        )
        for row, out, _ in batch:
            _pending(out).unlink()
            done.append(row["name"])
            log(f"wrote {out}" + (f" (rank {rank}/{world})" if world > 1 else ""))
        if progress is not None:
            progress(len(done), len(todo))
    return done
