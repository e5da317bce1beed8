"""Reading uploaded chest X-rays for the app: images of every common kind and DICOM, with guards.

Uploads are untrusted. Every check that can be made from the header (file size, pixel count, format) is made before
any pixel is decoded, so a decompression bomb never reaches memory; every failure is an `InputError` subclass whose
message can be shown to the user as is. DICOM files are turned into display pixels the way a viewer would (modality
rescale, VOI LUT or window, MONOCHROME1 inverted), and only a whitelist of technical tags is kept: patient-identifying
tags never leave this module.

Not part of the Hub-uploaded model: nothing in the model files imports this module.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from modeling_cnn_lstm.image_processing_cnn_lstm import to_canonical_array

MAX_FILE_BYTES = 64 * 1024 * 1024  # a 16-bit 4300x4300 DICOM is ~37 MB uncompressed
MAX_PIXELS = 50_000_000  # 7000x7000; the largest flat-panel detectors are ~4300x4300 (18.5 MP)
MIN_SIDE = 64  # the model reads 224x224; below 64 px there is no anatomy left to read
IMAGE_FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "MPO": "JPEG", "BMP": "BMP", "TIFF": "TIFF", "WEBP": "WebP"}
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
ACCEPTED_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", *DICOM_SUFFIXES)
# Technical DICOM tags that are safe to show; nothing else is read from the header.
DICOM_SAFE_TAGS = ("Modality", "PhotometricInterpretation", "BitsStored", "Rows", "Columns", "NumberOfFrames",
                   "ViewPosition", "BodyPartExamined")

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a half-grey image


class InputError(ValueError):
    """An upload the app cannot read; the message is meant for the user."""


class NotAnImageError(InputError):
    """The file is not an image at all (text, PDF, archive, ...)."""


class UnsupportedImageError(InputError):
    """An image, but of a kind the app does not read (format, colour model, compression)."""


class CorruptImageError(InputError):
    """The file claims to be an image but cannot be decoded (damaged or truncated)."""


class ImageTooLargeError(InputError):
    """File size or pixel count over the limits (decompression-bomb guard)."""


class ImageTooSmallError(InputError):
    """Too few pixels to hold a radiograph."""


@dataclass
class LoadedImage:
    """Decoded pixels ready for the processor, plus what the user may be told about the file."""

    pixels: np.ndarray  # float32 HxWxC (C = 1 or 3), 0..255 scale, display orientation
    kind: str  # "PNG", "JPEG", "DICOM", ...
    notes: list[str] = field(default_factory=list)  # things done to the input that the user should know
    dicom: dict[str, object] = field(default_factory=dict)  # DICOM_SAFE_TAGS only

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    def model_input(self) -> np.ndarray:
        """Pixels on [0, 1] as float32: the processor's documented rule for floats in [0, 1] is "times 255",
        so the values it sees are exactly ours (a dark 0..255 image is never mistaken for a [0, 1] one)."""
        return np.clip(self.pixels / 255.0, 0.0, 1.0).astype(np.float32)

    def display_uint8(self) -> np.ndarray:
        """HxW (grey) or HxWx3 (colour) uint8 for overlays and previews."""
        pixels = np.clip(np.rint(self.pixels), 0, 255).astype(np.uint8)
        return pixels[..., 0] if pixels.shape[-1] == 1 else pixels


def _check_dimensions(width: int, height: int, frames: int = 1) -> None:
    if width * height * max(frames, 1) > MAX_PIXELS or max(width, height) > 30_000:
        raise _too_large(width * height * max(frames, 1))
    if min(width, height) < MIN_SIDE:
        raise ImageTooSmallError(
            f"The image is too small ({width}x{height} pixels); a chest X-ray needs at least {MIN_SIDE} pixels a side."
        )


def _looks_like_text(head: bytes) -> bool:
    if not head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(char.isprintable() or char in "\r\n\t" for char in text)


_SIGNATURES = {
    b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"BM": "BMP",
}


def _describe_non_image(head: bytes) -> str:
    if not head:
        return "The file is empty."
    if head.startswith(b"%PDF"):
        return "The file is a PDF document, not an image. Export the X-ray as PNG, JPEG or DICOM."
    if head.startswith((b"PK\x03\x04", b"\x1f\x8b", b"7z\xbc\xaf", b"Rar!")):
        return "The file is an archive, not an image. Unpack it and upload the X-ray itself."
    if _looks_like_text(head[:512]):
        return "The file contains text, not an image (was it renamed?). Upload a PNG, JPEG, BMP, TIFF or DICOM file."
    return "The file is not a readable image. Upload a PNG, JPEG, BMP, TIFF or DICOM file."


def _too_large(pixels: float) -> ImageTooLargeError:
    return ImageTooLargeError(
        f"The image is too large ({pixels / 1e6:.0f} megapixels); the limit is {MAX_PIXELS / 1e6:.0f} megapixels. "
        "Downscale it (a chest X-ray needs no more than ~3000 px a side)."
    )


def _read_pil(path: Path, head: bytes) -> LoadedImage:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own, lower limit follows
            image = Image.open(path)
    except Image.DecompressionBombError as error:  # PIL's own header check (> ~179 MP) came first
        found = re.search(r"\((\d+) pixels\)", str(error))
        raise _too_large(float(found.group(1)) if found else 2 * MAX_PIXELS) from None
    except UnidentifiedImageError:
        claimed = next((kind for magic, kind in _SIGNATURES.items() if head.startswith(magic)), None)
        if claimed:  # the right magic number, then garbage
            message = f"The file starts like a {claimed} image but is damaged: it cannot be read."
            raise CorruptImageError(message) from None
        raise NotAnImageError(_describe_non_image(head)) from None
    except (OSError, SyntaxError, ValueError) as error:
        raise CorruptImageError(f"The image file is damaged and cannot be read ({error}).") from None
    with image:
        if image.format not in IMAGE_FORMATS:
            raise UnsupportedImageError(
                f"{image.format} images are not supported. Upload a PNG, JPEG, BMP, TIFF or DICOM file."
            )
        kind = IMAGE_FORMATS[image.format]
        _check_dimensions(image.width, image.height)  # header only: nothing is decoded yet
        notes = []
        if getattr(image, "n_frames", 1) > 1:
            notes.append(f"the file holds {image.n_frames} frames; the first one was used")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image.load()
                image = ImageOps.exif_transpose(image)  # photos of films carry an orientation tag
                pixels = to_canonical_array(image)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageTooLargeError("The image is too large to decode safely (decompression-bomb guard).") from None
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            reason = "truncated" if "truncat" in str(error).lower() else "damaged"
            raise CorruptImageError(f"The image file is {reason} and cannot be decoded ({error}).") from None
        mode = image.mode
        has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info
        if has_alpha and mode in ("RGBA", "LA"):
            has_alpha = image.getchannel("A").getextrema()[0] < 255
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        notes.append("16-bit image: its full range was scaled to 8-bit brightness")
    if has_alpha:
        notes.append("transparent pixels were composited on black")
    if mode == "CMYK":
        notes.append("CMYK image converted to RGB")
    return LoadedImage(pixels=pixels, kind=kind, notes=notes)


def _voi_output_range(ds, used_lut: bool) -> tuple[float, float]:
    """The value range the VOI step maps into (PS3.3 C.11.2), so that 0..255 keeps the window's contrast."""
    if used_lut:
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2**bits - 1)
    bits = int(ds.BitsStored)
    if ds.get("ModalityLUTSequence"):
        low, high = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif int(ds.PixelRepresentation) == 0:
        low, high = 0.0, float(2**bits - 1)
    else:
        low, high = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        low, high = low * float(slope) + float(intercept), high * float(slope) + float(intercept)
    return min(low, high), max(low, high)


