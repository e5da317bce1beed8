"""A zip archive's table of contents, checked before `zipfile` parses it (cxr_app/batch.py explains why): the end
records (plain and zip64), the directory's size, its entries declared and counted, and a handle that refuses any
read larger than the directory may be.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

_EOCD = struct.Struct("<4s4H2LH")  # end of central directory: signature, disks, entries, size, offset, comment
_ZIP64_LOCATOR = struct.Struct("<4sLQL")  # signature, disk of the zip64 record, its offset, number of disks
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")  # signature, size, versions, disks, entries, size, offset
_CENTRAL_ENTRY = 46  # fixed part of a central directory entry; its name, extra, comment lengths sit at byte 28


class Refused(Exception):
    """An archive or member that is not read; the message is meant for the user."""


class NoDirectory(Refused):
    """No end of central directory record: a truncated archive, or no archive at all."""


class _ReadTooLarge(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


class _GuardedFile(io.FileIO):
    """The archive as ZipFile reads it: while `limit` is set, a read of more than `limit` bytes is refused."""

    limit: int | None = None

    def read(self, size: int | None = -1, /) -> bytes:
        if self.limit is not None:
            wanted = size if size is not None and size >= 0 else os.fstat(self.fileno()).st_size - self.tell()
            if wanted > self.limit:
                raise _ReadTooLarge(wanted)
        return super().read(size)


def megabytes(size: int) -> str:
    return f"{size / 2**20:.0f} MB" if size >= 2**20 else f"{size / 2**10:.0f} KB"



def _directory_end(handle: io.FileIO, size: int) -> tuple[int, int, int]:
    """(declared entries, directory size, directory start), found where zipfile finds them: an end record that ends
    the file, else the last one in the final 64 KiB (a comment follows it); then a zip64 record just before it."""
    missing = NoDirectory("The zip archive is incomplete or damaged: its table of contents is missing.")
    if size < _EOCD.size:
        raise missing
    handle.seek(size - _EOCD.size)
    record, position = handle.read(_EOCD.size), size - _EOCD.size
    if not (record.startswith(b"PK\x05\x06") and record.endswith(b"\x00\x00")):
        start = max(size - (1 << 16) - _EOCD.size, 0)
        handle.seek(start)
        tail = handle.read(size - start)
        found = tail.rfind(b"PK\x05\x06")
        if found < 0 or found + _EOCD.size > len(tail):
            raise missing
        record, position = tail[found : found + _EOCD.size], start + found
    _, _, _, _, entries, directory_size, _, _ = _EOCD.unpack(record)
    start = position - directory_size
    if position >= _ZIP64_LOCATOR.size:
        handle.seek(position - _ZIP64_LOCATOR.size)
        signature, disk, _, disks = _ZIP64_LOCATOR.unpack(handle.read(_ZIP64_LOCATOR.size))
        if signature == b"PK\x06\x07":
            if disk != 0 or disks > 1:
                raise Refused("Zip archives split into several parts are not supported; join them into one.")
            if position >= _ZIP64_LOCATOR.size + _ZIP64_EOCD.size:
                handle.seek(position - _ZIP64_LOCATOR.size - _ZIP64_EOCD.size)
                fields = _ZIP64_EOCD.unpack(handle.read(_ZIP64_EOCD.size))
                if fields[0] == b"PK\x06\x06":
                    entries, directory_size = fields[7], fields[8]
                    start = position - _ZIP64_LOCATOR.size - _ZIP64_EOCD.size - directory_size
    return entries, directory_size, start


def _count_entries(handle: io.FileIO, start: int, size: int) -> int:
    """Entries in the central directory, walked record by record (the declared count can lie); stops at the first
    malformed record, which ZipFile then reports."""
    handle.seek(start)
    data, count, position = handle.read(size), 0, 0
    while position + _CENTRAL_ENTRY <= len(data) and data[position : position + 4] == b"PK\x01\x02":
        name, extra, comment = struct.unpack_from("<3H", data, position + 28)
        position += _CENTRAL_ENTRY + name + extra + comment
        count += 1
    return count


@contextmanager
def open_archive(path: Path, max_members: int, max_directory_bytes: int) -> Iterator[zipfile.ZipFile]:
    """The archive, its table of contents checked against the limits before ZipFile parses it."""
    with _GuardedFile(path, "r") as handle:
        size = os.fstat(handle.fileno()).st_size
        entries, directory_size, start = _directory_end(handle, size)
        too_large = Refused(
            f"The zip archive's table of contents is too large ({megabytes(directory_size)}; the limit is "
            f"{megabytes(max_directory_bytes)}): it lists far more entries than a batch can hold."
        )
        if directory_size > max_directory_bytes:
            raise too_large
        if start < 0 or start + directory_size > size:
            raise Refused("The zip archive is damaged: its table of contents points outside the file.")
        entries = max(entries, _count_entries(handle, start, directory_size))
        if entries > max_members:
            raise Refused(f"The zip archive lists {entries} entries; the limit is {max_members}. Split it into "
                           "smaller archives.")
        handle.limit = max(max_directory_bytes, (1 << 16) + _EOCD.size)  # ZipFile's search for the end reads 64 KiB
        try:
            archive = zipfile.ZipFile(handle)
        except _ReadTooLarge:
            raise too_large from None
        except MemoryError:
            raise
        except Exception as error:  # noqa: BLE001 - a damaged directory makes zipfile raise many kinds of error
            if not isinstance(error, (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError)):
                logger.warning("unusual error while a zip directory was read", exc_info=error)
            raise Refused(f"The zip archive is damaged and cannot be read ({type(error).__name__}).") from None
        handle.limit = None
        with archive:
            if len(archive.infolist()) > max_members:
                raise Refused(f"The zip archive lists {len(archive.infolist())} entries; the limit is "
                               f"{max_members}. Split it into smaller archives.")
            yield archive


__all__ = ["NoDirectory", "Refused", "megabytes", "open_archive"]
