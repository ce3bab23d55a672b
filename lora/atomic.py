"""Writes that survive kill -9: a reader finds the old version or the new one, never a mix or a torn file.

    atomic_write(path, data)        a file: written to a temp file beside it, fsynced, moved over it (os.replace)
    with atomic_file(path) as tmp:  the same for writers that want a path (savefig, save_file, ...)
    with atomic_dir(path) as tmp:   a folder replaced as a whole: fill tmp; on success it becomes `path`
    readable_dir(path)              the folder a reader should open: `path`, or its old version mid-swap

A folder cannot be swapped in one system call when the old one is not empty, so `atomic_dir` does it in
three renames, each of which a crash can split from the next:

    fill   .NAME.tmp-XXXX/          (complete and fsynced before anything else moves)
    1.     NAME  -> .NAME.old       (now NAME is missing; .NAME.old is the complete old version)
    2.     .NAME.tmp-XXXX -> NAME   (NAME is the complete new version)
    3.     remove .NAME.old

A kill between 1 and 2 leaves no NAME but a complete .NAME.old: `readable_dir` returns it, and the next
`atomic_dir` (or `recover_dir`) renames it back before doing anything else. Every temp name starts with a dot
and the target's name, so the next write to the same target removes what a killed one left behind.

Note: one writer per target at a time. Two processes saving to the same folder at once may each remove the
other's temp folder; the target itself is still always a complete version.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

OLD_SUFFIX = ".old"
TMP_INFIX = ".tmp-"


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Writes `data` (text as UTF-8) to `path` so a kill leaves the old file or the new one."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


@contextmanager
def atomic_file(path: str | os.PathLike):
    """Yields a temp path beside `path`; on success it is fsynced and replaces `path`, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TMP_INFIX}")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yields an empty temp folder beside `path`; on success it replaces `path` as a whole (see the module note).

    Whatever the old folder held is gone afterwards, files put there by hand included: give each writer a
    folder of its own.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a folder; cannot write a folder there")
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}{TMP_INFIX}"))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync_file(f)
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = _old(path)
    if path.exists():
        os.rename(path, old)
    os.rename(tmp, path)
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def readable_dir(path: str | os.PathLike) -> Path:
    """`path`, or, while a swap killed between its renames is not yet recovered, the complete old version."""
    path = Path(path)
    old = _old(path)
    return old if not path.exists() and old.is_dir() else path


def recover_dir(path: str | os.PathLike) -> None:
    """Finishes what a killed `atomic_dir` left: the old version back in place, temp folders removed."""
    path = Path(path)
    old = _old(path)
    if not path.exists() and old.is_dir():
        os.rename(old, path)
        _fsync_dir(path.parent)
    _remove_leftovers(path)


def _remove_leftovers(path: Path) -> None:
    if not path.parent.is_dir():
        return
    for p in path.parent.glob(f".{_glob_escape(path.name)}*"):
        if p.name.startswith(f".{path.name}{TMP_INFIX}") or p.name == f".{path.name}{OLD_SUFFIX}":
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _old(path: Path) -> Path:
    return path.with_name(f".{path.name}{OLD_SUFFIX}")


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Makes the renames inside `path` durable (a power cut, not only a kill); a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
