"""The launched app (`python app.py`) against crafted uploads: decompression bombs of every accepted format, headers
that lie about sizes, truncated streams, polyglots, impossible values. Each file is generated here (tests/app/
crafted_files.py; none is stored), sent to `/predict` with gradio_client, and must be answered with a clear message
(never "Unexpected error") or, for the odd-but-valid ones, with probabilities. At the end: the server's peak resident
memory over the whole module (VmHWM of the server process, not of pytest) stays under 1800 MiB, it still answers a
real X-ray, and its log holds no DICOM patient data.
"""

from __future__ import annotations

import os
import random
import re
import resource
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.app import crafted_files as craft

pytestmark = pytest.mark.slow
INCOMPLETE = r"incomplete \(truncated\): "  # data shorter than declared: refused, never padded and answered
PEAK_LIMIT_BYTES = 1800 * 2**20  # measured 1568 MiB (2026-12-05, Xeon), plus a margin
LABELS = ["COVID-19", "Normal", "Pneumonia"]
STRUCTURE = "declares more structure"  # the message of the structure guards (TIFF directory, PNG chunks)
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
LOGGED_PATIENT_STRINGS = ("Doe^Jane", "SECRET-123", "19700101", "St Elsewhere", "House^Gregory", "ACC-998877")


@dataclass(frozen=True)
class Crafted:
    name: str  # file name, with the suffix the upload carries
    build: Callable[[], bytes]
    expect: str | None  # regex the error message must match; None: answered with probabilities
    summary: str | None = None  # for answered files, a regex the summary must match


def _gradient_jpeg(width: int = 256, height: int = 256, **options: object) -> bytes:
    return craft.encode(craft.gradient(width, height), "JPEG", **options)


def _dicm_jpeg() -> bytes:
    """A JPEG whose APP15 segment puts "DICM" at byte 128: the DICOM preamble test sees a DICOM file."""
    jpeg = _gradient_jpeg()
    payload = bytes(122) + b"DICM" + bytes(200)
    return jpeg[:2] + b"\xff\xef" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def _multi_segment_exif_jpeg() -> bytes:
    """A JPEG whose EXIF block is split over 300+ APP1 segments (Pillow joins them and loads the block at open):
    2000 tags all pointing at one 20 MB area. Pillow alone was killed for memory opening it (measured)."""
    block = b"Exif\x00\x00" + craft.exif_bomb(tags=2000, block=20 << 20)
    segments = [block[:65000]] + [b"Exif\x00\x00" + block[i : i + 64000] for i in range(65000, len(block), 64000)]
    jpeg = _gradient_jpeg()
    return jpeg[:2] + b"".join(b"\xff\xe1" + struct.pack(">H", len(s) + 2) + s for s in segments) + jpeg[2:]


def _png_with_exif() -> bytes:
    return craft.encode(craft.gradient(300, 200), "PNG", exif=craft.exif_bomb(tags=3000, block=4 << 20))


