"""Batch uploads (`cxr_app.batch.expand_batch`): loose files and zip archives -> one row per file, with hostile
archives refused at bounded cost. Every archive is built here, with zipfile or byte by byte (nothing is shipped):
real X-rays from examples/ and a DICOM made from one, zip bombs, lying headers, tables of contents listing ~200k
entries, path traversal, encrypted, linked and nested members, damaged and truncated archives. Memory is measured
with tracemalloc (Python allocations) and, where Linux lets a process reset it, the growth of peak RSS.
"""

from __future__ import annotations

import re
import stat
import struct
import time
import tracemalloc
import uuid
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cxr_app.batch import MAX_ARCHIVE_MEMBERS, MAX_DIRECTORY_BYTES, BatchEntry, expand_batch
from cxr_app.upload_types import MAX_FILE_BYTES, InputError
from cxr_app.uploads import read_upload
from tests.app.crafted_files import zeros_deflate

MiB = 1 << 20


# -- archives --------------------------------------------------------------------------------------------------------
def zip_file(path: Path, members: list[tuple[str | zipfile.ZipInfo, bytes]],
             compression: int = zipfile.ZIP_DEFLATED, comment: bytes = b"") -> Path:
    """A zip written by zipfile: (name or ZipInfo, data) in order."""
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, data in members:
            archive.writestr(name, data)
        archive.comment = comment
    return path


@dataclass
class RawMember:
    """One member written byte by byte: `data` as stored in the archive (already compressed for method 8)."""

    name: bytes
    data: bytes
    crc: int
    size: int  # the declared uncompressed size
    method: int = zipfile.ZIP_STORED
    flags: int = 0
    mode: int = stat.S_IFREG | 0o644


def raw_zip(members: list[RawMember], copies: int = 1, declared_entries: int | None = None,
            zip64: bool = False, zip64_directory_size: int | None = None) -> bytes:
    """Local headers and data, then the central directory listing every member `copies` times (copies point at the
    same data: a long table of contents costs ~50 bytes an entry to build), then the end records."""
    body, central = b"", b""
    for member in members:
        local = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, member.flags, member.method, 0, 0x21, member.crc,
                            len(member.data), member.size, len(member.name), 0)
        central += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", (3 << 8) | 20, 20, member.flags, member.method, 0, 0x21,
                               member.crc, len(member.data), member.size, len(member.name), 0, 0, 0, 0,
                               member.mode << 16, len(body)) + member.name
        body += local + member.name + member.data
    directory = central * copies
    entries = len(members) * copies if declared_entries is None else declared_entries
    end = b""
    if zip64:
        size = len(directory) if zip64_directory_size is None else zip64_directory_size
        end = (struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, entries, entries, size, len(body))
               + struct.pack("<4sLQL", b"PK\x06\x07", 0, len(body) + len(directory), 1))
        entries = 0xFFFF
    return body + directory + end + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, min(entries, 0xFFFF),
                                                min(entries, 0xFFFF), len(directory), len(body), 0)


