"""Batch uploads -> the files to classify: loose images and DICOM files, and the members of zip archives.

An archive is the cheapest way to make a server spend memory, disk and time, so none of it is trusted:

- the table of contents: `zipfile.ZipFile` reads the whole central directory in one read of the size the archive
  declares and builds one ZipInfo per entry (a 64 MB archive can list ~1.4 M entries: hundreds of MB). The end
  records (plain and zip64) are read here first, and an archive whose directory is over `MAX_DIRECTORY_BYTES` or
  lists over `MAX_ARCHIVE_MEMBERS` entries (declared, and counted by walking the directory) is refused before
  ZipFile sees it; ZipFile then reads through a handle that refuses any larger read, wherever it finds the end.
- each member: only regular, unencrypted, stored or deflated files with an image/DICOM suffix (or a suffix-less
  file with the DICOM preamble) are extracted; links and nested archives are not followed. bzip2 and LZMA are
  refused: zipfile inflates each of their chunks without an output bound. A member is streamed to a generated name
  in the caller's folder (never to its own path), stopped at `MAX_FILE_BYTES`, and the bytes really inflated (a
  bomb's header lies) count against `MAX_EXTRACTED_BYTES` per batch, kept or not: that bounds disk and time,
  overlapping-entry bombs included. A failed member's partial file is deleted.
- the batch: at most `MAX_BATCH_FILES` files go on to be read; the rest are counted in one row.

Every problem with one file is a row of its own, with a sentence for the user; the other files still run. The
caller reads each `BatchEntry.path` with `uploads.read_upload`, which guards the image and DICOM decoders.

Not part of the Hub-uploaded model: nothing in the model files imports this module.
"""

from __future__ import annotations

import logging
import os
import stat
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .upload_types import MAX_FILE_BYTES, InputError
from .uploads import ACCEPTED_SUFFIXES
from .zip_directory import NoDirectory, Refused, megabytes, open_archive

MAX_BATCH_FILES = 50  # files read per batch: ~0.2-0.3 s each on 2 CPU cores, so a full batch answers in ~15 s
MAX_ARCHIVE_MEMBERS = 1000  # entries listed in one zip: a full batch plus folders and clutter, with room to spare
MAX_DIRECTORY_BYTES = 1 << 20  # a zip's central directory: 1000 entries with ~1 KB paths; ~23k entries at most
MAX_EXTRACTED_BYTES = 512 << 20  # bytes inflated from the archives of one batch, kept or not: 50 CR DICOMs of ~10 MB

_CHUNK = 1 << 20  # bytes inflated per read while extracting
_SNIFF = 132  # a DICOM file's preamble and "DICM"
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")  # first member, empty archive, spanning marker
_ARCHIVE_SUFFIXES = (".zip", ".7z", ".rar", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".zst")
_ZIP_DOCUMENTS = (".docx", ".xlsx", ".pptx", ".odt", ".ods", ".odp", ".epub", ".jar", ".apk")  # zip containers
_CLUTTER = ("thumbs.db", "desktop.ini", "dicomdir")  # Windows' thumbnails and settings; a DICOM export's index
_KINDS = "PNG, JPEG, BMP, TIFF, WebP and DICOM (.dcm)"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchEntry:
    """One row of the batch table."""

    name: str  # the upload's base file name, or "archive.zip/inner/path.png"
    path: Path | None  # the file to read (the upload itself, or a member extracted under workdir); None when refused
    error: str | None  # a sentence for the user when this entry is not read, else None


def _display(name: str, limit: int = 200) -> str:
    """A name for the table: control characters shown as "?", a long name shortened in the middle."""
    name = "".join("?" if ord(char) < 32 or ord(char) == 127 else char for char in name)
    return name if len(name) <= limit else f"{name[: limit - 61]}...{name[-58:]}"


def _silently_skipped(info: zipfile.ZipInfo) -> bool:
    """Folders and what systems add to archives on their own: __MACOSX/ (resource forks), hidden files (.DS_Store,
    ._name), Thumbs.db, desktop.ini; and DICOMDIR, the index of a DICOM export (it holds no image)."""
    parts = [part for part in info.filename.replace("\\", "/").split("/") if part]
    if not parts or info.is_dir() or info.filename.endswith("\\") or stat.S_ISDIR(info.external_attr >> 16):
        return True
    hidden = any(part.startswith(".") and part not in (".", "..") for part in parts)
    return hidden or parts[0] == "__MACOSX" or parts[-1].lower() in _CLUTTER