def _stretch(values: np.ndarray, low: float, high: float) -> np.ndarray:
    span = high - low
    if not np.isfinite(span) or span <= 0:
        return np.zeros_like(values, dtype=np.float32)
    return (np.clip((values - low) / span, 0.0, 1.0) * 255.0).astype(np.float32)


def _read_dicom(path: Path) -> LoadedImage:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(path, force=path.suffix.lower() in DICOM_SUFFIXES)
    except InvalidDicomError:
        raise NotAnImageError("The file is not a valid DICOM file.") from None
    except Exception as error:  # noqa: BLE001 - pydicom raises many types for damaged files
        raise CorruptImageError(f"The DICOM file is damaged and cannot be read ({type(error).__name__}).") from None
    if "PixelData" not in ds:
        raise NotAnImageError("The DICOM file holds no image (no Pixel Data): is it a report or structured document?")
    safe = {tag: ds.get(tag) for tag in DICOM_SAFE_TAGS if ds.get(tag) not in (None, "")}
    safe = {tag: (value if isinstance(value, (int, float)) else str(value)) for tag, value in safe.items()}
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames") or 1)
        photometric = str(ds.PhotometricInterpretation).upper()
    except (AttributeError, TypeError, ValueError):
        raise CorruptImageError("The DICOM file lacks the image size or photometric interpretation tags.") from None
    _check_dimensions(columns, rows, frames)
    if photometric == "PALETTE COLOR":
        raise UnsupportedImageError("Palette-colour DICOM images are not supported; radiographs are greyscale.")
    try:
        array = ds.pixel_array
    except Exception as error:  # noqa: BLE001 - missing decoder plugins, damaged pixel data
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", str(syntax))
        if syntax is not None and getattr(syntax, "is_compressed", False):
            raise UnsupportedImageError(
                f"This DICOM file is compressed ({name}) and no decoder for it is installed here. Install "
                "pylibjpeg with its plugins, or export the image as uncompressed DICOM, PNG or JPEG."
            ) from None
        raise CorruptImageError(f"The DICOM pixel data cannot be decoded ({type(error).__name__}).") from None
    notes = []
    if frames > 1:
        array = array[0]
        notes.append(f"the DICOM file holds {frames} frames; the first one was used")
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        values = apply_modality_lut(array, ds)  # rescale slope/intercept or modality LUT
        if ds.get("VOILUTSequence"):
            values = apply_voi_lut(np.rint(values).astype(np.int64), ds, prefer_lut=True)  # a LUT takes integers
            low, high = _voi_output_range(ds, used_lut=True)
            notes.append("DICOM VOI LUT applied")
        elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
            values = apply_voi_lut(values.astype(np.float64), ds, prefer_lut=False)
            low, high = _voi_output_range(ds, used_lut=False)
            notes.append("DICOM window (centre/width) applied")
        else:
            # No VOI in the file: stretch the 0.5th..99.5th percentiles, as viewers do for raw detector data.
            low, high = (float(v) for v in np.percentile(values, [0.5, 99.5]))
            values = values.astype(np.float64)
            notes.append("no DICOM window given: the 0.5-99.5 percentile range was stretched")
        grey = _stretch(values, low, high)
        if photometric == "MONOCHROME1":  # MONOCHROME1: high values are dark; flip to the usual display
            grey = 255.0 - grey
            notes.append("MONOCHROME1 image inverted for display")
        pixels = grey[..., None]
    elif array.ndim == 3 and array.shape[-1] == 3:  # RGB and YBR (pydicom converts YBR to RGB)
        pixels = to_canonical_array(np.ascontiguousarray(array))
    else:
        raise UnsupportedImageError(f"DICOM photometric interpretation {photometric} is not supported.")
    return LoadedImage(pixels=np.ascontiguousarray(pixels, dtype=np.float32), kind="DICOM", notes=notes, dicom=safe)


