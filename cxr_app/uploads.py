"""Reading uploaded chest X-rays for the app: images of every common kind and DICOM, with guards.

Uploads are untrusted, and a public Space gets files crafted to exhaust memory. Every check that can be made from
the header (file size, pixel count, format, the file's own structure) is made before any pixel is decoded, only the
first frame of a multi-frame file is decoded, and the decoded pixels are kept within a fixed budget
(`upload_types`: all bounds derive from `MAX_PIXELS`). Every failure is an `InputError` subclass whose message can be
shown to the user as is. DICOM files go to `dicom_upload`.

Images (PNG, JPEG, BMP, TIFF, WebP) are opened by Pillow restricted to those formats, with its decompression-bomb
limit set to `MAX_PIXELS`. What Pillow acts on while opening a file is checked by `codestreams` first: a TIFF's
first directory (Pillow reads a tag's data once per tag that points at it: 30 tags on one 8 MB block took 480 MB,
measured), a PNG's chunk list (every text chunk is kept), a JPEG's EXIF block (Pillow joins every APP1 Exif segment
and loads the block at open: a 20 MB file got Pillow alone killed for memory). The EXIF orientation is read there
too, not by `ImageOps.exif_transpose`, which loads and rewrites every tag. Animated WebP canvases are limited to
`MAX_ANIMATED_PIXELS`.

`read_upload_cached` is what the app calls: one upload is read by predict and then explain (and again when the
saliency method changes), so decoded uploads are kept in a small cache bounded in bytes and entries.

Not part of the Hub-uploaded model: nothing in the model files imports this module.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from modeling_cnn_lstm.image_processing_cnn_lstm import to_canonical_array

from . import codestreams
from .dicom_header import DICOM_SAFE_TAGS, DICOM_SUFFIXES
from .dicom_upload import read_dicom
from .upload_types import (
    MAX_FILE_BYTES,
    MAX_PIXELS,
    MIN_SIDE,
    CorruptImageError,
    ImageTooLargeError,
    ImageTooSmallError,
    InputError,
    LoadedImage,
    NotAnImageError,
    UnsupportedImageError,
    block_means,
    check_dimensions,
    check_finite,
    reduction_factor,
    reduction_note,
    too_large,
)

IMAGE_FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "MPO": "JPEG", "BMP": "BMP", "TIFF": "TIFF", "WEBP": "WebP"}
PIL_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")  # Pillow's other plugins never see an upload (MPO: via JPEG)
ACCEPTED_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", *DICOM_SUFFIXES)
UPLOAD_FORMATS = "Upload a PNG, JPEG, BMP, TIFF, WebP or DICOM file."  # what every refusal suggests
# Pillow decodes an animated WebP through four full-canvas RGBA buffers (+772 MB for a 49 MP canvas, measured)
MAX_ANIMATED_PIXELS = MAX_PIXELS // 4
CACHE_BYTES = 256 * 2**20  # decoded pixels kept for the next call on the same upload
CACHE_ENTRIES = 16
CACHE_SECONDS = 900.0  # predict, explain and a few saliency methods on one upload take a few minutes at most

logger = logging.getLogger(__name__)
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a half-grey image
Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # Pillow warns above this at open and refuses above twice this


def _looks_like_text(head: bytes) -> bool:
    if not head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(char.isprintable() or char in "\r\n\t" for char in text)


_SIGNATURES = {
    b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"II+\x00": "TIFF",
    b"MM\x00+": "TIFF", b"BM": "BMP",
}
_OTHER_IMAGES = {b"GIF87a": "GIF", b"GIF89a": "GIF", b"8BPS": "Photoshop", b"\x00\x00\x01\x00": "ICO",
                 b"\x00\x00\x00\x0cjP  ": "JPEG 2000", b"\xff\x4f\xff\x51": "JPEG 2000", b"\xff\x0a": "JPEG XL",
                 b"\x00\x00\x00\x0cJXL ": "JPEG XL", b"qoif": "QOI"}


def _describe_non_image(head: bytes) -> str:
    if not head:
        return "The file is empty."
    if head.startswith(b"%PDF"):
        return "The file is a PDF document, not an image. Export the X-ray as PNG, JPEG or DICOM."
    if head.startswith((b"PK\x03\x04", b"\x1f\x8b", b"7z\xbc\xaf", b"Rar!")):
        return "The file is an archive, not an image. Unpack it and upload the X-ray itself."
    if _looks_like_text(head[:512]):
        return f"The file contains text, not an image (was it renamed?). {UPLOAD_FORMATS}"
    return f"The file is not a readable image. {UPLOAD_FORMATS}"


def _unidentified(head: bytes) -> InputError:
    other = next((kind for magic, kind in _OTHER_IMAGES.items() if head.startswith(magic)), None)
    if other is None and head[4:8] == b"ftyp":
        other = "HEIF/AVIF"
    if other:
        return UnsupportedImageError(f"{other} images are not supported. {UPLOAD_FORMATS}")
    claimed = next((kind for magic, kind in _SIGNATURES.items() if head.startswith(magic)), None)
    if claimed:  # the right magic number, then garbage
        return CorruptImageError(f"The file starts like a {claimed} image but is damaged: it cannot be read.")
    return NotAnImageError(_describe_non_image(head))


def _damaged(action: str, error: Exception) -> CorruptImageError:
    """Pillow's usual errors for damaged files are OSError, SyntaxError, ValueError and EOFError; anything else is
    logged with its traceback (it may be a bug of ours) and told to the user the same way."""
    if not isinstance(error, (OSError, SyntaxError, ValueError, EOFError)):
        logger.warning("unusual error while the image was %s", action, exc_info=error)
    text = str(error).lower()
    if "truncat" in text or "not large enough" in text or "not enough data" in text:  # Pillow's words for short data
        return CorruptImageError(
            f"The file is incomplete (truncated): it holds less image data than it declares, so it cannot be "
            f"{action} ({type(error).__name__})."
        )
    return CorruptImageError(f"The image file is damaged and cannot be {action} ({type(error).__name__}).")


def _check_structure(path: Path, head: bytes, size: int) -> codestreams.TiffLayout | None:
    """The declarations Pillow acts on while opening a file, before any size check of ours: TIFF directory, PNG
    chunk list, JPEG EXIF and MPF blocks."""
    kind = next((kind for magic, kind in _SIGNATURES.items() if head.startswith(magic)), None)
    if kind not in ("TIFF", "PNG", "JPEG"):
        return None
    try:
        with path.open("rb") as handle:
            if kind == "PNG":
                codestreams.png_chunk_counts(handle, size)
                codestreams.png_image_data(handle, size, MAX_PIXELS)  # a short IDAT stream would be padded black
                return None
            if kind == "JPEG":  # Pillow loads the EXIF block at open (to look for a DPI), the MPF index too
                for block in codestreams.jpeg_metadata(handle, size):
                    codestreams.check_ifd_block(block)
                handle.seek(0)
                codestreams.jpeg_scans(handle.read(), MAX_PIXELS)  # scan count (CPU), data too short for the frame
                return None
            return codestreams.tiff_layout(handle, size)
    except codestreams.TooComplex as error:
        raise ImageTooLargeError(
            f"The {kind} file declares more structure than an image of its size can need ({error}); it is refused "
            "as a decompression bomb."
        ) from None
    except codestreams.Malformed:
        raise CorruptImageError(f"The file starts like a {kind} image but is damaged: it cannot be read.") from None
    except codestreams.Incomplete as error:
        raise CorruptImageError(
            f"The file is incomplete (truncated): {error}. A decoder would fill in the missing part and the model "
            "would answer for an image that is mostly padding, so it is refused. Export or copy the X-ray again."
        ) from None


def _orientation(image: Image.Image, layout: codestreams.TiffLayout | None) -> int:
    """EXIF orientation (1..8) without loading the EXIF block through Pillow; XMP's tiff:Orientation as a fallback,
    as Pillow does."""
    orientation = layout.orientation if layout else codestreams.exif_orientation(image.info.get("exif"))
    if orientation == 1:
        xmp = image.info.get("xmp") or image.info.get("XML:com.adobe.xmp") or b""
        text = xmp.decode("utf-8", "ignore") if isinstance(xmp, bytes) else str(xmp)
        marker = text.find("tiff:Orientation")
        digits = [char for char in text[marker + 16 : marker + 20] if char.isdigit()] if marker >= 0 else []
        orientation = int(digits[0]) if digits and digits[0] in "12345678" else 1
    return orientation


_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
_REDUCIBLE = ("L", "LA", "La", "PA", "RGB", "RGBA", "RGBa", "CMYK", "YCbCr", "I", "F")  # Image.reduce's modes


def _to_pixels(image: Image.Image, notes: list[str]) -> np.ndarray:
    """Decoded image -> float32 HxWxC, reduced first when it holds more than MAX_WORKING_VALUES values."""
    channels = 1 if image.mode in ("1", "L", "I", "F", *_SIXTEEN_BIT) else 3
    factor = reduction_factor(image.width, image.height, channels)
    before = image.size
    if image.mode == "F" or (factor > 1 and image.mode in _SIXTEEN_BIT):  # Pillow cannot reduce I;16
        array = np.asarray(image, dtype=np.float32 if image.mode == "F" else np.uint16)
        if image.mode == "F":
            check_finite(array)
            low, high = float(array.min()), float(array.max())
            if (low < 0 or high > 255) and high > low:  # the processor's min-max rule, in float64: +-3e38 overflows
                array = ((array.astype(np.float64) - low) * (255.0 / (high - low))).astype(np.float32)
        if factor > 1:
            array = block_means(array, factor)
            notes.append(reduction_note(before, (array.shape[1], array.shape[0])))
        return to_canonical_array(array)
    if factor > 1:
        if image.mode == "1":
            image = image.convert("L")
        elif image.mode == "P":
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        elif image.mode not in _REDUCIBLE:  # LAB, HSV, ...: what the processor would turn them into
            image = image.convert("RGB")
        image = image.reduce(factor)
        notes.append(reduction_note(before, image.size))
    return to_canonical_array(image)


def _frame_note(image: Image.Image, layout: codestreams.TiffLayout | None) -> str | None:
    """Multi-frame files: which frame was used. TIFF pages are never counted (Pillow walks every directory)."""
    if layout is not None:
        return "the file holds several pages; the first one was used" if layout.more_frames else None
    frames = getattr(image, "n_frames", 1)  # PNG (acTL), WebP and MPO say it in their header
    return f"the file holds {frames} frames; the first one was used" if frames > 1 else None


def _read_pil(path: Path, head: bytes, size: int) -> LoadedImage:
    layout = _check_structure(path, head, size)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own message follows
            image = Image.open(path, formats=PIL_FORMATS)
    except Image.DecompressionBombError as error:  # Pillow's own header check (> 2 x MAX_PIXELS) came first
        found = re.search(r"\((\d+) pixels\)", str(error))
        raise too_large(float(found.group(1)) if found else 2 * MAX_PIXELS) from None
    except UnidentifiedImageError:
        raise _unidentified(head) from None
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - crafted headers reach corners of Pillow that raise anything
        raise _damaged("read", error) from None
    with image:
        kind = IMAGE_FORMATS.get(image.format)
        if kind is None:
            raise UnsupportedImageError(
                f"{image.format} images are not supported. {UPLOAD_FORMATS}"
            )
        check_dimensions(image.width, image.height)  # header only: nothing is decoded yet
        notes = [note] if (note := _frame_note(image, layout)) else []
        if kind == "WebP" and notes and image.width * image.height > MAX_ANIMATED_PIXELS:
            raise ImageTooLargeError(
                f"Animated WebP images are limited to {MAX_ANIMATED_PIXELS / 1e6:.1f} megapixels (this one is "
                f"{image.width * image.height / 1e6:.0f}): they decode through several full-size buffers. Save the "
                "X-ray as a still image."
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image.load()  # the first frame only
                if (orientation := _orientation(image, layout)) in _TRANSPOSE:  # photos of films carry one
                    image = image.transpose(_TRANSPOSE[orientation])
                mode = image.mode
                pixels = _to_pixels(image, notes)
        except (InputError, MemoryError):
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageTooLargeError("The image is too large to decode safely (decompression-bomb guard).") from None
        except Exception as error:  # noqa: BLE001 - crafted data reaches corners of Pillow that raise anything
            raise _damaged("decoded", error) from None
        has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info
        if has_alpha and mode in ("RGBA", "LA"):
            has_alpha = image.getchannel("A").getextrema()[0] < 255
    if mode in (*_SIXTEEN_BIT, "I"):
        notes.append("16-bit image: its full range was scaled to 8-bit brightness")
    if has_alpha:
        notes.append("transparent pixels were composited on black")
    if mode == "CMYK":
        notes.append("CMYK image converted to RGB")
    return LoadedImage(pixels=pixels, kind=kind, notes=notes)


def is_dicom(path: Path, head: bytes) -> bool:
    """The DICOM preamble ("DICM" at byte 128), or a DICOM file suffix (raw files without a preamble exist)."""
    return head[128:132] == b"DICM" or path.suffix.lower() in DICOM_SUFFIXES


def _upload_path(path: str | Path | None) -> Path:
    if path is None or str(path) == "":
        raise InputError("No file was uploaded. Choose a chest X-ray image (PNG, JPEG, BMP, TIFF, WebP or DICOM).")
    path = Path(path)
    if not path.is_file():
        raise InputError("The uploaded file could not be found on the server; please upload it again.")
    return path


def read_upload(path: str | Path | None) -> LoadedImage:
    """One uploaded file -> `LoadedImage`, or an `InputError` with a message for the user."""
    path = _upload_path(path)
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
        return read_dicom(path)
    return _read_pil(path, head, size)


class DecodeCache:
    """Recently decoded uploads (or the InputError they raised), keyed by the file's identity: resolved path, size,
    modification time and inode, so a file replaced in place is read again. Bounded by CACHE_BYTES of pixels and
    CACHE_ENTRIES, least recently used out first; an entry older than CACHE_SECONDS is dropped, so decoded pixels
    do not outlive the upload's use (its file may be deleted by then). Thread-safe (Gradio runs predict and explain
    in worker threads); cached pixels are read-only and every caller gets its own LoadedImage (notes, tags copied)."""

    def __init__(self, max_bytes: int = CACHE_BYTES, max_entries: int = CACHE_ENTRIES,
                 max_age_s: float = CACHE_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes, self.max_entries, self.max_age_s, self.clock = max_bytes, max_entries, max_age_s, clock
        self._entries: OrderedDict[tuple, tuple[float, LoadedImage | InputError]] = OrderedDict()  # recency order
        self._age: dict[tuple, None] = {}  # the same keys in insertion order: oldest first
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @staticmethod
    def _cost(entry: LoadedImage | InputError) -> int:
        return entry.pixels.nbytes if isinstance(entry, LoadedImage) else 0

    @staticmethod
    def _copy(entry: LoadedImage | InputError) -> LoadedImage:
        if isinstance(entry, InputError):
            raise type(entry)(str(entry))
        return replace(entry, notes=list(entry.notes), dicom=dict(entry.dicom))

    def _drop_expired(self) -> None:
        """Under the lock: entries stored more than max_age_s ago (a hit does not renew an entry)."""
        horizon = self.clock() - self.max_age_s
        while self._age and self._entries[oldest := next(iter(self._age))][0] < horizon:
            del self._age[oldest]
            self._bytes -= self._cost(self._entries.pop(oldest)[1])

    def read(self, path: str | Path | None) -> LoadedImage:
        path = _upload_path(path)
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
        with self._lock:
            self._drop_expired()
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
            self.hits += found is not None
            self.misses += found is None
        if found is not None:
            return self._copy(found[1])
        try:
            entry = read_upload(path)
            entry.pixels.flags.writeable = False
        except InputError as error:
            entry = error
        self._store(key, entry)
        return self._copy(entry)

    def _store(self, key: tuple, entry: LoadedImage | InputError) -> None:
        cost = self._cost(entry)
        if cost > self.max_bytes:
            return
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = (self.clock(), entry)
            self._age[key] = None
            self._bytes += cost
            while self._bytes > self.max_bytes or len(self._entries) > self.max_entries:
                dropped, (_, value) = self._entries.popitem(last=False)
                del self._age[dropped]
                self._bytes -= self._cost(value)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._age.clear()
            self._bytes = 0

    @property
    def size(self) -> tuple[int, int]:
        """(entries, bytes of pixels) held now."""
        with self._lock:
            self._drop_expired()
            return len(self._entries), self._bytes


DECODE_CACHE = DecodeCache()


def read_upload_cached(path: str | Path | None) -> LoadedImage:
    """`read_upload` through the app's decode cache: what predict and explain call."""
    return DECODE_CACHE.read(path)


__all__ = [
    "ACCEPTED_SUFFIXES",
    "DECODE_CACHE",
    "DICOM_SAFE_TAGS",
    "MAX_FILE_BYTES",
    "MAX_PIXELS",
    "MIN_SIDE",
    "CorruptImageError",
    "DecodeCache",
    "ImageTooLargeError",
    "ImageTooSmallError",
    "InputError",
    "LoadedImage",
    "NotAnImageError",
    "UnsupportedImageError",
    "read_upload",
    "read_upload_cached",
]
