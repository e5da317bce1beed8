"""What an image file says about itself, read from its bytes before any decoder runs.

Decoders size their buffers from what the file declares, and some declarations cost far more memory than the file
holds: TIFF tags that all point at one large block (Pillow reads the block once per tag), strip tables of millions of
entries, an RLE segment that expands 64-fold, a JPEG frame inside a DICOM file that is larger than the Rows/Columns
the file states. These functions read such declarations with small, bounded reads and report them; the policy (what
is too much, what the user is told) lives in `uploads` and `dicom_upload`.

No Pillow or pydicom here: plain `struct` parsing, every loop bounded by the bytes at hand.
"""

from __future__ import annotations

import contextlib
import io
import re
import struct
import zlib
from dataclasses import dataclass
from typing import BinaryIO


class Malformed(Exception):
    """The bytes break the format's own rules; the message names the rule (technical, never header values)."""


class TooComplex(Exception):
    """The structure is valid but declares more than a reader may allocate for it; the message says what."""


class Incomplete(Exception):
    """The file declares more image data than it holds: a decoder would fill the rest (black, grey) and answer."""


# -- deflate (DICOM Deflated Explicit VR Little Endian) ----------------------------------------------------------
def inflate_raw(source: BinaryIO, limit: int, sink: BinaryIO, chunk: int = 1 << 20) -> int:
    """Inflate the raw deflate stream in `source` into `sink`, at most `limit` bytes; the inflated size.

    Output is produced `chunk` bytes at a time (`max_length`), so a stream that inflates 1000-fold never exists in
    memory beyond `limit` + `chunk`. Raises TooComplex past `limit`, Malformed for a broken stream.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    try:
        while not inflater.eof:
            data = inflater.unconsumed_tail or source.read(chunk)
            output = inflater.decompress(data, chunk)  # b"" in: flushes what zlib still holds
            if not data and not output:
                break  # truncated: what was inflated is handed on, and pydicom says what is missing
            total += len(output)
            if total > limit:
                raise TooComplex(f"inflates to more than {limit} bytes")
            sink.write(output)
    except zlib.error:
        raise Malformed("broken deflate stream") from None
    return total


# -- JPEG / JPEG-LS frame header ---------------------------------------------------------------------------------
_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}  # F7: JPEG-LS
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM and RSTn carry no length


def jpeg_frame(data: bytes) -> tuple[int, int, int]:
    """(height, width, components) from the first SOF marker of a JPEG or JPEG-LS codestream."""
    if data[:2] != b"\xff\xd8":
        raise Malformed("no JPEG start-of-image marker")
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            raise Malformed("JPEG marker expected")
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in _STANDALONE:
            position += 2
            continue
        if marker in (0xD9, 0xDA):
            raise Malformed("JPEG scan before its frame header")
        (length,) = struct.unpack_from(">H", data, position + 2)
        if marker in _SOF_MARKERS:
            if position + 10 > len(data):
                break
            height, width, components = struct.unpack_from(">HHB", data, position + 5)
            return height, width, components
        position += 2 + length
    raise Malformed("no JPEG frame header")


# -- JPEG 2000 image and size marker -----------------------------------------------------------------------------
def j2k_frame(data: bytes) -> tuple[int, int, int]:
    """(height, width, components) from the SIZ marker of a JPEG 2000 codestream (bare, or inside a JP2 file)."""
    start = data.find(b"\xff\x4f\xff\x51", 0, 1 << 20)  # SOC then SIZ, at the start of every codestream
    if start < 0 or start + 42 > len(data):
        raise Malformed("no JPEG 2000 size marker")
    x_size, y_size, x_offset, y_offset = struct.unpack_from(">IIII", data, start + 8)
    (components,) = struct.unpack_from(">H", data, start + 40)
    if x_offset >= x_size or y_offset >= y_size:
        raise Malformed("JPEG 2000 image offset outside the image")
    return y_size - y_offset, x_size - x_offset, components


# -- DICOM RLE Lossless ------------------------------------------------------------------------------------------
def rle_segments(frame: bytes) -> list[tuple[int, int]]:
    """(start, end) of each segment of one RLE Lossless frame (DICOM PS3.5 Annex G), from its 64-byte header."""
    if len(frame) < 64:
        raise Malformed("RLE header missing")
    count, *offsets = struct.unpack_from("<16I", frame)
    if not 1 <= count <= 15:
        raise Malformed("RLE segment count outside 1..15")
    starts = offsets[:count]
    if starts[0] != 64 or any(b <= a for a, b in zip(starts, starts[1:], strict=False)) or starts[-1] > len(frame):
        raise Malformed("RLE segment offsets out of order or outside the frame")
    return list(zip(starts, [*starts[1:], len(frame)], strict=True))


def rle_decoded_length(segment: bytes | memoryview, cap: int) -> int:
    """How many bytes one RLE segment decodes to, counting without decoding; stops once past `cap` (a segment of
    n bytes can claim 64n). Follows pydicom's decoder, which tolerates a run cut short by the segment's end."""
    size, position, decoded = len(segment), 0, 0
    while position < size and decoded <= cap:
        header = segment[position]
        position += 1
        if header > 128:  # replicate the next byte 257 - header times
            decoded += (257 - header) if position < size else 0
            position += 1
        elif header < 128:  # copy the next header + 1 bytes
            decoded += min(header + 1, size - position)
            position += header + 1
    return decoded


# -- TIFF image file directory -----------------------------------------------------------------------------------
_TIFF_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8,
                    18: 8}
_TIFF_BYTES_TYPES = {1, 2, 6, 7}  # BYTE, ASCII, SBYTE, UNDEFINED: Pillow keeps these as bytes/str, not tuples
MAX_TIFF_TAGS = 4096  # a GeoTIFF or DNG carries a few hundred
MAX_TIFF_VALUES = 1 << 18  # numbers in one tag (a 16-bit TransferFunction has 3 x 65536); ~36 bytes each in Pillow
MAX_TIFF_BLOCKS = 1 << 17  # strips or tiles: one per row of a 30000-row image, x4 planes, fits


@dataclass(frozen=True)
class TiffLayout:
    width: int
    height: int
    samples: int
    more_frames: bool  # a second image file directory follows (multi-page)
    orientation: int


def _read_exact(stream: BinaryIO, offset: int, size: int) -> bytes:
    stream.seek(offset)
    data = stream.read(size)
    if len(data) != size:
        raise Malformed("TIFF structure runs past the end of the file")
    return data


def _first_directory(stream: BinaryIO, file_size: int) -> tuple[dict[int, int], dict[int, int], bool]:
    """(scalar values, value counts, another directory follows) of a TIFF-structured stream's first directory
    (a TIFF file, an EXIF block, a JPEG's MPF index), after the checks every reader of it needs."""
    head = _read_exact(stream, 0, 16 if file_size >= 16 else 8)
    order = {b"II": "<", b"MM": ">"}.get(head[:2])
    if order is None:
        raise Malformed("no TIFF byte-order mark")
    (magic,) = struct.unpack_from(order + "H", head, 2)
    if magic == 42:  # directory: entry count, entries (tag, type, value count, value or offset), next offset
        offset_format, entries_format, entry_size, inline = "I", "H", 12, 4
        (first,) = struct.unpack_from(order + "I", head, 4)
    elif magic == 43 and len(head) >= 16:  # BigTIFF: 64-bit counts and offsets
        offset_format, entries_format, entry_size, inline = "Q", "Q", 20, 8
        (first,) = struct.unpack_from(order + "Q", head, 8)
    else:
        raise Malformed("not a TIFF header")
    count_size = struct.calcsize(entries_format)
    (entries,) = struct.unpack(order + entries_format, _read_exact(stream, first, count_size))
    if entries == 0:
        raise Malformed("empty TIFF directory")
    if entries > MAX_TIFF_TAGS:
        raise TooComplex(f"{entries} TIFF tags (at most {MAX_TIFF_TAGS})")
    offset_size = struct.calcsize(offset_format)
    table = _read_exact(stream, first + count_size, entries * entry_size + offset_size)
    scalars: dict[int, int] = {}
    counts: dict[int, int] = {}
    external = 0
    for index in range(entries):
        tag, kind, count, value = struct.unpack_from(f"{order}HH{offset_format}{inline}s", table, index * entry_size)
        if kind not in _TIFF_TYPE_SIZES:
            continue  # Pillow skips tags of unknown type
        size = count * _TIFF_TYPE_SIZES[kind]
        counts[tag] = count
        if kind not in _TIFF_BYTES_TYPES and count > MAX_TIFF_VALUES:
            raise TooComplex(f"a TIFF tag with {count} values (at most {MAX_TIFF_VALUES})")
        if size > inline:
            (data_offset,) = struct.unpack(order + offset_format, value)
            if data_offset + size > file_size:
                raise Malformed("TIFF tag data runs past the end of the file")
            external += size
        elif count == 1 and kind in (3, 4, 16):  # SHORT, LONG, LONG8 scalars: sizes, layout
            scalars[tag] = struct.unpack_from(order + {3: "H", 4: "I", 16: "Q"}[kind], value)[0]
    if external > 2 * file_size + (1 << 16):  # slack: a quirky writer may let two tags share a little
        raise TooComplex("TIFF tags share their data (together far larger than the file)")
    (next_directory,) = struct.unpack_from(order + offset_format, table, entries * entry_size)
    return scalars, counts, next_directory != 0


def tiff_layout(stream: BinaryIO, file_size: int) -> TiffLayout:
    """Check the first image file directory of a TIFF before Pillow reads it, and return its layout.

    Refused (TooComplex): more tags than any real file has, a numeric tag with more values than a Python tuple
    should hold, tags whose data together exceed the file (they overlap: Pillow reads the shared block once per tag),
    strip/tile tables longer than the image needs, tiles far larger than the image. Only the first page is looked at:
    the app never decodes another.
    """
    scalars, counts, more_frames = _first_directory(stream, file_size)
    width, height = scalars.get(256, 0), scalars.get(257, 0)
    samples = scalars.get(277, 1)
    planes = samples if scalars.get(284, 1) == 2 else 1
    if 322 in scalars or 324 in counts:  # tiled
        tile_width, tile_height = scalars.get(322, 0), scalars.get(323, 0)
        if not tile_width or not tile_height:
            raise Malformed("TIFF tile size missing")
        if tile_width * tile_height > max(4 * width * height, 1 << 20):
            raise TooComplex(f"TIFF tiles of {tile_width}x{tile_height} for a {width}x{height} image")
        needed = -(-width // tile_width) * -(-height // tile_height) * planes
        tables = (counts.get(324, 0), counts.get(325, 0))
    else:
        rows_per_strip = min(scalars.get(278, height) or height, height) or 1
        needed = -(-height // rows_per_strip) * planes
        tables = (counts.get(273, 0), counts.get(279, 0))
    if max(tables) > max(needed, 1) or needed > MAX_TIFF_BLOCKS:
        raise TooComplex(f"TIFF strip/tile table of {max(tables)} entries where the image needs {needed}")
    return TiffLayout(width, height, samples, more_frames, scalars.get(274, 1))


def check_ifd_block(block: bytes) -> None:
    """TooComplex when a TIFF-structured metadata block (EXIF, a JPEG's MPF index) would make Pillow read more than
    the block holds; a malformed block is left alone (Pillow ignores one)."""
    if len(block) >= 8:
        with contextlib.suppress(Malformed):
            _first_directory(io.BytesIO(block), len(block))


# -- JPEG metadata segments --------------------------------------------------------------------------------------
def jpeg_metadata(stream: BinaryIO, file_size: int) -> tuple[bytes, bytes]:
    """(EXIF, MPF index) of a JPEG file as Pillow assembles them while opening it: every APP1 Exif segment
    concatenated (so the EXIF block is not limited to one 64 KB segment, and Pillow loads it at open to look for a
    DPI), the last APP2 MPF segment. Reads segment headers up to the first scan."""
    exif, mpf = [], b""
    position = 2
    while position + 4 <= file_size:
        stream.seek(position)
        marker, length = struct.unpack(">2sH", stream.read(4))
        if marker[0] != 0xFF or marker[1] in (0xD9, 0xDA):
            break
        if marker[1] == 0xFF:  # fill byte
            position += 1
            continue
        if marker[1] in _STANDALONE:
            position += 2
            continue
        if marker[1] in (0xE1, 0xE2):
            payload = stream.read(max(length - 2, 0))
            if marker[1] == 0xE1 and payload.startswith(b"Exif\x00\x00"):
                exif.append(payload[6:])
            elif marker[1] == 0xE2 and payload.startswith(b"MPF\x00"):
                mpf = payload[4:]
        position += 2 + length
    return b"".join(exif), mpf


# -- PNG chunks --------------------------------------------------------------------------------------------------
MAX_PNG_TEXT_CHUNKS = 1024  # Pillow keeps every text chunk as a dict entry; encoders write a handful
MAX_PNG_CHUNKS = 1 << 18  # 8 KB IDAT chunks (libpng's size) fill 64 MB with 8192; each costs Pillow a Python call


def png_chunk_counts(stream: BinaryIO, file_size: int) -> tuple[int, int]:
    """(chunks, text chunks) of a PNG, by walking chunk headers (8 bytes each, data skipped); TooComplex past
    MAX_PNG_CHUNKS or MAX_PNG_TEXT_CHUNKS. Malformed chunk lengths are left to Pillow to report."""
    position, chunks, texts = 8, 0, 0
    while position + 8 <= file_size:
        stream.seek(position)
        header = stream.read(8)
        if len(header) < 8:
            break
        length, kind = struct.unpack(">I4s", header)
        chunks += 1
        texts += kind in (b"tEXt", b"zTXt", b"iTXt")
        if chunks > MAX_PNG_CHUNKS or texts > MAX_PNG_TEXT_CHUNKS:
            raise TooComplex(f"{chunks} PNG chunks, {texts} of them text (at most {MAX_PNG_CHUNKS} and "
                             f"{MAX_PNG_TEXT_CHUNKS})")
        if kind == b"IEND":
            break
        position += 12 + length
    return chunks, texts


_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def png_declared_bytes(width: int, height: int, depth: int, colour: int, interlaced: bool) -> int:
    """Bytes the IDAT stream must inflate to: each row of each (Adam7) pass, plus its filter byte."""
    bits = _PNG_CHANNELS.get(colour, 4) * depth
    passes = _ADAM7 if interlaced else ((0, 0, 1, 1),)
    total = 0
    for x0, y0, dx, dy in passes:
        columns, rows = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if columns > 0 and rows > 0:
            total += rows * (1 + -(-columns * bits // 8))
    return total


def png_image_data(stream: BinaryIO, file_size: int, max_pixels: int | None = None, chunk: int = 1 << 20) -> None:
    """Inflate the IDAT stream, counting the bytes without keeping them, and raise Incomplete when it ends before
    the rows IHDR declares (Pillow pads a short stream with black rows). A broken stream is left to Pillow."""
    stream.seek(8)
    header = stream.read(25)
    if len(header) < 25 or header[4:8] != b"IHDR":
        return
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header[8:21])
    if max_pixels is not None and width * height > max_pixels:
        return  # refused for its size before any decoding: nothing to inflate here
    expected = png_declared_bytes(width, height, depth, colour, interlace == 1)
    inflater, total, position = zlib.decompressobj(), 0, 8
    try:
        while position + 8 <= file_size and total < expected and not inflater.eof:
            stream.seek(position)
            length, kind = struct.unpack(">I4s", stream.read(8))
            if kind == b"IEND":
                break
            if kind == b"IDAT":
                left = min(length, file_size - position - 8)
                while left > 0 and total < expected:
                    data = inflater.unconsumed_tail or stream.read(min(chunk, left))
                    if not inflater.unconsumed_tail:
                        left -= len(data)
                    total += len(inflater.decompress(data, chunk))
                    while inflater.unconsumed_tail and total < expected:
                        total += len(inflater.decompress(inflater.unconsumed_tail, chunk))
            position += 12 + length
    except zlib.error:
        return  # Pillow reports the broken stream itself
    if total < expected:
        raise Incomplete(f"its PNG image data ends after {100 * total // max(expected, 1)}% of the declared rows")


# -- JPEG scans --------------------------------------------------------------------------------------------------
MAX_JPEG_SCANS = 64  # libjpeg's progressive script writes 10; each scan is another pass over the whole image
_ARITHMETIC = {0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7]")  # in entropy-coded data: FF00 is a stuffed byte, FFDn a restart


def _ceil(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def jpeg_scans(data: bytes, max_pixels: int | None = None) -> tuple[int, int]:
    """(scans, entropy-coded bytes) of a JPEG. TooComplex past MAX_JPEG_SCANS (each costs a full decoding pass);
    Incomplete when the entropy-coded data cannot describe the declared frame: a Huffman-coded scan spends at least
    one bit on every 8x8 block's DC value, so fewer bytes than the frame has blocks / 8 means the rest would be
    invented by the decoder (a frame header that claims 7000 x 7000 over a few tens of kilobytes). A necessary
    condition only: data of at least a bit per block passes it whether or not it decodes to the whole frame."""
    position, scans, entropy, frame = 2, 0, 0, None
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            break
        marker = data[position + 1]
        if marker == 0xFF or marker in _STANDALONE:
            position += 1 if marker == 0xFF else 2
            continue
        if marker == 0xD9:
            break
        (length,) = struct.unpack_from(">H", data, position + 2)
        if marker in _SOF_MARKERS and frame is None and position + 10 + 3 <= len(data):
            height, width, components = struct.unpack_from(">HHB", data, position + 5)
            sampling = [data[position + 11 + 3 * index] for index in range(components)
                        if position + 12 + 3 * index <= len(data)]  # fmt: skip
            frame = (height, width, sampling, marker in _ARITHMETIC)
        position += 2 + length
        if marker == 0xDA:
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise TooComplex(f"more than {MAX_JPEG_SCANS} JPEG scans")
            found = _NEXT_MARKER.search(data, position)
            end = found.start() if found else len(data)
            entropy += end - position
            position = end
    too_large = frame is not None and max_pixels is not None and frame[0] * frame[1] > max_pixels
    if frame is not None and frame[2] and not frame[3] and not too_large:  # a frame too large is refused for that
        height, width, sampling, _ = frame
        h_max, v_max = max(s >> 4 for s in sampling) or 1, max(s & 15 for s in sampling) or 1
        blocks = sum(_ceil(_ceil(width * (s >> 4), h_max), 8) * _ceil(_ceil(height * (s & 15), v_max), 8)
                     for s in sampling)  # fmt: skip
        if entropy * 8 < blocks:
            raise Incomplete(f"its JPEG data ({entropy} bytes) is too short for the {width}x{height} frame it states")
    return scans, entropy


# -- EXIF orientation --------------------------------------------------------------------------------------------
def exif_orientation(blob: bytes | None) -> int:
    """The Orientation tag (274) of an EXIF block's first directory; 1 when absent or unreadable.

    Read here rather than by `ImageOps.exif_transpose`: Pillow loads every tag of the block to find it (and writes
    them all back), and a crafted block of a few MB can point thousands of tags at the same data."""
    if not blob:
        return 1
    if blob.startswith(b"Exif\x00\x00"):
        blob = blob[6:]
    order = {b"II": "<", b"MM": ">"}.get(blob[:2])
    if order is None or len(blob) < 8:
        return 1
    (first,) = struct.unpack_from(order + "I", blob, 4)
    if first + 2 > len(blob):
        return 1
    (entries,) = struct.unpack_from(order + "H", blob, first)
    for index in range(min(entries, (len(blob) - first - 2) // 12)):
        tag, kind, count = struct.unpack_from(order + "HHI", blob, first + 2 + 12 * index)
        if tag == 274 and kind == 3 and count == 1:
            (value,) = struct.unpack_from(order + "H", blob, first + 10 + 12 * index)
            return value if 1 <= value <= 8 else 1
    return 1


__all__ = ["Incomplete", "Malformed", "TiffLayout", "TooComplex", "check_ifd_block", "exif_orientation", "inflate_raw",
           "j2k_frame", "jpeg_frame", "jpeg_metadata", "jpeg_scans", "png_chunk_counts", "png_declared_bytes",
           "png_image_data", "rle_decoded_length", "rle_segments", "tiff_layout"]