def _apng_claiming_frames() -> bytes:
    """An animated PNG whose acTL says 2^31 - 1 frames (it holds two)."""
    frames = [craft.gradient(), craft.gradient().transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    data = bytearray(craft.encode(frames[0], "PNG", save_all=True, append_images=frames[1:]))
    index = data.find(b"acTL")
    body = struct.pack(">II", 2**31 - 1, 0)
    data[index + 4 : index + 12] = body
    data[index + 12 : index + 16] = struct.pack(">I", zlib.crc32(b"acTL" + body) & 0xFFFFFFFF)
    return bytes(data)


def _zip_polyglot() -> bytes:
    import zipfile
    from io import BytesIO

    archive = BytesIO()
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("payload.html", "<script>alert(1)</script>" * 100)
    return craft.encode(craft.gradient(), "PNG") + archive.getvalue()


def _bad_crc_png() -> bytes:
    """A PNG whose header chunk fails its checksum (Pillow checks header chunks, not IDAT)."""
    data = bytearray(craft.encode(craft.gradient(), "PNG"))
    data[8 + 8 + 13] ^= 0xFF
    return bytes(data)


def _tiff_pages(pages: int, loop: bool = False) -> bytes:
    """A 256x256 TIFF followed by `pages` - 1 minimal directories (or a first directory that points to itself)."""
    pixels = np.asarray(craft.gradient()).tobytes()
    entries = craft.grey_tiff_entries(256, 256, len(pixels))
    if loop:
        return craft.tiff(entries, pixels, next_ifd=lambda own: own)
    first = craft.tiff(entries, pixels, next_ifd=lambda own: own + 2 + 12 * len(entries) + 4)
    directory = struct.pack("<H", len(entries))  # the same page again: every value is one SHORT or LONG
    for tag, kind, value in sorted(entries, key=lambda entry: entry[0]):
        value = 8 if value == "DATA" else value[0] if isinstance(value, list) else value
        directory += struct.pack("<HHI", tag, kind, 1) + struct.pack("<I" if kind == 4 else "<H2x", value)
    chain = bytearray(first)
    for page in range(1, pages):
        own = len(chain)
        chain += directory + struct.pack("<I", own + len(directory) + 4 if page < pages - 1 else 0)
    return bytes(chain)


def _tiff_shared_data() -> bytes:
    block = bytes(4 << 20)
    entries = craft.grey_tiff_entries(256, 256, 256 * 256)
    return craft.tiff(entries, block, shared={40000 + index: len(block) for index in range(300)})


def _tiff_strip_table(strips: int) -> bytes:
    table = struct.pack(f"<{strips}I", *([8] * strips))
    entries = [(256, 4, 256), (257, 4, 256), (258, 3, 8), (259, 3, 1), (262, 3, 1), (277, 3, 1), (278, 4, 1)]
    return craft.tiff([*entries, (273, 4, table), (279, 4, table)], bytes(256))


def _tiff_deflate_lies() -> bytes:
    """A 256x256 deflate-compressed TIFF whose single strip inflates to 512 MiB."""
    strip = craft.zeros_deflate(b"", 512 << 20, wbits=15)
    return craft.tiff(craft.grey_tiff_entries(256, 256, len(strip), compression=8), strip)


def _tiff_byte_count_lies(compression: int) -> bytes:
    """A 256x256 TIFF whose one strip claims 2 GiB of (compressed or raw) data; the file holds 1 KB of it."""
    strip = zlib.compress(bytes(1024)) if compression == 8 else bytes(1024)
    entries = craft.grey_tiff_entries(256, 256, 2**31 - 1, compression=compression)
    return craft.tiff(entries, strip)


def _tiff_huge_tile() -> bytes:
    tile = zlib.compress(bytes(64 * 64))
    entries = [(256, 4, 256), (257, 4, 256), (258, 3, 8), (259, 3, 8), (262, 3, 1), (277, 3, 1),
               (322, 4, 40000), (323, 4, 40000), (324, 4, "DATA"), (325, 4, len(tile))]
    return craft.tiff(entries, tile)


def _bigtiff_huge_count() -> bytes:
    entry = struct.pack("<HHQQ", 273, 16, 2**40, 16)
    return b"II+\x00" + struct.pack("<HHQ", 8, 0, 16) + struct.pack("<Q", 1) + entry + bytes(8)


def _tiff_many_samples() -> bytes:
    entries = [(256, 4, 64), (257, 4, 64), (258, 3, [8] * 5000), (259, 3, 1), (262, 3, 1), (273, 4, "DATA"),
               (277, 3, 5000), (278, 4, 64), (279, 4, 64 * 64 * 5000)]
    return craft.tiff(entries, bytes(64 * 64 * 5000))


def _float_ramp(special: float | None = None, scale: float = 1.0) -> bytes:
    values = (np.add.outer(np.linspace(-0.5, 0.5, 128), np.linspace(-0.5, 0.5, 128)) * scale).astype(np.float32)
    if special is not None:
        values[5:9, 5:9] = special
    return craft.float_tiff(values)


def _animated_webp(canvas: int | None) -> bytes:
    frames = [craft.gradient(128, 128, "RGB"), craft.gradient(128, 128, "RGB").transpose(Image.Transpose.ROTATE_90)]
    data = craft.encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    return craft.webp_with_canvas(data, canvas, canvas) if canvas else data


def _rle8_bmp(side: int) -> bytes:
    return craft.bmp(side, side, b"\x00\x01", bits=8, compression=1)  # RLE8: end of bitmap at once


def _sequence_bomb(items: int) -> bytes:
    bomb = craft.element(0x0008, 0x1140, b"SQ", craft.item() * items + craft.SEQUENCE_END, 0xFFFFFFFF)
    return craft.dicom(before_pixels=bomb)


def _elements_bomb(count: int) -> bytes:
    elements = b"".join(struct.pack("<HH2sH", 0x0011, 0x1000 + index % 0xEFFF, b"US", 0) for index in range(count))
    bomb = craft.element(0x0008, 0x1140, b"SQ", craft.item(elements + craft.ITEM_END, 0xFFFFFFFF)
                         + craft.SEQUENCE_END, 0xFFFFFFFF)
    return craft.dicom(before_pixels=bomb)


def _nested(depth: int) -> bytes:
    nested = b""
    for _ in range(depth):
        nested = craft.element(0x0008, 0x1140, b"SQ", craft.item(nested + craft.ITEM_END, 0xFFFFFFFF)
                               + craft.SEQUENCE_END, 0xFFFFFFFF)
    return craft.dicom(before_pixels=nested)


def _meta_sequence() -> bytes:
    data = craft.dicom()
    head, body = craft.split_meta(data)
    sequence = craft.element(0x0002, 0x0100, b"SQ", craft.item() * 1000 + craft.SEQUENCE_END, 0xFFFFFFFF)
    return head + sequence + body


def _jpeg_frames_dicom(frame: bytes, frames: int = 1, rows: int = 64, columns: int = 64, syntax: str = "") -> bytes:
    from pydicom.uid import JPEGBaseline8Bit

    return craft.dicom(rows, columns, bits=8, frames=frames if frames > 1 else None,
                       pixel_data=craft.encapsulate([frame] * frames), syntax=syntax or JPEGBaseline8Bit)


def _rle_bomb() -> bytes:
    from pydicom.uid import RLELossless

    segment = b"\x81\x00" * (2 << 20)  # 4 MiB of runs, each 128 zeros: 256 MiB for a 64x64 frame
    return craft.dicom(bits=8, pixel_data=craft.encapsulate([craft.rle_frame([segment])]), syntax=RLELossless)


def _j2k_larger() -> bytes:
    from pydicom.uid import JPEG2000Lossless

    return _jpeg_frames_dicom(craft.j2k(craft.gradient(1000, 1000)), syntax=JPEG2000Lossless)


def _voi_lut(descriptor: list[int], data: bytes, vr: bytes = b"OW") -> bytes:
    lut = craft.element(0x0028, 0x3002, b"US", struct.pack("<3H", *descriptor))
    lut += craft.element(0x0028, 0x3006, vr, data)
    return craft.dicom(before_pixels=craft.element(0x0028, 0x3010, b"SQ", craft.item(lut)))


def _ds(group: int, number: int, text: str) -> bytes:
    value = text.encode()
    return craft.element(group, number, b"DS", value + b" " * (len(value) % 2))


def _window(width: str) -> bytes:
    return craft.dicom(before_pixels=_ds(0x0028, 0x1050, "100") + _ds(0x0028, 0x1051, width))


def _ramp_dicom(**tags: object) -> bytes:
    ramp = (np.add.outer(np.arange(256), np.arange(256)) * 8).astype(np.uint16)
    return craft.dicom(256, 256, pixel_data=ramp.tobytes(), **tags)


def _mpeg_dicom() -> bytes:
    from pydicom.uid import MPEG2MPML

    return craft.dicom(bits=8, pixel_data=craft.encapsulate([bytes(1000)]), syntax=MPEG2MPML)


def _short_idat_png(fraction: int) -> bytes:
    """A 512x512 noise PNG whose (valid, closed) zlib stream holds only 1/`fraction` of the rows."""
    rows = np.random.default_rng(0).integers(0, 256, (512, 512), dtype=np.uint8)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows[: 512 // fraction])
    return craft.png(512, 512, idat=zlib.compress(raw))


def _png_in_many_idats(chunks: int = 1000) -> bytes:
    data = craft.encode(craft.gradient(300, 300), "PNG")
    start = data.index(b"IDAT") - 4
    (length,) = struct.unpack(">I", data[start : start + 4])
    idat = data[start + 8 : start + 8 + length]
    step = -(-len(idat) // chunks)
    pieces = [craft.png_chunk(b"IDAT", idat[i : i + step]) for i in range(0, len(idat), step)]
    return data[:start] + b"".join(pieces) + data[start + 12 + length :]


def _many_scans_jpeg(scans: int = 300) -> bytes:
    """A JPEG with its one scan (and tables) repeated `scans` times: refused before any decoding pass."""
    data = _gradient_jpeg(256, 256)
    tables = data.index(b"\xff\xc4")  # DHT ... SOS, data, up to EOI
    return data[:tables] + data[tables:-2] * scans + b"\xff\xd9"


def _random(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


CASES = [
    # PNG
    Crafted("declared-400mp.png", lambda: craft.png(20_000, 20_000, depth=1), r"too large \(400 megapixels"),
    Crafted("between-limits-64mp.png", lambda: craft.png(8000, 8000), r"64 megapixels"),
    Crafted("strip-40000x64.png", lambda: craft.png(40_000, 64), "too large"),
    Crafted("rgb-49mp-zeros.png", lambda: craft.png(7000, 7000, colour=2), None, "reduced to 2334x2334"),
    Crafted("grey16-49mp-zeros.png", lambda: craft.png(7000, 7000, depth=16), None, "reduced to 3500x3500"),
    Crafted("ihdr-lies-rows-missing.png", lambda: craft.png(7000, 7000, idat=zlib.compress(bytes(10 * 7001))),
            INCOMPLETE + "its PNG image data ends after 0%"),  # Pillow would fill the missing rows with black
    Crafted("idat-ends-at-a-quarter.png", lambda: _short_idat_png(4), INCOMPLETE + "its PNG image data ends after 2"),
    # valid files the completeness checks must leave alone: IDAT split into 1000 chunks, bytes after IEND
    Crafted("idat-in-1000-chunks.png", _png_in_many_idats, None),
    Crafted("bytes-after-iend.png", lambda: _png_in_many_idats(1) + b"trailing bytes" * 100, None),
    Crafted("200k-text-chunks.png", lambda: craft.png(
        64, 64, before_idat=[craft.png_chunk(b"tEXt", b"k%d\x00v" % index) for index in range(200_000)]), STRUCTURE),
    Crafted("text-chunk-30mb.png", lambda: craft.png(64, 64, before_idat=[craft.png_chunk(
        b"tEXt", b"Comment\x00" + b"x" * (30 << 20))]), None),  # Pillow keeps up to 64 MB of text: bounded
    Crafted("ztxt-bomb.png", lambda: craft.png(64, 64, before_idat=[craft.png_chunk(
        b"zTXt", b"Comment\x00\x00" + craft.zeros_deflate(b"", 100 << 20, wbits=15))]), "damaged"),
    Crafted("iccp-bomb.png", lambda: craft.png(64, 64, before_idat=[craft.png_chunk(
        b"iCCP", b"icc\x00\x00" + craft.zeros_deflate(b"", 100 << 20, wbits=15))]), "damaged"),
    Crafted("exif-bomb-rotated.png", _png_with_exif, None, "200x300 px"),
    Crafted("apng-claims-2g-frames.png", _apng_claiming_frames, None, "2147483647 frames; the first one was used"),
    Crafted("png-zip-polyglot.png", _zip_polyglot, None),
    Crafted("html-with-png-magic.png", lambda: b"\x89PNG\r\n\x1a\n<html><script>alert(1)</script></html>" * 20,
            "starts like a PNG image but is damaged"),
    Crafted("bad-crc.png", _bad_crc_png, "damaged"),
    # TIFF
    Crafted("declared-10gp.tif", lambda: craft.tiff(craft.grey_tiff_entries(100_000, 100_000, 64), bytes(64)),
            r"too large \(10000 megapixels"),
    Crafted("tags-share-4mb-data.tif", _tiff_shared_data, STRUCTURE),
    Crafted("strip-table-1m.tif", lambda: _tiff_strip_table(1_000_000), STRUCTURE),
    Crafted("strip-table-lies-100k.tif", lambda: _tiff_strip_table(100_000), STRUCTURE),
    Crafted("deflate-strip-inflates-512mib.tif", _tiff_deflate_lies, None),
    Crafted("tile-40000x40000.tif", _tiff_huge_tile, STRUCTURE),
    Crafted("deflate-strip-claims-2gib.tif", lambda: _tiff_byte_count_lies(8), "damaged|truncated"),
    Crafted("raw-strip-claims-2gib.tif", lambda: _tiff_byte_count_lies(1), "damaged|truncated"),
    Crafted("5000-pages.tif", lambda: _tiff_pages(5000), None, "several pages; the first one was used"),
    Crafted("directory-loop.tif", lambda: _tiff_pages(1, loop=True), None, "several pages"),
    Crafted("float-nan.tif", lambda: _float_ramp(float("nan")), r"not numbers \(NaN\)"),
    Crafted("float-inf.tif", lambda: _float_ramp(float("inf")), "infinite"),
    Crafted("float-3e38-range.tif", lambda: _float_ramp(scale=3e38), None),
    Crafted("truncated.tif", lambda: craft.encode(craft.gradient(512, 512), "TIFF")[:60_000], "incomplete"),
    Crafted("cmyk.tif", lambda: craft.encode(craft.gradient(256, 256, "CMYK"), "TIFF"), None, "CMYK"),
    Crafted("bigtiff-2p40-values.tif", _bigtiff_huge_count, STRUCTURE),
    Crafted("5000-samples.tif", _tiff_many_samples, "damaged|not supported"),
    # JPEG
    Crafted("declared-4gp.jpg", lambda: craft.jpeg_with_size(_gradient_jpeg(), 65_000, 65_000),
            r"too large \(4225 megapixels"),
    Crafted("sof-lies-49mp.jpg", lambda: craft.jpeg_with_size(_gradient_jpeg(), 7000, 7000),
            INCOMPLETE + "its JPEG data"),  # libjpeg would stop at the end marker and pad with grey
    Crafted("xray-sof-lies-7000.jpg", lambda: craft.jpeg_with_size(min(EXAMPLES.glob("normal-nih-*.jpg")).read_bytes(),
                                                                   7000, 7000), INCOMPLETE + "its JPEG data"),
    Crafted("300-scans.jpg", _many_scans_jpeg, r"more than 64 JPEG scans"),  # each scan: one more decoding pass
    Crafted("progressive.jpg", lambda: _gradient_jpeg(512, 512, progressive=True), None),  # 6 scans: fine
    Crafted("truncated.jpg", lambda: min(EXAMPLES.glob("normal-*.jpg")).read_bytes()[:20_000], "incomplete"),
    Crafted("exif-bomb-in-one-segment.jpg", lambda: craft.jpeg_with_exif(
        _gradient_jpeg(300, 200), craft.exif_bomb(tags=2700, block=32_000)), STRUCTURE),  # 86 MB for Pillow
    Crafted("exif-rotated.jpg", lambda: craft.jpeg_with_exif(_gradient_jpeg(300, 200), craft.exif_bomb(3, 64)), None,
            "200x300 px"),
    Crafted("exif-split-over-300-segments.jpg", _multi_segment_exif_jpeg, STRUCTURE),
    Crafted("dicm-preamble.jpg", _dicm_jpeg, "DICOM"),
    Crafted("cmyk.jpg", lambda: craft.encode(craft.gradient(256, 256, "CMYK"), "JPEG"), None, "CMYK"),
    # WebP
    Crafted("animated-canvas-268mp.webp", lambda: _animated_webp(16383), r"too large \(268 megapixels"),
    Crafted("animated-canvas-81mp.webp", lambda: _animated_webp(9000), r"81 megapixels"),
    Crafted("animated-canvas-49mp.webp", lambda: _animated_webp(7000), "Animated WebP images are limited"),
    Crafted("animated-canvas-12mp.webp", lambda: _animated_webp(3500), None, "2 frames; the first one was used"),
    Crafted("exif-bomb.webp", lambda: craft.encode(craft.gradient(300, 200, "RGB"), "WEBP",
                                                   exif=craft.exif_bomb(tags=300, block=4 << 20)), None),
    Crafted("truncated.webp", lambda: craft.encode(craft.gradient(), "WEBP", quality=90)[:600], "damaged|truncated"),
    # BMP
    Crafted("declared-10gp.bmp", lambda: craft.bmp(100_000, 100_000, bytes(64)), r"too large \(10000 megapixels"),
    Crafted("rle8-49mp-empty.bmp", lambda: _rle8_bmp(7000), "damaged"),
    Crafted("truncated.bmp", lambda: craft.encode(craft.gradient(), "BMP")[:30_000], "truncated|damaged"),
    Crafted("huge-palette.bmp", lambda: craft.bmp(64, 64, bytes(64 * 64), colours=2**31 - 1), "damaged"),
    # DICOM
    Crafted("deflate-bomb-2gib.dcm", lambda: craft.deflate_bomb(2048), "inflates to more than"),
    Crafted("deflated-100mib-for-64x64.dcm", lambda: craft.deflate_bomb(100), None),
    Crafted("1m-empty-items.dcm", lambda: _sequence_bomb(1_000_000), "too complex"),
    Crafted("1m-elements-in-an-item.dcm", lambda: _elements_bomb(1_000_000), "too complex"),
    Crafted("charset-8mb.dcm", lambda: craft.dicom(before_pixels=craft.element(
        0x0008, 0x0005, b"UC", b"AB\\" * (3 << 20) + b"AB")), "too complex"),
    Crafted("meta-sequence.dcm", _meta_sequence, "meta information is damaged"),
    Crafted("nested-5000-deep.dcm", lambda: _nested(5000), "damaged"),
    Crafted("window-list-8mb.dcm", lambda: craft.dicom(before_pixels=craft.element(
        0x0028, 0x1051, b"UN", b"1\\" * (4 << 20))), "impossible value"),
    Crafted("jpeg-frame-larger-than-rows.dcm", lambda: _jpeg_frames_dicom(_gradient_jpeg(2000, 2000)),
            "header says 64x64"),
    Crafted("jpeg-sof-60000.dcm", lambda: _jpeg_frames_dicom(craft.jpeg_with_size(_gradient_jpeg(64, 64), 60_000,
                                                                                 60_000)), "header says 64x64"),
    Crafted("rle-bomb-256mib.dcm", _rle_bomb, "decodes to more than"),
    Crafted("j2k-larger-than-rows.dcm", _j2k_larger, "header says 64x64"),
    Crafted("2000-frames.dcm", lambda: craft.dicom(frames=2000), None, "2000 frames; the first one was used"),
    Crafted("500-jpeg-frames.dcm", lambda: _jpeg_frames_dicom(_gradient_jpeg(64, 64), frames=500), None,
            "500 frames"),
    Crafted("frames-2g.dcm", lambda: craft.dicom(frames=2**31 - 1, pixel_data=bytes(64 * 64 * 2)),
            "incomplete"),  # 2**31 frames declared, one frame of pixel data
    Crafted("rows-60000.dcm", lambda: craft.dicom(60_000, 60_000, pixel_data=bytes(64)), "too large"),
    Crafted("window-width-0.dcm", lambda: _window("0"), "Window Width must be a positive number"),
    Crafted("window-width-negative.dcm", lambda: _window("-50"), "Window Width must be a positive number"),
    Crafted("window-width-text.dcm", lambda: _window("abc"), "WindowWidth is not a valid number"),
    Crafted("voi-lut-nonsense.dcm", lambda: _voi_lut([4096, 0, 40], bytes(20)), "LUT descriptor"),
    Crafted("lut-data-8mb.dcm", lambda: _voi_lut([4096, 0, 12], bytes(8 << 20), b"UN"), "malformed item"),
    Crafted("rescale-nan.dcm", lambda: craft.dicom(before_pixels=_ds(0x0028, 0x1052, "0") + _ds(0x0028, 0x1053,
                                                                                              "nan")),
            "RescaleSlope is not a valid number"),
    Crafted("rescale-overflow.dcm", lambda: _ramp_dicom(RescaleSlope="1e308", RescaleIntercept="0"), "infinite"),
    Crafted("truncated-pixels.dcm", lambda: craft.dicom(256, 256, pixel_data=bytes(1000)), "incomplete"),
    Crafted("jpeg-lossless.dcm", lambda: _jpeg_frames_dicom(_gradient_jpeg(64, 64), syntax="1.2.840.10008.1.2.4.70"),
            "no decoder for it is installed"),
    Crafted("mpeg2.dcm", _mpeg_dicom, "not supported"),
    Crafted("offset-table-8mb.dcm", lambda: craft.dicom(bits=8, syntax="1.2.840.10008.1.2.4.50", pixel_data=(
        craft.encapsulate([_gradient_jpeg(64, 64)], offset_table=bytes(8 << 20)))), "offset table"),
    Crafted("1m-fragments.dcm", lambda: craft.dicom(bits=8, syntax="1.2.840.10008.1.2.4.50", pixel_data=(
        craft.item() + craft.item() * 1_000_000 + craft.SEQUENCE_END)), "too complex"),
    Crafted("patient-tags.dcm", lambda: _ramp_dicom(WindowCenter=1000, WindowWidth=2000), None, "DICOM, 256x256"),
    Crafted("garbage.dcm", lambda: _random(100_000, 1), "DICOM"),
    # anything
    Crafted("zero-bytes.png", lambda: b"", "empty"),
    Crafted("random-1mb.png", lambda: _random(1 << 20, 2), "not a readable image"),
    Crafted("zip-renamed.png", lambda: _zip_polyglot()[_zip_polyglot().find(b"PK\x03\x04"):], "archive"),
    Crafted("pdf-renamed.jpg", lambda: b"%PDF-1.7\n" + _random(5000, 3), "PDF"),
    Crafted("gif-renamed.png", lambda: craft.encode(craft.gradient(), "GIF"), "GIF images are not supported"),
    Crafted("text.jpg", lambda: b"name,finding\nDoe,normal\n" * 100, "contains text"),
]


# -- the server ----------------------------------------------------------------------------------------------------
def server_pid(url: str) -> int:
    """The `python app.py --port N` child of this test process serving `url` (found in /proc by its port)."""
    port = url.rsplit(":", 1)[1]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            arguments = (entry / "cmdline").read_bytes().split(b"\x00")
            status = (entry / "status").read_text()
        except OSError:
            continue
        parent = int(re.search(r"^PPid:\s+(\d+)", status, re.M).group(1))
        if parent == os.getpid() and b"app.py" in arguments and port.encode() in arguments:
            return int(entry.name)
    raise AssertionError(f"no app.py child of pytest serves port {port}")


def memory_kib(pid: int, field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M).group(1))


SERVER_DATA_LIMIT = 6 * 2**30  # a safety net: a regression fails here with MemoryError instead of taking the machine


@pytest.fixture(scope="module")
def server_settings() -> Iterator[tuple[int, int]]:
    """What the server started by `tiny_app_url` inherits: no per-client rate limits (~80 uploads in a minute from
    one client would mostly be answered "please wait"), and a data-segment limit. Yields this process's own limit,
    which `server` restores once the server runs."""
    saved = resource.getrlimit(resource.RLIMIT_DATA)
    own = memory_kib(os.getpid(), "VmData") * 1024
    limit = max(SERVER_DATA_LIMIT, own + 2 * 2**30)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CNN_LSTM_RATE_LIMITS", "off")
        hard = saved[1]
        resource.setrlimit(resource.RLIMIT_DATA, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
        try:
            yield saved
        finally:
            resource.setrlimit(resource.RLIMIT_DATA, saved)


@pytest.fixture(scope="module")
def server(server_settings: tuple[int, int], tiny_app_url: str) -> dict:
    from gradio_client import Client

    resource.setrlimit(resource.RLIMIT_DATA, server_settings)  # the limit was for the server only
    pid = server_pid(tiny_app_url)
    return {"url": tiny_app_url, "pid": pid, "client": Client(tiny_app_url, verbose=False),
            "startup_peak_kib": memory_kib(pid, "VmHWM"), "started": time.monotonic(), "largest": []}


def predict(client, path: Path, timeout: float = 180) -> tuple[dict, str]:
    from gradio_client import handle_file

    return client.submit(handle_file(str(path)), api_name="/predict").result(timeout=timeout)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_crafted_upload_is_answered_clearly(server, tmp_path, case):
    from gradio_client.exceptions import AppError

    path = tmp_path / case.name
    path.write_bytes(case.build())
    assert path.stat().st_size < 64 * 2**20  # under the upload limit: the decoders are what is tested
    before = memory_kib(server["pid"], "VmHWM")
    if case.expect is None:
        label, summary = predict(server["client"], path)
        assert label["label"] in LABELS, summary
        assert case.summary is None or re.search(case.summary, summary), summary
    else:
        with pytest.raises(AppError) as caught:
            predict(server["client"], path)
        message = str(caught.value)
        assert "Unexpected error" not in message and "Traceback" not in message, message
        assert re.search(case.expect, message), message
    server["largest"].append((memory_kib(server["pid"], "VmHWM") - before, case.name))


def test_server_memory_stayed_bounded_and_it_still_serves(server, example_xrays):
    """Run after the crafted files (file order): the server's peak RSS over the whole module, its answer to a real
    X-ray, and a log without the crafted DICOM files' patient data."""
    label, summary = predict(server["client"], example_xrays["normal"][0])
    assert label["label"] in LABELS and "not for diagnosis" in summary
    peak = memory_kib(server["pid"], "VmHWM")
    steps = sorted(server["largest"], reverse=True)[:5]
    print(f"\nhostile uploads: {len(server['largest'])} crafted files in {time.monotonic() - server['started']:.0f} s;"
          f" server peak RSS (VmHWM) {peak / 1024:.0f} MiB, {server['startup_peak_kib'] / 1024:.0f} MiB after "
          f"startup; largest rises (MiB): {[(round(kib / 1024), name) for kib, name in steps if kib]}")
    assert peak * 1024 < PEAK_LIMIT_BYTES, f"server peak RSS {peak / 1024:.0f} MiB"
    log = Path(os.readlink(f"/proc/{server['pid']}/fd/1")).read_text(errors="replace")  # app_server's server.log
    assert "DICOM" in log or "predict" in log or log  # the log exists and was written to
    assert not [text for text in LOGGED_PATIENT_STRINGS if text in log]


def test_crafted_case_count():
    assert len(CASES) >= 40 and len({case.name for case in CASES}) == len(CASES)