def zero_bomb(name: bytes, zero_bytes: int, declared_size: int | None = None) -> RawMember:
    """A deflated member of `zero_bytes` zeros (~1 KB per MiB), with its true CRC and a declared size that may lie."""
    crc, block = 0, bytes(MiB)
    for _ in range(zero_bytes // MiB):
        crc = zlib.crc32(block, crc)
    crc = zlib.crc32(bytes(zero_bytes % MiB), crc)
    return RawMember(name, zeros_deflate(b"", zero_bytes), crc, zero_bytes if declared_size is None else declared_size,
                     method=zipfile.ZIP_DEFLATED)


def stored(name: str, data: bytes, **fields: Any) -> RawMember:
    return RawMember(name.encode(), data, zlib.crc32(data), len(data), **fields)


def patch_member(data: bytes, index: int, **fields: int) -> bytes:
    """The archive with fields of its `index`-th member changed in both the central directory and the local header:
    flags, file_size (the declared uncompressed size)."""
    patched = bytearray(data)
    _, _, _, _, entries, _, directory, _ = struct.unpack_from("<4s4H2LH", data, len(data) - 22)
    position = directory
    for _ in range(index):
        position += 46 + sum(struct.unpack_from("<3H", data, position + 28))
    (local,) = struct.unpack_from("<L", data, position + 42)
    offsets = {"flags": (8, 6, "<H"), "file_size": (24, 22, "<L")}
    for field, value in fields.items():
        central_offset, local_offset, form = offsets[field]
        struct.pack_into(form, patched, position + central_offset, value)
        struct.pack_into(form, patched, local + local_offset, value)
    return bytes(patched)


# -- measuring -------------------------------------------------------------------------------------------------------
@dataclass
class Cost:
    seconds: float  # CPU seconds of this process (not wall-clock: another process on a busy machine does not count)
    traced_peak: int  # bytes: peak of Python allocations during the call
    rss_growth: int | None  # bytes: peak RSS during the call over RSS before it (None where it cannot be reset)


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def measured(call: Callable[[], Any]) -> tuple[Any, Cost]:
    try:  # "5" resets the process's peak RSS (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
        rss_before = _status_kib("VmRSS")
    except OSError:
        rss_before = None
    tracemalloc.start()
    start = time.process_time()
    try:
        result = call()
        seconds = time.process_time() - start
        traced_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    growth = None if rss_before is None else (_status_kib("VmHWM") - rss_before) * 1024
    return result, Cost(seconds, traced_peak, growth)


def assert_cheap(cost: Cost, seconds: float, traced: int, rss: int = 64 * MiB) -> None:
    assert cost.seconds < seconds, cost
    assert cost.traced_peak < traced, cost
    assert cost.rss_growth is None or cost.rss_growth < rss, cost


# -- fixtures --------------------------------------------------------------------------------------------------------
@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    folder = tmp_path / "work" / "batch"  # two levels down: "../../x" would still land inside tmp_path
    folder.mkdir(parents=True)
    return folder


@pytest.fixture
def uploads(tmp_path: Path) -> Path:
    folder = tmp_path / "uploads"
    folder.mkdir()
    return folder


@pytest.fixture(scope="module")
def xrays(example_xrays: dict[str, list[Path]]) -> list[Path]:
    return [path for paths in example_xrays.values() for path in paths]


def only(entries: list[BatchEntry]) -> BatchEntry:
    assert len(entries) == 1, entries
    return entries[0]


def refused(entries: list[BatchEntry], pattern: str) -> BatchEntry:
    entry = only(entries)
    assert entry.path is None and entry.error and re.search(pattern, entry.error), entry
    return entry


def files_in(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.rglob("*") if path.is_file())


def assert_same_pixels(extracted: Path, original: Path) -> None:
    assert np.array_equal(read_upload(extracted).pixels, read_upload(original).pixels)


# -- real archives ----------------------------------------------------------------------------------------------------
def test_a_zip_of_real_xrays_and_a_dicom_expands_in_archive_order(xrays, files, uploads, workdir):
    dicom = files.xray_as_dicom(xrays[0], "scan.dcm")
    members = [(f"study/{path.name}", path.read_bytes()) for path in xrays] + [("study/scan.dcm", dicom.read_bytes())]
    archive = zip_file(uploads / "batch.zip", [("study/", b""), *members])

    entries = expand_batch([archive], workdir)

    assert [entry.name for entry in entries] == [f"batch.zip/{name}" for name, _ in members]
    assert all(entry.error is None and entry.path.parent == workdir for entry in entries)
    assert [entry.path.name for entry in entries] == [*(f"{index:04d}.jpg" for index in range(6)), "0006.dcm"]
    for entry, original in zip(entries, [*xrays, dicom], strict=True):
        assert_same_pixels(entry.path, original)
    assert read_upload(entries[-1].path).kind == "DICOM"


def test_mixed_uploads_keep_their_order_and_loose_files_are_not_copied(xrays, uploads, workdir):
    first = zip_file(uploads / "first.zip", [("a.jpg", xrays[1].read_bytes()), ("b.jpg", xrays[2].read_bytes())])
    second = zip_file(uploads / "second.zip", [("c.jpg", xrays[4].read_bytes())], compression=zipfile.ZIP_STORED)

    entries = expand_batch([xrays[0], (f"shown-{xrays[3].name}", str(xrays[3])), first, str(xrays[5]), second],
                           workdir)

    assert [entry.name for entry in entries] == [xrays[0].name, f"shown-{xrays[3].name}", "first.zip/a.jpg",
                                                 "first.zip/b.jpg", xrays[5].name, "second.zip/c.jpg"]
    assert [entries[i].path for i in (0, 1, 4)] == [xrays[0], xrays[3], xrays[5]]  # the uploads themselves
    assert files_in(workdir) == ["0000.jpg", "0001.jpg", "0002.jpg"]
    for entry, original in zip([entries[i] for i in (2, 3, 5)], [xrays[1], xrays[2], xrays[4]], strict=True):
        assert_same_pixels(entry.path, original)


def test_a_zip_is_known_by_its_content_and_an_archive_comment_is_no_obstacle(xrays, uploads, workdir):
    upload = zip_file(uploads / "scans", [("x.jpg", xrays[0].read_bytes())], comment=b"PACS export " * 4000)
    entry = only(expand_batch([upload], workdir))
    assert entry.name == "scans/x.jpg" and entry.error is None
    assert_same_pixels(entry.path, xrays[0])


def test_an_office_document_is_one_row_not_one_per_part(xrays, uploads, workdir):
    """A .docx is a zip inside: it is refused as a document, not opened part by part (images inside are not read)."""
    parts = [("[Content_Types].xml", b"<Types/>"), ("word/document.xml", b"<doc/>"),
             ("word/media/image1.jpg", xrays[0].read_bytes())]
    document = zip_file(uploads / "findings.docx", parts)
    refused(expand_batch([document], workdir), r"\.docx document, not an X-ray")
    assert files_in(workdir) == []
    renamed = zip_file(uploads / "films.zip", parts)  # the same bytes named .zip: an archive, its JPEG is read
    assert [entry.name for entry in expand_batch([renamed], workdir) if entry.error is None] == [
        "films.zip/word/media/image1.jpg"]


def test_a_suffixless_dicom_is_read_and_the_dicomdir_index_skipped(xrays, files, uploads, workdir):
    dicom = files.xray_as_dicom(xrays[2], "scan.dcm").read_bytes()
    archive = zip_file(uploads / "export.zip", [("DICOMDIR", dicom[:400]), ("DICOM/ST0/IM000001", dicom),
                                                ("DICOM/ST0/NOTES", b"not a dicom file at all" * 10)])
    entries = expand_batch([archive], workdir)
    assert [entry.name for entry in entries] == ["export.zip/DICOM/ST0/IM000001", "export.zip/DICOM/ST0/NOTES"]
    assert entries[0].path.name == "0000.dcm" and read_upload(entries[0].path).kind == "DICOM"
    assert entries[1].path is None and "no name extension and is not a DICOM file" in entries[1].error
    assert files_in(workdir) == ["0000.dcm"]


def test_hidden_files_folders_and_macos_forks_are_skipped_silently(xrays, uploads, workdir):
    image = xrays[0].read_bytes()
    clutter = [("folder/", b""), ("__MACOSX/._x.jpg", b"\x00\x05\x16\x07"), (".DS_Store", b"\x00\x00\x00\x01Bud1"),
               ("folder/.hidden.jpg", image), (".git/config", b"[core]"), ("folder/Thumbs.db", b"\xd0\xcf"),
               ("desktop.ini", b"[.ShellClassInfo]")]
    archive = zip_file(uploads / "mac.zip", [*clutter[:3], ("folder/x.jpg", image), *clutter[3:]])
    entry = only(expand_batch([archive], workdir))
    assert entry.name == "mac.zip/folder/x.jpg" and entry.error is None

    empty = zip_file(uploads / "empty.zip", clutter)
    refused(expand_batch([empty], workdir), "holds no files")


def test_the_batch_limit_reads_the_first_files_and_counts_the_rest_in_one_row(xrays, uploads, workdir):
    archive = zip_file(uploads / "four.zip", [(f"{index}.jpg", xrays[index].read_bytes()) for index in range(4)])
    later = zip_file(uploads / "later.zip", [("a.jpg", xrays[0].read_bytes()), ("b.txt", b"text"), (".hidden", b"")])

    entries = expand_batch([xrays[5], archive, xrays[4], later, "missing.png"], workdir, max_files=3)

    assert [entry.name for entry in entries] == [xrays[5].name, "four.zip/0.jpg", "four.zip/1.jpg", "6 more files"]
    assert all(entry.error is None for entry in entries[:3])
    assert entries[3].path is None
    assert entries[3].error == ("The batch limit of 3 files was reached: 6 more files, from four.zip/2.jpg on, were "
                                "not read. Upload them in another batch.")
    assert files_in(workdir) == ["0000.jpg", "0001.jpg"]  # nothing past the limit is extracted


def test_no_uploads_is_an_input_error_and_a_missing_file_is_a_row(workdir, tmp_path):
    for nothing in ([], ()):
        with pytest.raises(InputError, match="No files were uploaded"):
            expand_batch(nothing, workdir)
    with pytest.raises(InputError, match="working folder"):
        expand_batch([tmp_path / "x.png"], tmp_path / "absent")
    with pytest.raises(InputError, match="each upload must be a file path"):
        expand_batch([("name.png", 3)], workdir)
    assert expand_batch(str(tmp_path / "lone.png"), workdir)[0].name == "lone.png"  # a single path: a batch of one
    entries = expand_batch([tmp_path / "gone.png", ("shown.png", tmp_path / "gone-too.png"), None, ""], workdir)
    assert [entry.name for entry in entries] == ["gone.png", "shown.png", "(no name)", "(no name)"]
    assert all(entry.path is None for entry in entries)
    assert entries[0].error == "The file could not be found on the server; please upload it again."
    assert entries[2].error == entries[3].error == "No file was uploaded here; please upload it again."


# -- bombs ------------------------------------------------------------------------------------------------------------
def test_a_zip_bomb_with_an_honest_header_is_refused_without_inflating(uploads, workdir):
    archive = uploads / "bomb.zip"
    archive.write_bytes(raw_zip([zero_bomb(b"lungs.png", 200 * MiB)]))
    assert archive.stat().st_size < 400_000

    entries, cost = measured(lambda: expand_batch([archive], workdir))

    refused(entries, r"^The file expands to 200 MB; the limit is 64 MB per file\.$")
    assert files_in(workdir) == []
    assert_cheap(cost, seconds=1.0, traced=2 * MiB, rss=16 * MiB)


def test_a_zip_bomb_whose_header_lies_is_stopped_at_the_declared_size_and_removed(uploads, workdir):
    """Declared 60 MB (within the limit), 200 MB inside: zipfile stops at the declared size, the checksum fails, the
    partial file is deleted."""
    archive = uploads / "liar.zip"
    archive.write_bytes(raw_zip([zero_bomb(b"lungs.png", 200 * MiB, declared_size=60 * MiB)]))
    assert zipfile.ZipFile(archive).infolist()[0].file_size == 60 * MiB

    entries, cost = measured(lambda: expand_batch([archive], workdir))

    refused(entries, "checksum does not match")
    assert files_in(workdir) == []
    assert_cheap(cost, seconds=5.0, traced=8 * MiB)


def test_the_stream_is_capped_even_if_zipfile_trusted_the_data_over_the_header(uploads, workdir, monkeypatch):
    """A zipfile that read a member to its end whatever the header says (and checked no CRC): the cap of our own
    stream stops the 200 MB bomb that declares 10 bytes at the per-file limit and deletes it; a batch budget stops
    real data that overflows it."""
    original = zipfile.ZipExtFile.__init__

    def trusting(self: zipfile.ZipExtFile, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self._left, self._expected_crc = 1 << 62, None

    monkeypatch.setattr(zipfile.ZipExtFile, "__init__", trusting)
    archive = uploads / "bomb.zip"
    archive.write_bytes(raw_zip([zero_bomb(b"lungs.png", 200 * MiB, declared_size=10)]))

    entries, cost = measured(lambda: expand_batch([archive], workdir))

    refused(entries, rf"^The file expands to more than {MAX_FILE_BYTES >> 20} MB \(the limit per file\), more than "
                     "its header says: it is refused as a decompression bomb\\.$")
    assert files_in(workdir) == []
    assert_cheap(cost, seconds=5.0, traced=8 * MiB)

    members = [zero_bomb(f"{index}.png".encode(), 3 * MiB, declared_size=10) for index in range(3)]
    archive.write_bytes(raw_zip(members))
    entries = expand_batch([archive, archive], workdir, max_extracted_bytes=5 * MiB)
    assert [entry.name for entry in entries] == ["bomb.zip/0.png", "5 more files"]
    assert entries[0].path.stat().st_size == 3 * MiB
    assert entries[1].error.startswith("The files extracted from archives reached the batch limit of 5 MB: 5 files, "
                                       "from bomb.zip/1.png on, were not extracted.")
    assert files_in(workdir) == [entries[0].path.name]


def test_the_extraction_budget_counts_real_bytes_and_loose_files_still_run(xrays, uploads, workdir):
    sizes = [path.stat().st_size for path in xrays[:3]]
    archive = zip_file(uploads / "three.zip", [(path.name, path.read_bytes()) for path in xrays[:3]],
                       compression=zipfile.ZIP_STORED)
    entries = expand_batch([archive, xrays[5]], workdir, max_extracted_bytes=sizes[0] + sizes[1] // 2)
    assert [entry.name for entry in entries] == [f"three.zip/{xrays[0].name}", "2 more files", xrays[5].name]
    assert entries[0].error is None and entries[2].path == xrays[5]
    assert "from three.zip/" + xrays[1].name in entries[1].error
    assert files_in(workdir) == ["0000.jpg"]


def test_a_header_that_says_ten_bytes_over_a_real_image_is_a_damaged_row(xrays, uploads, workdir):
    archive = zip_file(uploads / "small.zip", [("x.jpg", xrays[0].read_bytes())])
    archive.write_bytes(patch_member(archive.read_bytes(), 0, file_size=10))
    assert zipfile.ZipFile(archive).infolist()[0].file_size == 10
    refused(expand_batch([archive], workdir), "checksum does not match")
    assert files_in(workdir) == []


# -- tables of contents ----------------------------------------------------------------------------------------------
def test_200k_entries_are_refused_before_zipfile_parses_them(uploads, workdir):
    """~10 MB of central directory (200,000 entries): zipfile.ZipFile takes ~87 MB of Python objects and seconds to
    list it (measured); the guard reads 22 bytes, 56 bytes and 20 bytes."""
    archive = uploads / "many.zip"
    archive.write_bytes(raw_zip([stored("a.png", b"")], copies=200_000, zip64=True))
    assert archive.stat().st_size > 9 * MAX_DIRECTORY_BYTES

    entries, cost = measured(lambda: expand_batch([archive], workdir))

    refused(entries, r"table of contents is too large \(10 MB; the limit is 1 MB\)")
    assert_cheap(cost, seconds=0.5, traced=MiB, rss=8 * MiB)


def test_more_entries_than_the_limit_are_refused_even_when_the_count_lies(uploads, workdir):
    """1,500 entries declared honestly, and 19,000 (a 950 KB directory, within its size limit) declared as one: the
    directory is walked before zipfile parses it (zipfile would build 19,000 ZipInfo objects, ~8 MB)."""
    members = [stored("a.png", b"")]
    honest, liar = uploads / "honest.zip", uploads / "liar.zip"
    honest.write_bytes(raw_zip(members, copies=1500))
    liar.write_bytes(raw_zip(members, copies=19_000, declared_entries=1))
    for archive, count in ((honest, 1500), (liar, 19_000)):  # zipfile itself lists them all: the refusal is ours
        assert len(zipfile.ZipFile(archive).infolist()) == count
        entries, cost = measured(lambda archive=archive: expand_batch([archive], workdir))
        refused(entries, rf"^The zip archive lists {count} entries; the limit is {MAX_ARCHIVE_MEMBERS}\. Split it "
                         r"into smaller archives\.$")
        assert_cheap(cost, seconds=0.5, traced=2 * MiB)
    refused(expand_batch([honest], workdir, max_members=20), "lists 1500 entries; the limit is 20")
    assert [entry.error for entry in expand_batch([honest], workdir, max_members=1500, max_files=1)][0] is None


def test_a_zip64_record_declaring_a_terabyte_directory_is_refused(uploads, workdir):
    archive = uploads / "zip64.zip"
    archive.write_bytes(raw_zip([stored("a.png", b"")], zip64=True, zip64_directory_size=1 << 40))
    entries, cost = measured(lambda: expand_batch([archive], workdir))
    refused(entries, r"table of contents is too large \(1048576 MB")
    assert_cheap(cost, seconds=0.5, traced=MiB)


@pytest.mark.parametrize(
    ("name", "data", "pattern"),
    [
        ("notes.zip", b"These are my notes, not an archive.\n" * 20, r"^The file is named \.zip but is not a zip "
                                                                     r"archive\.$"),
        ("cut.zip", None, "incomplete or damaged: its table of contents is missing"),
        ("junk.zip", b"PK\x03\x04" + bytes(range(256)) * 8, "incomplete or damaged: its table of contents is missing"),
        ("directory.zip", "garbled", r"damaged and cannot be read \(BadZipFile\)"),
        ("tiny.zip", b"PK", "is not a zip archive"),
    ],
)
def test_archives_that_are_not_zips_or_are_damaged_are_rows(xrays, uploads, workdir, name, data, pattern):
    good = zip_file(uploads / "good.zip", [("x.jpg", xrays[0].read_bytes()), ("y.jpg", xrays[1].read_bytes())])
    if data is None:  # cut in half: the end record is gone
        data = good.read_bytes()[: good.stat().st_size // 2]
    elif data == "garbled":  # the end record intact, the directory overwritten
        raw = bytearray(good.read_bytes())
        _, _, _, _, _, size, offset, _ = struct.unpack_from("<4s4H2LH", raw, len(raw) - 22)
        raw[offset : offset + size] = b"\xee" * size
        data = bytes(raw)
    upload = uploads / name
    upload.write_bytes(data)
    entry = refused(expand_batch([upload, xrays[2]], workdir)[:1], pattern)
    assert entry.name == name
    assert files_in(workdir) == []


# -- members ----------------------------------------------------------------------------------------------------------
def test_traversal_and_absolute_names_land_in_workdir_under_generated_names(xrays, uploads, workdir, tmp_path):
    image = xrays[0].read_bytes()
    absolute = f"/tmp/batch-test-{uuid.uuid4().hex}.png"
    names = ["../../evil.jpg", absolute, "..\\..\\windows.jpg", "a/../../../deep.jpg", "same.jpg", "same.jpg"]
    (workdir / "0000.jpg").write_bytes(b"not to be overwritten")
    archive = uploads / "escape.zip"
    archive.write_bytes(raw_zip([stored(name, image) for name in names]))
    assert [info.filename for info in zipfile.ZipFile(archive).infolist()] == names

    entries = expand_batch([archive], workdir)

    assert [entry.name for entry in entries] == [f"escape.zip/{name}" for name in names]
    assert [entry.path.name for entry in entries] == ["0001.jpg", "0002.png", "0003.jpg", "0004.jpg", "0005.jpg",
                                                      "0006.jpg"]
    assert all(entry.path.parent == workdir and entry.path.read_bytes() == image for entry in entries)
    assert (workdir / "0000.jpg").read_bytes() == b"not to be overwritten"
    assert not Path(absolute).exists()
    outside = [path for path in tmp_path.rglob("*") if path.is_file() and workdir not in path.parents]
    assert sorted(path.name for path in outside) == ["escape.zip"]


def test_encrypted_linked_nested_and_unsupported_members_are_rows_naming_the_member(xrays, uploads, workdir):
    image = xrays[0].read_bytes()
    link = zipfile.ZipInfo("link.jpg")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    fifo = zipfile.ZipInfo("pipe.jpg")
    fifo.external_attr = (stat.S_IFIFO | 0o644) << 16
    inner = zip_file(uploads / "inner.zip", [("x.jpg", image)]).read_bytes()
    members = [("secret.jpg", image), (link, b"/etc/passwd"), (fifo, b""), ("inner.zip", inner),
               ("report.pdf", b"%PDF-1.4"), ("readme.TXT", b"hello"), ("ok.JPG", image)]
    archive = zip_file(uploads / "mixed.zip", members)
    archive.write_bytes(patch_member(archive.read_bytes(), 0, flags=0x1))
    with zipfile.ZipFile(uploads / "methods.zip", "w") as methods:
        methods.writestr("b.jpg", image, compress_type=zipfile.ZIP_BZIP2)
        methods.writestr("l.jpg", image, compress_type=zipfile.ZIP_LZMA)

    entries = expand_batch([archive, uploads / "methods.zip"], workdir)

    expected = {
        "mixed.zip/secret.jpg": r"^The file is encrypted \(password-protected\) in the archive and is not opened\.",
        "mixed.zip/link.jpg": r"^The archive entry is a symbolic link, not a file; links are not followed\.$",
        "mixed.zip/pipe.jpg": r"not a regular file",
        "mixed.zip/inner.zip": r"^The file is an archive inside the archive; nested archives are not opened\.",
        "mixed.zip/report.pdf": r'^Files named "\.pdf" are not read: a batch takes PNG, JPEG, BMP, TIFF, WebP and '
                                r"DICOM \(\.dcm\) files\.$",
        "mixed.zip/readme.TXT": r'^Files named "\.txt" are not read',
        "mixed.zip/ok.JPG": None,
        "methods.zip/b.jpg": r"^The file is compressed with bzip2 in the archive, which is not supported\.",
        "methods.zip/l.jpg": r"^The file is compressed with lzma in the archive, which is not supported\.",
    }
    assert [entry.name for entry in entries] == list(expected)
    for entry, pattern in zip(entries, expected.values(), strict=True):
        if pattern is None:
            assert entry.error is None and entry.path == workdir / "0000.jpg"
        else:
            assert entry.path is None and re.search(pattern, entry.error), entry
    assert files_in(workdir) == ["0000.jpg"]


def test_a_member_failing_its_crc_or_cut_short_is_a_row_and_its_partial_file_deleted(xrays, uploads, workdir):
    image = xrays[0].read_bytes()
    flipped = bytearray(image)
    flipped[len(image) // 2] ^= 0xFF
    bad_crc = stored("flipped.jpg", bytes(flipped))
    bad_crc.crc = zlib.crc32(image)
    deflated = zlib.compressobj(6, zlib.DEFLATED, -15)
    stream = deflated.compress(image) + deflated.flush()
    cut = RawMember(b"cut.jpg", stream[: len(stream) // 2], zlib.crc32(image), len(image), zipfile.ZIP_DEFLATED)
    garbage = RawMember(b"garbage.jpg", b"\xff" * 5000, zlib.crc32(image), len(image), zipfile.ZIP_DEFLATED)
    archive = uploads / "damaged.zip"
    archive.write_bytes(raw_zip([bad_crc, cut, garbage, stored("fine.jpg", image)]))

    entries = expand_batch([archive], workdir)

    assert [entry.name for entry in entries] == ["damaged.zip/flipped.jpg", "damaged.zip/cut.jpg",
                                                 "damaged.zip/garbage.jpg", "damaged.zip/fine.jpg"]
    assert entries[0].error == "The file is damaged in the archive (its checksum does not match) and was not read."
    assert re.search("checksum does not match|truncated|compressed data is damaged", entries[1].error), entries[1]
    assert entries[2].error == "The file's compressed data is damaged in the archive; it could not be extracted."
    assert entries[3].error is None and files_in(workdir) == [entries[3].path.name]
    assert_same_pixels(entries[3].path, xrays[0])


def test_long_and_control_character_names_are_shown_safely(xrays, uploads, workdir):
    name = "a\x1b[31m" + "x" * 500 + ".jpg"
    archive = zip_file(uploads / "names.zip", [(name, xrays[0].read_bytes())])
    entry = only(expand_batch([archive], workdir))
    assert len(entry.name) == 200 and "\x1b" not in entry.name and entry.name.endswith("x.jpg")
    assert entry.name.startswith("names.zip/a?[31m") and "..." in entry.name


@pytest.fixture(autouse=True)
def _no_leftovers(workdir: Path) -> Iterator[None]:
    """Nothing but the generated names ever appears in workdir."""
    yield
    assert all(re.fullmatch(r"\d{4}\.[a-z]+", name) for name in files_in(workdir)), files_in(workdir)
