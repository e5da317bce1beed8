"""Builders of crafted (hostile) upload files, written in code: small files that declare, or really hold, far more
than they look, for tests/app/test_hostile_uploads.py and tests/app/test_uploads.py. Nothing large is stored or
downloaded; a bomb is a few KB to a few MB on disk and is built without allocating what it expands to.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterable

import numpy as np
from PIL import Image

PATIENT_TAGS = {"PatientName": "Doe^Jane", "PatientID": "SECRET-123", "PatientBirthDate": "19700101",
                "InstitutionName": "St Elsewhere Hospital", "ReferringPhysicianName": "House^Gregory",
                "AccessionNumber": "ACC-998877"}
PATIENT_STRINGS = ("Doe", "Jane", "SECRET-123", "19700101", "Elsewhere", "House", "Gregory", "ACC-998877")


# -- deflate streams of zeros, built from one repeated block ----------------------------------------------------------
def zeros_deflate(prefix: bytes, zero_bytes: int, wbits: int = -15) -> bytes:
    """A deflate stream of `prefix` then `zero_bytes` zeros (raw deflate for wbits -15, zlib for 15), about 1 KB per
    MiB of zeros: after a full flush the compressor forgets everything, so one compressed MiB of zeros is repeated."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, wbits)
    zeros = bytes(1 << 20)
    blocks, rest = divmod(zero_bytes, 1 << 20)
    head = compressor.compress(prefix) + compressor.flush(zlib.Z_FULL_FLUSH)
    block = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    tail = compressor.compress(bytes(rest)) + compressor.flush()
    if wbits > 0:  # the zlib trailer (Adler-32) covered one block: recompute it for all of them
        checksum = zlib.adler32(prefix)
        for _ in range(blocks):
            checksum = zlib.adler32(zeros, checksum)
        tail = tail[:-4] + struct.pack(">I", zlib.adler32(bytes(rest), checksum))
    return head + block * blocks + tail


# -- PNG ---------------------------------------------------------------------------------------------------------
def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png(width: int, height: int, depth: int = 8, colour: int = 0, idat: bytes | None = None,
        before_idat: Iterable[bytes] = (), after_idat: Iterable[bytes] = ()) -> bytes:
    """A PNG of zero pixels (filter byte 0 on every row), or with `idat` as its compressed data."""
    if idat is None:
        channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
        idat = zeros_deflate(b"", (1 + (width * channels * depth + 7) // 8) * height, wbits=15)
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0))
    return (b"\x89PNG\r\n\x1a\n" + header + b"".join(before_idat) + png_chunk(b"IDAT", idat)
            + b"".join(after_idat) + png_chunk(b"IEND", b""))


# -- TIFF --------------------------------------------------------------------------------------------------------
_TYPE_FORMAT = {1: "B", 2: "s", 3: "H", 4: "I", 7: "s", 11: "f"}


def tiff(entries: list[tuple[int, int, object]], image_data: bytes = b"", next_ifd: int = 0,
         shared: dict[int, int] | None = None) -> bytes:
    """A little-endian TIFF: header, `image_data` at offset 8, then tag data, then one directory.
    `entries`: (tag, type, value) with value an int, a list of numbers or bytes; the special value "DATA" is the
    offset of `image_data`. `shared`: tag -> byte count for tags that all point at `image_data` (the shared-data
    bomb)."""
    data_area = bytearray()
    start = 8 + len(image_data)
    table = []
    for tag, kind, value in entries:
        if value == "DATA":
            table.append((tag, kind, 1, struct.pack("<I", 8)))
            continue
        if isinstance(value, bytes):  # raw payload: bytes for BYTE/UNDEFINED, packed numbers otherwise
            payload, count = value, len(value) // struct.calcsize(_TYPE_FORMAT[kind].replace("s", "B"))
        else:
            values = value if isinstance(value, list) else [value]
            payload, count = struct.pack(f"<{len(values)}{_TYPE_FORMAT[kind]}", *values), len(values)
        if len(payload) <= 4:
            table.append((tag, kind, count, payload.ljust(4, b"\x00")))
        else:
            table.append((tag, kind, count, struct.pack("<I", start + len(data_area))))
            data_area += payload + b"\x00" * (len(payload) % 2)
    for tag, count in (shared or {}).items():  # UNDEFINED bytes: within every per-tag value-count limit
        table.append((tag, 7, count, struct.pack("<I", 8)))
    table.sort()
    directory = struct.pack("<H", len(table)) + b"".join(struct.pack("<HHI", t, k, c) + v for t, k, c, v in table)
    ifd_offset = start + len(data_area)
    directory += struct.pack("<I", next_ifd(ifd_offset) if callable(next_ifd) else next_ifd)
    return b"II*\x00" + struct.pack("<I", ifd_offset) + image_data + bytes(data_area) + directory


