"""Decoding an uploaded DICOM file's first frame into display values, with bounded memory.

pydicom decodes a compressed frame at the size of its own codestream, whatever Rows/Columns say, decodes every frame
when asked for the pixel array, and expands RLE segments 64-fold. Here (after `dicom_header` has read the header
within its budgets, technical tags only):

- only the first frame is decoded, after its codestream's own header (JPEG SOF, JPEG-LS SOF55, JPEG 2000 SIZ, RLE
  segment table and run lengths) has been checked against Rows/Columns; Pillow decodes under its bomb guard;
- a frame over `MAX_WORKING_VALUES` values is reduced before any float copy is made;
- window, VOI LUT and rescale values are checked before use: impossible ones are an `InputError`, not a crash, and
  NaN or infinite display values are refused.

Not part of the Hub-uploaded model: nothing in the model files imports this module.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from modeling_cnn_lstm.image_processing_cnn_lstm import to_canonical_array

from . import codestreams
from .dicom_header import DICOM_SAFE_TAGS, DICOM_SUFFIXES, read_header
from .upload_types import (
    MAX_DICOM_READS,
    MAX_PIXELS,
    CorruptImageError,
    ImageTooLargeError,
    InputError,
    LoadedImage,
    NotAnImageError,
    UnsupportedImageError,
    block_means,
    check_dimensions,
    check_finite,
    reduction_factor,
    reduction_note,
)

RLE_PADDING = 16  # decoded bytes an RLE segment may carry past Rows x Columns (encoders pad to even lengths)
FRAME_BUDGET = MAX_PIXELS * 4  # bytes of one decoded frame: a 50 MP 32-bit or RGB image


def _number(ds: Any, keyword: str) -> float | None:
    """A numeric tag's (first) value as a finite float; None when absent; CorruptImageError when not a number."""
    from pydicom.multival import MultiValue

    try:
        value = ds.get(keyword)
        if isinstance(value, (MultiValue, list, tuple)):
            value = value[0] if len(value) else None
        if value is None or value == "":
            return None
        number = float(value)
    except Exception:  # noqa: BLE001 - invalid DS/IS strings raise several types
        number = float("nan")
    if not np.isfinite(number):
        raise CorruptImageError(f"The DICOM file is damaged: its {keyword} is not a valid number.")
    return number


def _lut_bits(item: Any, keyword: str) -> int:
    """Check a LUT item the way pydicom will use it (LUT Descriptor = entries (0: 65536), first value, bits of 8 or
    10-16; LUT Data, OW bytes or US values, holding that many entries); its bits."""
    try:
        entries, _, bits = (int(value) for value in item.LUTDescriptor)
        data = item.LUTData
        stored = len(data) // 2 if isinstance(data, bytes) else len(data)
    except Exception:  # noqa: BLE001 - missing, non-numeric or wrongly sized LUT tags
        entries, bits, stored = -1, 0, 0
    if not (bits == 8 or 10 <= bits <= 16) or entries < 0 or stored < (entries or 65536):
        raise CorruptImageError(f"The DICOM {keyword} is invalid (its LUT descriptor does not match its data).")
    return bits


def _window(ds: Any) -> tuple[float, float] | None:
    """(centre, width) of the first window when the file gives one; CorruptImageError for impossible values."""
    centre, width = _number(ds, "WindowCenter"), _number(ds, "WindowWidth")
    if centre is None or width is None:
        return None
    function = str(ds.get("VOILUTFunction") or "LINEAR").upper()
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        raise CorruptImageError("The DICOM VOI LUT Function is not one of LINEAR, LINEAR_EXACT or SIGMOID.")
    positive = width >= 1 if function == "LINEAR" else width > 0  # PS3.3 C.11.2.1.2
    if not positive:
        raise CorruptImageError("The DICOM window is invalid: its Window Width must be a positive number.")
    return centre, width