def _refusal(info: zipfile.ZipInfo, suffix: str, max_member_bytes: int) -> str | None:
    """Why a member is not extracted, from its directory entry alone; None when it may be."""
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "The archive entry is a symbolic link, not a file; links are not followed."
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG):
        return "The archive entry is not a regular file (a device or pipe); it is not read."
    if suffix in _ARCHIVE_SUFFIXES:
        return "The file is an archive inside the archive; nested archives are not opened. Upload it on its own."
    if suffix and suffix not in ACCEPTED_SUFFIXES:
        return f'Files named "{_display(suffix, 20)}" are not read: a batch takes {_KINDS} files.'
    if info.flag_bits & 0x1:
        return ("The file is encrypted (password-protected) in the archive and is not opened. Make the archive "
                "again without a password.")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        method = zipfile.compressor_names.get(info.compress_type, f"method {info.compress_type}")
        return (f"The file is compressed with {method} in the archive, which is not supported. Make the archive "
                "again with standard (deflate) compression.")
    if info.file_size > max_member_bytes:
        return (f"The file expands to {megabytes(info.file_size)}; the limit is {megabytes(max_member_bytes)} "
                "per file.")
    return None


def _damaged_member(error: Exception) -> str:
    """zipfile's messages may quote the member's raw header: only the kind of error is shown."""
    return f"The file is damaged in the archive and could not be extracted ({type(error).__name__})."


def _discard(path: Path | None) -> None:
    if path is not None:
        path.unlink(missing_ok=True)


@dataclass
class _Overflow:
    """Files not read because a limit was reached: one row, placed where the first of them was."""

    position: int
    first: str
    count: int = 0


def _overflow_row(overflow: _Overflow, reason: str, more: str, done: str) -> BatchEntry:
    """One row for the files a limit stopped: how many, from which on, and what to do."""
    files, plural = overflow.count, overflow.count > 1
    counted = f"{files} {more}file{'s' * plural}"
    return BatchEntry(
        f"{files} more file{'s' * plural}", None,
        f"{reason}: {counted}, from {overflow.first} on, {'were' if plural else 'was'} not {done}. Upload "
        f"{'them' if plural else 'it'} in another batch.",
    )