def grey_tiff_entries(width: int, height: int, data_size: int, bits: int = 8, samples: int = 1,
                      photometric: int = 1, compression: int = 1, sample_format: int = 1) -> list:
    entries = [(256, 4, width), (257, 4, height), (258, 3, [bits] * samples), (259, 3, compression),
               (262, 3, photometric), (273, 4, "DATA"), (277, 3, samples), (278, 4, height), (279, 4, data_size)]
    if sample_format != 1:
        entries.append((339, 3, [sample_format] * samples))
    return entries


def float_tiff(values: np.ndarray) -> bytes:
    data = np.ascontiguousarray(values, dtype="<f4").tobytes()
    height, width = values.shape
    return tiff(grey_tiff_entries(width, height, len(data), bits=32, sample_format=3), data)


# -- JPEG, WebP, BMP ---------------------------------------------------------------------------------------------
def encode(image: Image.Image, format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format, **options)
    return buffer.getvalue()


def gradient(width: int = 256, height: int = 256, mode: str = "L") -> Image.Image:
    """A smooth, non-flat test image (radiograph-like statistics are not needed here)."""
    ramp = np.add.outer(np.linspace(0, 160, height), np.linspace(0, 90, width)).astype(np.uint8)
    image = Image.fromarray(ramp)
    return image if mode == "L" else image.convert(mode)


def jpeg_with_size(data: bytes, width: int, height: int) -> bytes:
    """A JPEG whose frame header (SOF) claims another size; the scan data stays that of the real image."""
    position = 2
    while data[position + 1] not in (0xC0, 0xC1, 0xC2):
        position += 2 + struct.unpack_from(">H", data, position + 2)[0]
    patched = bytearray(data)
    struct.pack_into(">HH", patched, position + 5, height, width)
    return bytes(patched)


def jpeg_with_exif(data: bytes, exif: bytes) -> bytes:
    """`data` with an APP1 Exif segment (at most 64 KB) right after SOI."""
    segment = b"Exif\x00\x00" + exif
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(segment) + 2) + segment + data[2:]


def exif_bomb(tags: int, block: int, orientation: int = 6) -> bytes:
    """A little-endian EXIF block whose first directory has an Orientation tag and `tags` private tags that all point
    at one `block`-byte area: Pillow's EXIF reader loads the area once per tag."""
    entries = [struct.pack("<HHII", 274, 3, 1, orientation)]
    data_offset = 8 + 2 + 12 * (tags + 1) + 4
    entries += [struct.pack("<HHII", 40000 + i, 7, block, data_offset) for i in range(tags)]
    directory = struct.pack("<H", tags + 1) + b"".join(entries) + b"\x00\x00\x00\x00"
    return b"II*\x00" + struct.pack("<I", 8) + directory + bytes(block)


def webp_with_canvas(data: bytes, width: int, height: int) -> bytes:
    """An extended (VP8X) WebP whose canvas size is patched."""
    patched = bytearray(data)
    index = patched.find(b"VP8X")
    patched[index + 12 : index + 15] = (width - 1).to_bytes(3, "little")
    patched[index + 15 : index + 18] = (height - 1).to_bytes(3, "little")
    return bytes(patched)


def bmp(width: int, height: int, pixels: bytes, bits: int = 8, compression: int = 0, colours: int = 256) -> bytes:
    """A Windows BMP (BITMAPINFOHEADER) with a grey palette of `colours` entries (8-bit)."""
    palette = b"".join(bytes((i, i, i, 0)) for i in range(min(colours, 256))) if bits <= 8 else b""
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, bits, compression, len(pixels), 2835, 2835, colours, 0)
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + info + palette + pixels


# -- DICOM -------------------------------------------------------------------------------------------------------
def element(group: int, number: int, vr: bytes, value: bytes, length: int | None = None) -> bytes:
    """One explicit VR little-endian element (`length` overrides the value's own, e.g. 0xFFFFFFFF)."""
    length = len(value) if length is None else length
    if vr in (b"OB", b"OW", b"OF", b"SQ", b"UC", b"UN", b"UT", b"OD", b"OL", b"OV", b"UR", b"SV", b"UV"):
        return struct.pack("<HH2sHI", group, number, vr, 0, length) + value
    return struct.pack("<HH2sH", group, number, vr, length) + value


def item(value: bytes = b"", length: int | None = None) -> bytes:
    return struct.pack("<HHI", 0xFFFE, 0xE000, len(value) if length is None else length) + value


ITEM_END = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
SEQUENCE_END = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)


