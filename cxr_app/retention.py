"""How long uploads stay on the server: gradio's `delete_cache` schedule, the example X-rays kept out of it, and a
sweep for the partial uploads that gradio never deletes.

Why: gradio keeps every upload (a DICOM with all its patient tags, under its original file name) in its cache
folder for the life of the server, reachable by URL. With `delete_cache=(frequency, age)` it deletes the files it
created once they are older than `age`, checking every `frequency` seconds: a file is gone at most
`age + frequency` seconds after it arrived. Two gaps remain, closed here:

- The example X-rays are copied into the same cache when the page is built, and `delete_cache` would delete those
  copies too; the Examples then point at missing files. `protect_build_time_files` marks everything cached while
  the Blocks were built (app assets, never user data) as kept.
- An upload whose client disconnects half-way stays as a `tmp*` file at the top of the upload folder: gradio never
  tracks it, so `delete_cache` never deletes it (seen with gradio 6.31). `sweep_partial_uploads` deletes such
  files once nothing has been written to them for `age` seconds; `lifespan` runs it on gradio's schedule.

Uploads are not deleted as soon as a request is done: the UI reads the same upload again whenever the saliency method
or class changes, and gradio stores uploads by content hash, so two users sending the same file share one path that
an early delete would pull from under the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from .gradio_compat import keep_cached_files

logger = logging.getLogger(__name__)

ENV_DELETE_CACHE = "CNN_LSTM_DELETE_CACHE"  # "FREQUENCY,AGE" in seconds, gradio's delete_cache
# Every 5 minutes, uploads and results older than 10 minutes are deleted: long enough to try every saliency method
# and class on one image, short enough that a DICOM with its patient tags is gone within 15 minutes.
DELETE_CACHE = (300, 600)


def delete_cache_setting(delete_cache: tuple[int, int] | None = None) -> tuple[int, int]:
    """gradio's (frequency, age) in seconds: `delete_cache`, else $CNN_LSTM_DELETE_CACHE ("FREQUENCY,AGE"), else
    `DELETE_CACHE`. Tests use seconds."""
    if delete_cache is None:
        text = os.environ.get(ENV_DELETE_CACHE, "").strip()
        if not text:
            return DELETE_CACHE
        try:
            frequency, age = (int(part) for part in text.split(","))
        except ValueError:
            raise ValueError(f"{ENV_DELETE_CACHE} must be FREQUENCY,AGE in whole seconds, got {text!r}") from None
        delete_cache = (frequency, age)
    frequency, age = delete_cache
    if frequency < 1 or age < 1:
        raise ValueError(f"delete_cache frequency and age must be >= 1 s, got {delete_cache}")
    return int(frequency), int(age)


def retention_seconds(delete_cache: tuple[int, int]) -> int:
    """The longest an upload stays: older than `age` at the first sweep after that, one sweep every `frequency`."""
    return delete_cache[0] + delete_cache[1]


def retention_text(delete_cache: tuple[int, int]) -> str:
    seconds = retention_seconds(delete_cache)
    return f"{seconds} seconds" if seconds < 120 else f"{math.ceil(seconds / 60)} minutes"


def protect_build_time_files(demo: Any) -> int:
    """Keep every file the Blocks cached while being built (the example X-rays' copies) out of `delete_cache`;
    returns how many (through cxr_app/gradio_compat.py: the attributes gradio's own deletion reads)."""
    return keep_cached_files(demo)


def remove_older_than(
    folder: str | Path, age: float, pattern: str = "*", files_only: bool = False, now: float | None = None
) -> list[Path]:
    """Delete the entries of `folder` matching `pattern` not modified for more than `age` seconds (folders with what
    they hold; with `files_only`, plain files only: no folders, no links); returns what was removed."""
    folder, now = Path(folder), time.time() if now is None else now
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for path in folder.glob(pattern):
        try:
            if now - path.lstat().st_mtime <= age:
                continue
            if path.is_dir() and not path.is_symlink():
                if files_only:
                    continue
                shutil.rmtree(path)
            elif files_only and (path.is_symlink() or not path.is_file()):
                continue
            else:
                path.unlink()
            removed.append(path)
        except FileNotFoundError:
            continue
    return removed


def sweep_partial_uploads(upload_dir: str | Path, age: float, now: float | None = None) -> list[Path]:
    """Delete the `tmp*` files at the top of `upload_dir` (gradio's in-progress uploads) not written to for `age`
    seconds: uploads whose client went away. Finished uploads live one folder down and are not touched."""
    removed = remove_older_than(upload_dir, age, "tmp*", files_only=True, now=now)
    if removed:
        logger.info("deleted %d abandoned partial upload(s)", len(removed))
    return removed


def lifespan(upload_dir: Callable[[], str | Path], delete_cache: tuple[int, int]):
    """A FastAPI lifespan (gradio's `launch(app_kwargs={"lifespan": ...})`) that runs `sweep_partial_uploads` every
    `frequency` seconds while the server runs."""
    frequency, age = delete_cache

    async def sweep_forever() -> None:
        while True:
            await asyncio.sleep(frequency)
            try:
                await asyncio.to_thread(sweep_partial_uploads, upload_dir(), age)
            except OSError:  # a full or read-only disk must not stop the server
                logger.exception("sweeping partial uploads failed")

    @asynccontextmanager
    async def run(app: Any) -> AsyncIterator[None]:
        task = asyncio.create_task(sweep_forever())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return run


__all__ = ["DELETE_CACHE", "ENV_DELETE_CACHE", "delete_cache_setting", "lifespan", "protect_build_time_files",
           "remove_older_than", "retention_seconds", "retention_text", "sweep_partial_uploads"]