def _voi_output_range(ds: Any, used_lut: bool) -> tuple[float, float]:
    """The value range the VOI step maps into (PS3.3 C.11.2), so that 0..255 keeps the window's contrast."""
    if used_lut:
        return 0.0, float(2 ** _lut_bits(ds.VOILUTSequence[0], "VOI LUT") - 1)
    bits = int(ds.BitsStored)
    if ds.get("ModalityLUTSequence"):
        low, high = 0.0, float(2 ** _lut_bits(ds.ModalityLUTSequence[0], "Modality LUT") - 1)
    elif int(ds.PixelRepresentation) == 0:
        low, high = 0.0, float(2**bits - 1)
    else:
        low, high = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = _number(ds, "RescaleSlope"), _number(ds, "RescaleIntercept")
    if slope is not None and intercept is not None:
        low, high = low * slope + intercept, high * slope + intercept
    return min(low, high), max(low, high)


def _stretch(values: np.ndarray, low: float, high: float) -> np.ndarray:
    span = high - low
    if not np.isfinite(span) or span <= 0:
        return np.zeros_like(values, dtype=np.float32)
    return (np.clip((values - low) / span, 0.0, 1.0) * 255.0).astype(np.float32)


def _image_geometry(ds: Any) -> tuple[int, int, int, int, int, str]:
    """(rows, columns, frames, samples, bits allocated, photometric), checked against the limits."""
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames") or 1)  # 0 (seen in the wild) means 1, as pydicom reads it
        samples, bits = int(ds.get("SamplesPerPixel") or 1), int(ds.BitsAllocated)
        photometric = str(ds.PhotometricInterpretation).upper()
    except Exception:  # noqa: BLE001 - missing tags, or values that are no numbers
        raise CorruptImageError(
            "The DICOM file lacks valid image size, bit depth or photometric interpretation tags."
        ) from None
    check_dimensions(columns, rows)  # per frame: only the first frame is decoded
    if photometric == "PALETTE COLOR":
        raise UnsupportedImageError("Palette-colour DICOM images are not supported; radiographs are greyscale.")
    if samples not in (1, 3) or bits not in (1, 8, 16, 32) or frames < 1:
        raise UnsupportedImageError(
            f"DICOM images with {samples} samples per pixel, {bits} bits allocated or {frames} frames are not "
            "supported."
        )
    if rows * columns * samples * max(bits // 8, 1) > FRAME_BUDGET:
        raise ImageTooLargeError(f"The DICOM frame is too large to decode ({rows}x{columns}, {samples} samples of "
                                 f"{bits} bits).")
    return rows, columns, frames, samples, bits, photometric


def _first_frame_checks(ds: Any, syntax: Any, rows: int, columns: int, frames: int, samples: int, bits: int) -> None:
    """Before decoding a compressed frame: bounded fragment tables, and a codestream the size Rows/Columns say."""
    from pydicom.encaps import get_frame
    from pydicom.uid import JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes, JPEGTransferSyntaxes, RLELossless

    data = ds.PixelData
    offsets = ds.get("ExtendedOffsetTable")
    # Fragments were counted while parsing (two reads each); the offset tables are single values that pydicom
    # unpacks into one Python int per entry: at most one per frame.
    tables = min(frames, MAX_DICOM_READS)
    if offsets and len(offsets) > 8 * tables:
        raise CorruptImageError("The DICOM compressed pixel data is damaged (its extended offset table is wrong).")
    if data[:4] != b"\xfe\xff\x00\xe0" or int.from_bytes(data[4:8], "little") > 4 * tables:
        raise CorruptImageError("The DICOM compressed pixel data is damaged (its offset table is wrong).")
    lengths = ds.get("ExtendedOffsetTableLengths")
    extended = (offsets, lengths) if offsets and lengths and len(lengths) == len(offsets) else None
    frame = get_frame(data, 0, number_of_frames=frames, extended_offsets=extended)
    try:
        if syntax == RLELossless:
            segments = codestreams.rle_segments(frame)
            if len(segments) != samples * max(bits // 8, 1):
                raise codestreams.Malformed("RLE segment count does not match the image")
            view = memoryview(frame)
            cap = rows * columns + RLE_PADDING
            if any(codestreams.rle_decoded_length(view[a:b], cap) > cap for a, b in segments):
                raise ImageTooLargeError(
                    f"The DICOM RLE frame decodes to more than its {columns}x{rows} pixels (decompression-bomb guard)."
                )
            return
        if syntax in JPEG2000TransferSyntaxes:
            height, width, components = codestreams.j2k_frame(frame)
        elif syntax in (*JPEGTransferSyntaxes, *JPEGLSTransferSyntaxes):
            height, width, components = codestreams.jpeg_frame(frame)
        else:
            return
    except codestreams.Malformed:
        raise CorruptImageError("The DICOM compressed pixel data is damaged (no valid image header).") from None
    if (height, width, components) != (rows, columns, samples):
        raise CorruptImageError(
            f"The DICOM compressed frame is {width}x{height} pixels with {components} components, but the header says "
            f"{columns}x{rows} with {samples}: the file is damaged or crafted, and is not decoded."
        )


def _decode_first_frame(ds: Any, rows: int, columns: int, frames: int, samples: int, bits: int) -> np.ndarray:
    from pydicom import uid
    from pydicom.pixels import get_decoder, pixel_array

    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    syntax = uid.UID(syntax or uid.ImplicitVRLittleEndian)
    known = (*uid.UncompressedTransferSyntaxes, *uid.JPEGTransferSyntaxes, *uid.JPEGLSTransferSyntaxes,
             *uid.JPEG2000TransferSyntaxes, *uid.RLETransferSyntaxes)
    if syntax not in known:
        raise UnsupportedImageError(
            f"DICOM files with the transfer syntax {syntax.name} are not supported; export the image as "
            "uncompressed DICOM, PNG or JPEG."
        )
    if syntax.is_compressed:
        try:
            available = get_decoder(syntax).is_available
        except NotImplementedError:  # pydicom has no decoder at all (JPEG 2000 Part 2, ...)
            available = False
        if not available:
            raise UnsupportedImageError(
                f"This DICOM file is compressed ({syntax.name}) and no decoder for it is installed here. Install "
                "pylibjpeg with its plugins, or export the image as uncompressed DICOM, PNG or JPEG."
            )
        _first_frame_checks(ds, syntax, rows, columns, frames, samples, bits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # Pillow decodes JPEG and JPEG 2000
            array = pixel_array(ds, index=0)
    except Exception as error:  # noqa: BLE001 - damaged pixel data: pydicom and its plugins raise many types
        # pydicom wraps its plugins' errors (Pillow's bomb guard among them) in a RuntimeError that quotes them
        bomb = isinstance(error, Image.DecompressionBombError | Image.DecompressionBombWarning)
        if bomb or "decompression bomb" in str(error):
            message = "The DICOM frame is too large to decode safely (decompression-bomb guard)."
            raise ImageTooLargeError(message) from None
        if "less than expected" in str(error) or "doesn't match the expected length" in str(error):
            raise CorruptImageError(
                "The file is incomplete: its pixel data is shorter than the image its header declares, so it is "
                "refused rather than analysed with the missing part filled in. Export the DICOM file again."
            ) from None
        raise CorruptImageError(f"The DICOM pixel data cannot be decoded ({type(error).__name__}).") from None
    if array.shape[:2] != (rows, columns):
        raise CorruptImageError("The DICOM pixel data does not match the image size in its header.")
    return array


def _reduce(array: np.ndarray, notes: list[str]) -> np.ndarray:
    """Block means over a whole factor when the frame holds more than MAX_WORKING_VALUES values; the integer type is
    kept (LUTs index by integer)."""
    rows, columns = array.shape[:2]
    factor = reduction_factor(columns, rows, 1 if array.ndim == 2 else array.shape[2])
    if factor == 1:
        return array
    reduced = block_means(array, factor)
    notes.append(reduction_note((columns, rows), (reduced.shape[1], reduced.shape[0])))
    return reduced


def _display(ds: Any, array: np.ndarray, photometric: str, notes: list[str]) -> np.ndarray:
    """Stored values -> display grey 0..255 the way a viewer does (modality LUT, VOI, MONOCHROME1 inverted)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        if array.ndim == 3 and array.shape[-1] == 3:  # RGB and YBR (pydicom converts YBR to RGB)
            return to_canonical_array(np.ascontiguousarray(array))
        raise UnsupportedImageError(f"DICOM photometric interpretation {photometric} is not supported.")
    if ds.get("ModalityLUTSequence"):
        _lut_bits(ds.ModalityLUTSequence[0], "Modality LUT")
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        _number(ds, keyword)
    try:
        values = apply_modality_lut(array, ds)  # rescale slope/intercept or modality LUT
        window = None if ds.get("VOILUTSequence") else _window(ds)
        if ds.get("VOILUTSequence"):
            _lut_bits(ds.VOILUTSequence[0], "VOI LUT")
            values = apply_voi_lut(np.rint(values).astype(np.int64), ds, prefer_lut=True)  # a LUT takes integers
            low, high = _voi_output_range(ds, used_lut=True)
            notes.append("DICOM VOI LUT applied")
        elif window is not None:
            values = apply_voi_lut(values.astype(np.float64), ds, prefer_lut=False)
            low, high = _voi_output_range(ds, used_lut=False)
            notes.append("DICOM window (centre/width) applied")
        else:
            check_finite(values)
            # No VOI in the file: stretch the 0.5th..99.5th percentiles, as viewers do for raw detector data.
            low, high = (float(v) for v in np.percentile(values, [0.5, 99.5]))
            values = values.astype(np.float64)
            notes.append("no DICOM window given: the 0.5-99.5 percentile range was stretched")
    except InputError:
        raise
    except Exception as error:  # noqa: BLE001 - LUT and window values pydicom cannot apply
        raise CorruptImageError(
            f"The DICOM display values (modality LUT, VOI LUT or window) cannot be applied ({type(error).__name__})."
        ) from None
    check_finite(values)
    grey = _stretch(values, low, high)
    if photometric == "MONOCHROME1":  # MONOCHROME1: high values are dark; flip to the usual display
        grey = 255.0 - grey
        notes.append("MONOCHROME1 image inverted for display")
    return grey[..., None]


def read_dicom(path: Path) -> LoadedImage:
    """One DICOM file -> `LoadedImage` (first frame, display values, DICOM_SAFE_TAGS), or an `InputError`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's warnings can quote tag values
        return _read_dicom(path)


def _read_dicom(path: Path) -> LoadedImage:
    ds = read_header(path)
    if "PixelData" not in ds:
        raise NotAnImageError("The DICOM file holds no image (no Pixel Data): is it a report or structured document?")
    safe = {}
    for tag in DICOM_SAFE_TAGS:
        try:
            value = ds.get(tag)
        except Exception:  # noqa: BLE001 - an unreadable technical tag is left out, never quoted
            continue
        if value not in (None, ""):
            safe[tag] = value if isinstance(value, (int, float)) else str(value)
    rows, columns, frames, samples, bits, photometric = _image_geometry(ds)
    array = _decode_first_frame(ds, rows, columns, frames, samples, bits)
    notes = []
    if frames > 1:
        notes.append(f"the DICOM file holds {frames} frames; the first one was used")
    array = _reduce(array, notes)
    pixels = _display(ds, array, photometric, notes)
    return LoadedImage(pixels=np.ascontiguousarray(pixels, dtype=np.float32), kind="DICOM", notes=notes, dicom=safe)


__all__ = ["DICOM_SAFE_TAGS", "DICOM_SUFFIXES", "read_dicom"]
