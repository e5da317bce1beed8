"""Parsing the header of an uploaded DICOM file with bounded memory, reading only technical tags.

pydicom trusts the file: it inflates a deflated dataset whole (a 61 KB file raised peak memory by ~120 MiB), turns
every sequence item into a Python object (a 3.8 MB file of empty items took 350 MB and 11 s), and splits a Specific
Character Set into one string per term while it reads (an 18 MB one took 1.2 GB and 200 s). Here:

- the header is parsed through a reader that counts reads (each element or item costs at least one), so a header
  can make pydicom build at most `MAX_DICOM_READS` objects; sequences pydicom would expand later, on access, are
  parsed through the same count or refused, and so are values it would split into many terms;
- a deflated dataset is inflated a chunk at a time into a buffer of at most `DEFLATED_BUDGET` bytes, and pydicom
  reads that buffer (it never inflates anything itself);
- only `DICOM_SAFE_TAGS` and the tags needed to decode and display pixels are read (`specific_tags`): patient
  names, IDs, dates and institutions are skipped unread, so no message, log line or result can carry them.

Pixels and display values: `dicom_upload`. Not part of the Hub-uploaded model: nothing in the model files imports
this module.
"""

from __future__ import annotations

import io
import logging
import struct
from pathlib import Path
from typing import Any, BinaryIO

from . import codestreams
from .upload_types import (
    DEFLATED_BUDGET,
    MAX_DICOM_READS,
    MAX_PIXELS,
    CorruptImageError,
    ImageTooLargeError,
    InputError,
    NotAnImageError,
)

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
# Technical DICOM tags that are safe to show; nothing else leaves this module.
DICOM_SAFE_TAGS = ("Modality", "PhotometricInterpretation", "BitsStored", "Rows", "Columns", "NumberOfFrames",
                   "ViewPosition", "BodyPartExamined")
# What decoding and display need besides the safe tags; every other tag is skipped unread.
_PIXEL_TAGS = ("SamplesPerPixel", "PlanarConfiguration", "BitsAllocated", "HighBit", "PixelRepresentation",
               "RescaleSlope", "RescaleIntercept", "RescaleType", "ModalityLUTSequence", "VOILUTSequence",
               "WindowCenter", "WindowWidth", "VOILUTFunction", "ExtendedOffsetTable", "ExtendedOffsetTableLengths",
               "PixelData")
_LUT_ITEM_TAGS = ("LUTDescriptor", "LUTData", "LUTExplanation", "ModalityLUTType")


class _ReadBudgetExceeded(Exception):
    """Raised by `_CountingReader`; pydicom may wrap it (it turns some read errors into OSError), so the reader also
    remembers it."""


_CHARSET_TAGS = (b"\x08\x00\x05\x00", b"\x00\x08\x00\x05")  # (0008,0005), little and big endian