def secondary_capture(patient: bool = True):
    """An explicit-VR little-endian DX dataset with its file meta and, if asked, patient tags that must never reach
    the user; the caller adds the image tags and pixels."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    if patient:
        for keyword, value in PATIENT_TAGS.items():
            setattr(ds, keyword, value)
    ds.Modality = "DX"
    return ds


def dicom(rows: int = 64, columns: int = 64, pixel_data: bytes | None = None, syntax: str | None = None,
          bits: int = 16, samples: int = 1, photometric: str = "MONOCHROME2", frames: int | None = None,
          before_pixels: bytes = b"", patient: bool = True, **tags: object) -> bytes:
    """A DICOM file built with pydicom, then `before_pixels` (raw elements) and the Pixel Data element appended by
    hand: native OW for uncompressed syntaxes, or `pixel_data` taken as an already encapsulated value (undefined
    length). `pixel_data=None`: a zero image of the declared size."""
    from pydicom.uid import UID, ExplicitVRLittleEndian

    syntax = UID(syntax or ExplicitVRLittleEndian)
    ds = secondary_capture(patient)
    ds.Rows, ds.Columns = rows, columns
    if frames is not None:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = samples, photometric
    if samples > 1:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    if syntax != ExplicitVRLittleEndian:
        data = data.replace(str(ExplicitVRLittleEndian).encode() + b"\x00", _padded_uid(syntax), 1)
        data = _fix_group_length(data, len(_padded_uid(syntax)) - len(str(ExplicitVRLittleEndian)) - 1)
    if pixel_data is None:
        pixel_data = bytes(rows * columns * samples * (bits // 8) * (frames or 1))
    if syntax.is_encapsulated:
        pixels = element(0x7FE0, 0x0010, b"OB", pixel_data, 0xFFFFFFFF)
    else:
        pixels = element(0x7FE0, 0x0010, b"OW" if bits > 8 else b"OB", pixel_data + b"\x00" * (len(pixel_data) % 2))
    return data + before_pixels + pixels


def _padded_uid(uid: str) -> bytes:
    value = str(uid).encode()
    return value + b"\x00" * (len(value) % 2)


def _fix_group_length(data: bytes, delta: int) -> bytes:
    """Adjust (0002,0000) and (0002,0010)'s own length after the transfer syntax UID changed length."""
    patched = bytearray(data)
    (group_length,) = struct.unpack_from("<I", patched, 140)
    struct.pack_into("<I", patched, 140, group_length + delta)
    index = patched.find(b"\x02\x00\x10\x00UI")
    (length,) = struct.unpack_from("<H", patched, index + 6)
    struct.pack_into("<H", patched, index + 6, length + delta)
    return bytes(patched)


def split_meta(data: bytes) -> tuple[bytes, bytes]:
    """(preamble + file meta, dataset) of a file written by `dicom`."""
    (group_length,) = struct.unpack_from("<I", data, 140)
    end = 144 + group_length
    return data[:end], data[end:]


def deflated(data: bytes, extra_zero_mib: int = 0) -> bytes:
    """The file `data` (explicit VR little endian) as Deflated Explicit VR Little Endian, its dataset followed by
    `extra_zero_mib` MiB of zeros inside the deflate stream (tiny on disk)."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

    head, body = split_meta(data)
    old, new = _padded_uid(ExplicitVRLittleEndian), _padded_uid(DeflatedExplicitVRLittleEndian)
    head = _fix_group_length(head.replace(old, new, 1), len(new) - len(old))
    return head + zeros_deflate(body, extra_zero_mib << 20)


def deflate_bomb(inflated_mib: int) -> bytes:
    """A valid-looking deflated DICOM whose Pixel Data element claims, and the stream holds, `inflated_mib` MiB."""
    size = inflated_mib << 20
    header = dicom(pixel_data=b"")[:-12]  # all but the empty Pixel Data element
    head, _ = split_meta(deflated(header))
    plain = split_meta(header)[1] + element(0x7FE0, 0x0010, b"OW", b"", size)
    return head + zeros_deflate(plain, size)


def encapsulate(frames: list[bytes], offset_table: bytes = b"") -> bytes:
    """Encapsulated Pixel Data value: a basic offset table item, one fragment per frame, the sequence delimiter."""
    fragments = b"".join(item(frame + b"\x00" * (len(frame) % 2)) for frame in frames)
    return item(offset_table) + fragments + SEQUENCE_END


def rle_frame(segments: list[bytes]) -> bytes:
    header = struct.pack("<I", len(segments))
    offsets, position = [], 64
    for segment in segments:
        offsets.append(position)
        position += len(segment)
    header += struct.pack(f"<{len(segments)}I", *offsets) + bytes(4 * (15 - len(segments)))
    return header + b"".join(segments)


def rle_segment(data: bytes) -> bytes:
    """PackBits-encode `data` as literal runs of up to 128 bytes (valid, not compact)."""
    out = bytearray()
    for start in range(0, len(data), 128):
        chunk = data[start : start + 128]
        out += bytes((len(chunk) - 1,)) + chunk
    return bytes(out)


def j2k(image: Image.Image) -> bytes:
    """A bare JPEG 2000 codestream, as DICOM holds it."""
    return encode(image, "JPEG2000", irreversible=False, no_jp2=True)


__all__ = [name for name in dir() if not name.startswith("_") and name not in ("annotations", "io", "struct", "zlib",
                                                                                "np", "Image", "Iterable")]
