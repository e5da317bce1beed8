"""Atomic file and folder writes: a reader, or a crash half-way, sees the old output or the new one, never a mix.

Both write beside the destination (same filesystem, so the final rename is atomic) under a hidden name, and remove
what they wrote when the writing fails. Shared by the corpus builder, training, and the scripts.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class DestinationExists(FileExistsError):
    """`atomic_folder(..., overwrite=False)` found a non-empty folder where it was about to put the new one."""


def check_destination(destination: str | Path, overwrite: bool) -> None:
    """Fail before any work where `atomic_folder(destination, overwrite)` could not put its folder."""
    destination = Path(destination)
    if destination.exists() and not destination.is_dir():
        raise DestinationExists(f"{destination} exists and is a file; choose another path")
    if destination.is_dir() and any(destination.iterdir()) and not overwrite:
        raise DestinationExists(f"{destination} already exists; pass --overwrite to replace it or pick a new one")


def _sibling(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{kind}-{uuid.uuid4().hex[:8]}"


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write to; on success it replaces `path` (`os.replace`).

    Not mkstemp: the file gets the usual umask permissions.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; returns `path`."""
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


@contextmanager
def atomic_folder(destination: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder beside `destination`; on success it takes `destination`'s place.

    An existing `destination` is swapped out, never mixed with the new files, and removed only once the new folder
    is in place; on any error nothing changes. With `overwrite=False` a non-empty `destination` (one that appeared
    while the folder was being filled: call `check_destination` first) raises `DestinationExists` and stays as it is.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(destination, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        _swap_in(tmp, destination, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(folder: Path, destination: Path, overwrite: bool) -> None:
    """Rename `folder` to `destination`, moving an existing `destination` aside first and restoring it on failure."""
    if not destination.exists():
        folder.rename(destination)
        return
    if not overwrite and (not destination.is_dir() or any(destination.iterdir())):
        raise DestinationExists(f"{destination} appeared while the new folder was being written")
    previous = _sibling(destination, "old")
    destination.rename(previous)
    try:
        folder.rename(destination)
    except BaseException:
        previous.rename(destination)
        raise
    if previous.is_dir():
        shutil.rmtree(previous, ignore_errors=True)
    else:
        previous.unlink(missing_ok=True)