class _Batch:
    def __init__(self, workdir: Path, max_files: int, max_members: int, max_extracted_bytes: int,
                 max_member_bytes: int, max_directory_bytes: int) -> None:
        self.workdir, self.max_files, self.max_members = workdir, max_files, max_members
        self.max_extracted_bytes, self.max_member_bytes = max_extracted_bytes, max_member_bytes
        self.max_directory_bytes = max_directory_bytes
        self.entries: list[BatchEntry] = []
        self.readable = self.inflated = self.next_name = 0
        self.over_cap: _Overflow | None = None
        self.over_budget: _Overflow | None = None

    # -- rows -------------------------------------------------------------------------------------------------------
    def read(self, name: str, path: Path) -> None:
        self.entries.append(BatchEntry(name, path, None))
        self.readable += 1

    def refuse(self, name: str, error: str) -> None:
        self.entries.append(BatchEntry(name, None, error))

    def full(self, name: str, count: int = 1) -> bool:
        """True when the batch holds max_files files to read already; `count` later files are then counted."""
        if self.readable < self.max_files:
            return False
        self.over_cap = self.over_cap or _Overflow(len(self.entries), name)
        self.over_cap.count += count
        return True

    def over_limit(self, name: str) -> None:
        self.over_budget = self.over_budget or _Overflow(len(self.entries), name)
        self.over_budget.count += 1

    def rows_so_far(self) -> int:
        """Entries plus the files counted in the overflow rows."""
        return len(self.entries) + sum(overflow.count for overflow in (self.over_cap, self.over_budget) if overflow)

    def rows(self) -> list[BatchEntry]:
        rows = list(self.entries)
        if self.over_cap:  # at or after the budget row's place: inserted first, so that the budget row stays first
            reason = f"The batch limit of {self.max_files} files was reached"
            rows.insert(self.over_cap.position, _overflow_row(self.over_cap, reason, "more ", "read"))
        if self.over_budget:
            budget = megabytes(self.max_extracted_bytes)
            reason = f"The files extracted from archives reached the batch limit of {budget}"
            rows.insert(self.over_budget.position, _overflow_row(self.over_budget, reason, "", "extracted"))
        return rows

    # -- uploads ----------------------------------------------------------------------------------------------------
    def add(self, name: str, path: Path) -> None:
        if not path.is_file():
            if not self.full(name):
                self.refuse(name, "The file could not be found on the server; please upload it again.")
            return
        try:
            with path.open("rb") as handle:
                head = handle.read(_SNIFF)
        except OSError:
            if not self.full(name):
                self.refuse(name, "The file could not be read on the server; please upload it again.")
            return
        is_dicom = head[128:132] == b"DICM"  # a DICOM preamble may start with anything, "PK" included
        suffix = Path(name).suffix.lower()
        named_zip = suffix == ".zip" or path.suffix.lower() == ".zip"
        if suffix in _ZIP_DOCUMENTS and not named_zip:  # zips inside, but a document: one row, not one per part
            if not self.full(name):
                self.refuse(name, f"The file is a {suffix} document, not an X-ray or a zip of X-rays.")
        elif named_zip or (head.startswith(_ZIP_MAGIC) and not is_dicom):
            self.add_archive(name, path, looks_like_zip=head.startswith(_ZIP_MAGIC))
        elif not self.full(name):
            self.read(name, path)

    def add_archive(self, name: str, path: Path, looks_like_zip: bool) -> None:
        if self.readable >= self.max_files:  # only counted: what the user would have to upload again
            try:
                with open_archive(path, self.max_members, self.max_directory_bytes) as archive:
                    members = [info for info in archive.infolist() if not _silently_skipped(info)]
            except (Refused, OSError):
                self.full(name)
                return
            if members:
                self.full(_display(f"{name}/{members[0].filename}"), len(members))
            return
        before = self.rows_so_far()
        try:
            with open_archive(path, self.max_members, self.max_directory_bytes) as archive:
                for info in archive.infolist():
                    if not _silently_skipped(info):
                        self.add_member(archive, info, _display(f"{name}/{info.filename}"))
        except NoDirectory as refusal:
            self.refuse(name, str(refusal) if looks_like_zip else "The file is named .zip but is not a zip archive.")
        except Refused as refusal:
            self.refuse(name, str(refusal))
        except OSError as error:
            self.refuse(name, f"The zip archive could not be read on the server ({type(error).__name__}).")
        if self.rows_so_far() == before:
            self.refuse(name, "The zip archive holds no files (only folders or hidden files).")

    # -- archive members --------------------------------------------------------------------------------------------
    def add_member(self, archive: zipfile.ZipFile, info: zipfile.ZipInfo, name: str) -> None:
        if self.full(name):
            return
        suffix = PurePosixPath(info.filename.replace("\\", "/")).suffix.lower()
        refusal = _refusal(info, suffix, self.max_member_bytes)
        if refusal:
            self.refuse(name, refusal)
        elif info.file_size > self.max_extracted_bytes - self.inflated:  # declared: nothing inflated in vain
            self.over_limit(name)
        else:
            self.extract(archive, info, name, suffix or None)

    def new_file(self, suffix: str) -> Path:
        """A new file under workdir with a generated name (index + suffix), never one that exists."""
        while True:
            path = self.workdir / f"{self.next_name:04d}{suffix}"
            self.next_name += 1
            try:
                path.open("xb").close()
                return path
            except FileExistsError:
                continue

    def extract(self, archive: zipfile.ZipFile, info: zipfile.ZipInfo, name: str, suffix: str | None) -> None:
        """Streams one member to a new file, counting what is inflated, never trusting the declared size."""
        limit = min(self.max_member_bytes, self.max_extracted_bytes - self.inflated)
        target: Path | None = None
        written, error = 0, None
        try:
            with archive.open(info) as source:
                chunk = source.read(min(_SNIFF, limit + 1))
                self.inflated += len(chunk)
                if suffix is None:  # no suffix: read only as a DICOM file with its preamble
                    if chunk[128:132] != b"DICM":
                        raise Refused(f"The file has no name extension and is not a DICOM file: a batch takes "
                                       f"{_KINDS} files.")
                    suffix = ".dcm"
                target = self.new_file(suffix)
                with target.open("wb") as sink:
                    while chunk:
                        written += len(chunk)
                        if written > limit:
                            break
                        sink.write(chunk)
                        chunk = source.read(min(_CHUNK, limit + 1 - written))
                        self.inflated += len(chunk)
        except Refused as refusal:
            error = str(refusal)
        except zipfile.BadZipFile as failure:
            error = ("The file is damaged in the archive (its checksum does not match) and was not read."
                     if "CRC" in str(failure) else _damaged_member(failure))
        except EOFError:
            error = "The file is truncated in the archive and could not be extracted."
        except zlib.error:
            error = "The file's compressed data is damaged in the archive; it could not be extracted."
        except NotImplementedError:
            error = "The file uses a zip feature that is not supported (such as strong encryption or patch data)."
        except OSError as failure:
            error = f"The file could not be extracted on the server ({type(failure).__name__})."
        except MemoryError:
            _discard(target)
            raise
        except Exception as failure:  # noqa: BLE001 - crafted members reach corners of zipfile that raise anything
            logger.warning("unusual error while an archive member was extracted", exc_info=failure)
            error = _damaged_member(failure)
        except BaseException:  # KeyboardInterrupt, SystemExit: no partial file stays behind either
            _discard(target)
            raise
        if error is None and written > self.max_member_bytes:
            error = (f"The file expands to more than {megabytes(self.max_member_bytes)} (the limit per file), more "
                     "than its header says: it is refused as a decompression bomb.")
        if error is not None or written > limit:
            _discard(target)
        if error is not None:
            self.refuse(name, error)
        elif written > limit:  # the batch's extraction budget ran out during this member
            self.over_limit(name)
        else:
            self.read(name, target)