class _CountingReader:
    """A file-like object for pydicom that counts `read` calls and fails every read past `limit`.

    Every element header and every sequence item costs pydicom at least one read, so the count bounds the Python
    objects a crafted header can make it build. One value is converted while pydicom reads, in every item:
    Specific Character Set, split on backslashes into one string per term (an 18 MB one took 1.2 GB and 200 s,
    measured); its read counts one per two bytes. The source can be swapped (`target`) with the count kept, so the
    file and the inflated buffer of a deflated file share one budget.
    """

    def __init__(self, source: BinaryIO, limit: int = MAX_DICOM_READS) -> None:
        self.source, self.limit, self.reads, self.exceeded = source, limit, 0, False
        self.name = getattr(source, "name", None)
        self._charset_next = False  # the last header read was Specific Character Set's

    def target(self, source: BinaryIO) -> _CountingReader:
        self.source = source
        return self

    def read(self, size: int = -1) -> bytes:
        charset_value = self._charset_next and size != 4  # 4: the long-length field of an explicit VR header
        self.reads += max(1, size // 2) if charset_value else 1
        if self.reads > self.limit:
            self.exceeded = True
            raise _ReadBudgetExceeded
        data = self.source.read(size)
        self._charset_next = (size == 8 and data[:4] in _CHARSET_TAGS) or (self._charset_next and size == 4)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.source.seek(offset, whence)

    def tell(self) -> int:
        return self.source.tell()


def _too_complex() -> ImageTooLargeError:
    return ImageTooLargeError(
        f"The DICOM header is too complex to read safely (more than {MAX_DICOM_READS} elements and sequence items; "
        "real images have a few thousand). Export the image again or convert it to PNG."
    )


MAX_VALUE_BYTES = 4096  # a window list, a UID, a code string; pydicom turns a value into one object per term
_BULK = {"PixelData", "ExtendedOffsetTable", "ExtendedOffsetTableLengths"}  # bytes, whatever their length
_BYTES_VRS = (b"OB", b"OW", b"OD", b"OF", b"OL", b"OV")  # kept as bytes (UN is converted to the dictionary's VR)
_LONG_VRS = (*_BYTES_VRS, b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV")
MAX_META_ELEMENTS = 256


def _check_file_meta(handle: BinaryIO, start: int) -> None:
    """Group 0002 before pydicom reads it: pydicom parses all of it and converts its first element at once, so a
    sequence, or a long multi-valued element (one Python object per term), there is refused."""
    handle.seek(start)
    for _ in range(MAX_META_ELEMENTS):
        header = handle.read(8)
        if len(header) < 8:
            return
        group, element, vr = struct.unpack_from("<HH2s", header)
        if group != 2:
            return
        if vr in _LONG_VRS:
            extra = handle.read(4)
            length = int.from_bytes(extra, "little") if len(extra) == 4 else 0
            bulk = vr in _BYTES_VRS
        elif vr.isalpha() and vr.isupper():
            length, bulk = int.from_bytes(header[6:8], "little"), False
        else:  # implicit VR (non-conformant meta): pydicom tolerates it
            length, bulk = int.from_bytes(header[4:8], "little"), element in (0x0001, 0x0102)
        if vr == b"SQ" or length == 0xFFFFFFFF or (length > MAX_VALUE_BYTES and not bulk):
            raise CorruptImageError("The DICOM file meta information is damaged.")
        handle.seek(length, 1)
    raise CorruptImageError("The DICOM file meta information is damaged.")


def _raw(dataset: Any, keyword: str) -> Any:
    """The element as stored, never converted (converting is what can cost memory)."""
    from pydicom.datadict import tag_for_keyword
    from pydicom.dataelem import RawDataElement

    element = dataset.get_item(tag_for_keyword(keyword))
    return element if isinstance(element, RawDataElement) else None


def _hidden_sequence(raw: Any) -> bool:
    """True when converting `raw` would make pydicom parse a sequence out of its bytes, uncounted: stored with VR
    SQ, or with no/unknown VR where the dictionary says SQ."""
    from pydicom.datadict import dictionary_VR

    return raw.VR == "SQ" or (raw.VR in (None, "UN") and dictionary_VR(raw.tag) == "SQ")


def _check_elements(ds: Any, reader: _CountingReader) -> None:
    """Before any value is converted: the two LUT sequences are parsed through the counting reader (pydicom would
    expand them from raw bytes on first access); any other tag stored as a sequence, or holding a value too long for
    its kind, is refused."""
    from pydicom.datadict import tag_for_keyword
    from pydicom.dataelem import DataElement
    from pydicom.filereader import read_sequence

    for keyword in ("ModalityLUTSequence", "VOILUTSequence"):
        tag = tag_for_keyword(keyword)
        raw = _raw(ds, keyword)
        if raw is not None and raw.value is not None:  # defined length: still bytes
            if not _hidden_sequence(raw):
                raise CorruptImageError(f"The DICOM file is damaged: its {keyword} is not a sequence.")
            sequence = read_sequence(reader.target(io.BytesIO(raw.value)), raw.is_implicit_VR, raw.is_little_endian,
                                     len(raw.value), ds.original_character_set)
            ds[tag] = DataElement(tag, "SQ", sequence)
        element = ds.get_item(tag)
        for item in element.value if element is not None and element.VR == "SQ" else ():
            for name in _LUT_ITEM_TAGS:  # the item's own elements are raw until read: a LUT of 65536 entries at most
                value = _raw(item, name)
                limit = 2 * 65536 + 2 if name == "LUTData" else MAX_VALUE_BYTES
                if value is not None and (_hidden_sequence(value) or len(value.value or b"") > limit):
                    raise CorruptImageError(f"The DICOM file is damaged: its {keyword} holds a malformed item.")
    for keyword in (*DICOM_SAFE_TAGS, *_PIXEL_TAGS, "SpecificCharacterSet"):
        raw = _raw(ds, keyword)
        if raw is None or raw.value is None or keyword in ("ModalityLUTSequence", "VOILUTSequence"):
            continue
        if _hidden_sequence(raw) or (keyword not in _BULK and len(raw.value) > MAX_VALUE_BYTES):
            raise CorruptImageError(f"The DICOM file is damaged: its {keyword} tag holds an impossible value.")


def _parse(handle: BinaryIO, reader: _CountingReader, force: bool) -> Any:
    """The dataset with only the tags this module reads, parsed under the read budget; deflated data inflated here,
    within DEFLATED_BUDGET."""
    from pydicom import dcmread
    from pydicom.dataset import FileDataset
    from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
    from pydicom.tag import Tag
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    tags = [Tag(keyword) for keyword in (*DICOM_SAFE_TAGS, *_PIXEL_TAGS)]
    preamble = read_preamble(reader, force)
    start = reader.tell()
    _check_file_meta(handle, start)
    reader.seek(start)
    meta = _read_file_meta_info(reader)  # private, but what pydicom's own pixel reader uses (pixels/utils.py)
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        reader.seek(0)
        return dcmread(reader, force=force, specific_tags=tags)
    inflated = io.BytesIO()
    try:
        codestreams.inflate_raw(handle, DEFLATED_BUDGET, inflated)
    except codestreams.TooComplex:
        raise ImageTooLargeError(
            f"The deflated DICOM file inflates to more than {DEFLATED_BUDGET // 2**20} MB, more than any image within "
            f"the {MAX_PIXELS / 1e6:.0f} megapixel limit needs (decompression-bomb guard)."
        ) from None
    except codestreams.Malformed:
        raise CorruptImageError("The DICOM file is damaged: its deflated data cannot be inflated.") from None
    inflated.seek(0)
    dataset = read_dataset(reader.target(inflated), False, True, specific_tags=tags)
    return FileDataset(reader.name or "", dataset, preamble, meta, False, True)


def read_header(path: Path) -> Any:
    """The dataset of one DICOM file with only the tags this app reads, every value checked so that converting it
    costs no more than its size; an `InputError` otherwise. Call inside `warnings.catch_warnings()`: pydicom's
    warnings can quote tag values."""
    from pydicom import config
    from pydicom.errors import InvalidDicomError

    config.settings.reading_validation_mode = config.IGNORE  # no warnings that quote the values they reject
    logging.getLogger("pydicom").setLevel(logging.ERROR)  # nor log lines (pydicom's errors name types and sizes)
    force = path.suffix.lower() in DICOM_SUFFIXES
    with path.open("rb") as handle:
        reader = _CountingReader(handle)
        try:
            ds = _parse(handle, reader, force)
            _check_elements(ds, reader)
        except InputError:
            raise
        except InvalidDicomError:
            raise NotAnImageError("The file is not a valid DICOM file.") from None
        except Exception as error:  # noqa: BLE001 - pydicom raises many types for damaged files
            if reader.exceeded:
                raise _too_complex() from None
            raise CorruptImageError(
                f"The DICOM file is damaged and cannot be read ({type(error).__name__})."
            ) from None
        if reader.exceeded:  # pydicom swallowed the failed read (it logs some and carries on)
            raise _too_complex()
    return ds


__all__ = ["DICOM_SAFE_TAGS", "DICOM_SUFFIXES", "read_header"]