def is_dicom(path: Path, head: bytes) -> bool:
    """The DICOM preamble ("DICM" at byte 128), or a DICOM file suffix (raw files without a preamble exist)."""
    return head[128:132] == b"DICM" or path.suffix.lower() in DICOM_SUFFIXES


def read_upload(path: str | Path) -> LoadedImage:
    """One uploaded file -> `LoadedImage`, or an `InputError` with a message for the user."""
    if path is None or str(path) == "":
        raise InputError("No file was uploaded. Choose a chest X-ray image (PNG, JPEG, BMP, TIFF or DICOM).")
    path = Path(path)
    if not path.is_file():
        raise InputError("The uploaded file could not be found on the server; please upload it again.")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ImageTooLargeError(
            f"The file is too large ({size / 2**20:.0f} MB); the limit is {MAX_FILE_BYTES // 2**20} MB."
        )
    if size == 0:
        raise NotAnImageError("The file is empty.")
    with path.open("rb") as handle:
        head = handle.read(1024)
    if is_dicom(path, head):
        return _read_dicom(path)
    return _read_pil(path, head)


__all__ = [
    "ACCEPTED_SUFFIXES",
    "CorruptImageError",
    "ImageTooLargeError",
    "ImageTooSmallError",
    "InputError",
    "LoadedImage",
    "NotAnImageError",
    "UnsupportedImageError",
    "read_upload",
]