def _upload(item: object) -> tuple[str, Path | None]:
    """(display name, path) of one upload: a path, or a (display name, path) pair."""
    name, path = item if isinstance(item, tuple) and len(item) == 2 else (None, item)
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise InputError("The batch could not be read: each upload must be a file path.")
    path = Path(path) if path is not None and str(path) != "" else None
    return _display(str(name) if name else path.name if path else "(no name)"), path


def expand_batch(uploads: Sequence[str | Path | tuple[str, str | Path]], workdir: Path, *,
                 max_files: int = MAX_BATCH_FILES, max_members: int = MAX_ARCHIVE_MEMBERS,
                 max_extracted_bytes: int = MAX_EXTRACTED_BYTES, max_member_bytes: int = MAX_FILE_BYTES,
                 max_directory_bytes: int = MAX_DIRECTORY_BYTES) -> list[BatchEntry]:
    """Uploaded files and zip archives -> one entry per file, in upload order (members in archive order), at most
    `max_files` of them to read; archive members are extracted under `workdir` (a private folder the caller
    deletes). Problems with a file are entries with an error; InputError only for unusable arguments. A single path
    is taken as a batch of one (what a single-file upload component gives)."""
    if isinstance(uploads, (str, os.PathLike)):
        uploads = [uploads]
    if not uploads:
        raise InputError("No files were uploaded. Choose chest X-ray images, DICOM files or a zip archive of them.")
    if not Path(workdir).is_dir():
        raise InputError("The batch could not be prepared on the server (no working folder); please try again.")
    if min(max_files, max_members, max_extracted_bytes, max_member_bytes, max_directory_bytes) < 1:
        raise InputError("The batch limits must be positive.")
    batch = _Batch(Path(workdir), max_files, max_members, max_extracted_bytes, max_member_bytes, max_directory_bytes)
    for item in uploads:
        name, path = _upload(item)
        if path is None:
            if not batch.full(name):
                batch.refuse(name, "No file was uploaded here; please upload it again.")
        else:
            batch.add(name, path)
    return batch.rows()


__all__ = ["MAX_ARCHIVE_MEMBERS", "MAX_BATCH_FILES", "MAX_DIRECTORY_BYTES", "MAX_EXTRACTED_BYTES", "BatchEntry",
           "expand_batch"]
