"""Atomic writes and the overwrite guard.

Every output is written to a temporary sibling and renamed into place, so an
interrupted or failed run never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from ctflow.errors import CTFlowError


def check_output(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse to clobber an existing output unless ``overwrite``, and never replace the folder this
    process works in or one above it (``--out .``: a folder output replaces the whole folder)."""
    path = Path(path)
    here = Path.cwd().resolve()
    if path.is_dir() and path.resolve() in (here, *here.parents):
        raise CTFlowError(f"{path} is the folder ctflow runs in (or holds it); write to a folder of its own")
    if path.exists() and not overwrite:
        raise CTFlowError(f"{path} already exists; pass --overwrite (overwrite=True) to replace it")
    if path.parent.exists() and not path.parent.is_dir():
        raise CTFlowError(f"cannot write {path}: {path.parent} is not a folder")
    nearest = path.parent  # the folder it goes in, or the nearest one there is above it (made on write)
    while not nearest.exists() and nearest != nearest.parent:
        nearest = nearest.parent
    if nearest.is_dir() and not os.access(nearest, os.W_OK | os.X_OK):
        raise CTFlowError(f"cannot write {path}: {nearest} is not writable; write somewhere else")
    return path


def check_folder_output(
    path: str | os.PathLike,
    overwrite: bool,
    belongs: Callable[[Path], bool],
    inputs=(),
    what: str = "an output",
) -> Path:
    """:func:`check_output` for a folder written whole (:func:`atomic_dir`), which replacing deletes:
    refuse a ``path`` that is, or holds, one of the ``inputs`` it is made from, and an existing folder
    holding an entry that does not ``belong`` in such an ``what`` folder."""
    path = check_output(path, overwrite)
    target = path.resolve()
    for given in inputs:
        given = Path(given).resolve()
        if given == target or target in given.parents:
            raise CTFlowError(
                f"{path} holds the input {given}, which writing it would delete; write to a new folder"
            )
    if path.is_dir():
        foreign = sorted(p.name for p in path.iterdir() if not belongs(p))
        if foreign:
            raise CTFlowError(
                f"{path} holds more than {what} folder's files ({', '.join(foreign[:3])}"
                f"{' and more' if len(foreign) > 3 else ''}), which replacing it would delete;"
                " write to a new or empty folder"
            )
    return path


def remove_temporaries(folder: str | os.PathLike) -> list[str]:
    """Remove what :func:`atomic_path` / :func:`atomic_dir` left in ``folder`` when a process was
    killed before its ``finally`` (``.NAME.XXXX.tmp...``, ``.NAME.old``); returns their names. Only
    for folders ctflow owns whole (a latent cache, a training run), on resuming them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    left = sorted({*folder.glob(".*.tmp*"), *folder.glob(".*.old")})
    for p in left:
        original = folder / p.name[1 : -len(".old")] if p.name.endswith(".old") else None
        if original is not None and not original.exists():  # killed between atomic_dir's two renames:
            os.replace(p, original)  # the old copy is the only finished one
        elif p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return [p.name for p in left]


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (os.umask swaps it)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish_mode(path: Path, directory: bool = False) -> None:
    """Give a temporary file (0600) or folder (0700) the mode a plain ``open``/``mkdir`` would have."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def _suffixes(path: Path) -> str:
    """The extension a temporary sibling of ``path`` takes, in lower case: writers that pick the format
    by extension (nibabel) do not know ``.NII.GZ``."""
    name = path.name.lower()
    for ext in (".nii.gz", ".tar.gz"):
        if name.endswith(ext):
            return ext
    return path.suffix.lower()


def _cannot_write(path: Path, error: OSError) -> CTFlowError:
    """A one-line error for a failed write (no permission, a full disk, a file where a folder goes)."""
    return CTFlowError(f"cannot write {path}: {error.strerror or error}; check the folder and free space")


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _cannot_write(path, e) from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file path next to ``path``; rename it onto ``path`` on success.

    The temporary name keeps the extension so writers that infer the format
    from it (nibabel, imageio) behave the same. Without ``overwrite`` a file that
    appears at ``path`` while this one is written (another run) is not replaced.
    """
    path = check_output(path, overwrite)
    _make_parent(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + _suffixes(path), dir=path.parent)
    except OSError as e:
        raise _cannot_write(path, e) from None
    os.close(fd)
    tmp = Path(tmp)
    try:
        try:
            yield tmp
        except OSError as e:
            raise _cannot_write(path, e) from None
        if path.is_dir():
            raise CTFlowError(f"cannot write {path}: a folder of that name exists")
        _publish_mode(tmp)
        _publish(tmp, path, overwrite)
    finally:
        tmp.unlink(missing_ok=True)


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    """Move a finished temporary file onto ``path``; without ``overwrite``, never onto an existing one."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails if path exists: the check and the write are one step
    except FileExistsError:
        raise CTFlowError(
            f"{path} appeared while it was being written (another run?); pass --overwrite to replace it"
        ) from None
    except OSError:  # a file system without hard links: check, then rename
        if path.exists():
            raise CTFlowError(
                f"{path} already exists; pass --overwrite (overwrite=True) to replace it"
            ) from None
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; move it onto ``path`` on success."""
    path = check_output(path, overwrite)
    _make_parent(path)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise _cannot_write(path, e) from None
    try:
        try:
            yield tmp
        except OSError as e:
            raise _cannot_write(path, e) from None
        _publish_mode(tmp, directory=True)
        for inner in tmp.rglob("*"):  # what libraries wrote through temporary files of their own (0600)
            if inner.is_file() and not inner.is_symlink() and inner.stat().st_mode & 0o777 == 0o600:
                _publish_mode(inner)
        if path.exists():
            if not overwrite:  # it appeared while this one was written (another run)
                raise CTFlowError(
                    f"{path} appeared while it was being written (another run?); pass --overwrite to replace it"
                )
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            if path.is_dir():
                os.replace(path, old)
            else:
                path.unlink()
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str, overwrite: bool = False) -> Path:
    with atomic_path(path, overwrite) as tmp:
        tmp.write_text(text)
    return Path(path)
