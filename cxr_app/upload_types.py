"""The limits, error classes and `LoadedImage` shared by the image reader (`uploads`) and the DICOM reader
(`dicom_upload`).

Every memory bound of upload reading derives from `MAX_PIXELS`, so one number sets what a crafted file can cost:

- decoding: no decoder is started on more than `MAX_PIXELS` pixels (header checks first; Pillow's own bomb guard set
  to the same limit), and only the first frame of a multi-frame file is decoded;
- analysis: decoded pixels are kept as float32, at most `MAX_WORKING_VALUES` values (pixels x channels); a larger
  image is reduced by a whole factor first (box filter). 20 M values let every real detector image (4300x4300 grey,
  18.5 MP) through unchanged and keep one float copy at 80 MB: a 49 MP colour image kept whole cost 2.3 GB of peak
  memory in `predict` (measured), ~90 MB per copy after the reduction;
- DICOM: a deflated file may inflate to `DEFLATED_BUDGET` bytes (a `MAX_PIXELS` 16-bit image plus header room), and
  the header may make pydicom parse at most `MAX_DICOM_READS` elements (each empty sequence item becomes a ~0.7 KB
  Python object: a 3.8 MB file of them took 350 MB, measured).

Not part of the Hub-uploaded model: nothing in the model files imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MAX_FILE_BYTES = 64 * 1024 * 1024  # a 16-bit 4300x4300 DICOM is ~37 MB uncompressed
MAX_PIXELS = 50_000_000  # 7000x7000; the largest flat-panel detectors are ~4300x4300 (18.5 MP)
MAX_SIDE = 30_000  # a 30000x1700 strip is within MAX_PIXELS but no radiograph
MIN_SIDE = 64  # the model reads 224x224; below 64 px there is no anatomy left to read
MAX_WORKING_VALUES = 20_000_000  # float32 values kept per image (pixels x channels): 80 MB
DEFLATED_BUDGET = MAX_PIXELS * 2 + 16 * 1024 * 1024  # bytes a deflated DICOM may inflate to
MAX_DICOM_READS = 200_000  # reads pydicom may make while parsing a header: at most ~140 MB of Python objects


class InputError(ValueError):
    """An upload the app cannot read; the message is meant for the user."""


class NotAnImageError(InputError):
    """The file is not an image at all (text, PDF, archive, ...)."""


class UnsupportedImageError(InputError):
    """An image, but of a kind the app does not read (format, colour model, compression)."""


class CorruptImageError(InputError):
    """The file claims to be an image but cannot be decoded (damaged, truncated, or impossible values)."""


class ImageTooLargeError(InputError):
    """File size, pixel count or declared structure over the limits (decompression-bomb guard)."""


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
        so the values it sees are exactly ours (a dark 0..255 image is never mistaken for a [0, 1] one).
        One new array, scaled and clipped in place (the pixels may be shared through the decode cache)."""
        scaled = self.pixels / np.float32(255.0)
        return np.clip(scaled, 0.0, 1.0, out=scaled)

    def display_uint8(self) -> np.ndarray:
        """HxW (grey) or HxWx3 (colour) uint8 for overlays and previews."""
        pixels = np.clip(np.rint(self.pixels), 0, 255).astype(np.uint8)
        return pixels[..., 0] if pixels.shape[-1] == 1 else pixels


def too_large(pixels: float) -> ImageTooLargeError:
    return ImageTooLargeError(
        f"The image is too large ({pixels / 1e6:.0f} megapixels); the limit is {MAX_PIXELS / 1e6:.0f} megapixels. "
        "Downscale it (a chest X-ray needs no more than ~3000 px a side)."
    )


def check_dimensions(width: int, height: int) -> None:
    """Header sizes against the limits, before anything is decoded."""
    if width * height > MAX_PIXELS or max(width, height) > MAX_SIDE:
        raise too_large(width * height)
    if min(width, height) < MIN_SIDE:
        raise ImageTooSmallError(
            f"The image is too small ({width}x{height} pixels); a chest X-ray needs at least {MIN_SIDE} pixels a side."
        )


def reduction_factor(width: int, height: int, channels: int) -> int:
    """The smallest whole factor that brings width x height x channels within MAX_WORKING_VALUES (1: none)."""
    factor = 1
    while -(-width // factor) * -(-height // factor) * channels > MAX_WORKING_VALUES:
        factor += 1
    return factor


def block_means(array: np.ndarray, factor: int) -> np.ndarray:
    """HxW[xC] array -> means over factor x factor blocks (the edge remainder dropped), in the array's own dtype.
    Accumulated one block offset at a time: temporaries are the reduced size, never the full one (a reshape-mean
    over two axes took a full-size float64 copy: 400 MB for a 49 MP 16-bit image, measured)."""
    rows, columns = array.shape[0] // factor, array.shape[1] // factor
    total = np.zeros((rows, columns, *array.shape[2:]), dtype=np.float64)
    for row in range(factor):
        for column in range(factor):
            total += array[row : rows * factor : factor, column : columns * factor : factor]
    total /= factor * factor
    return np.rint(total).astype(array.dtype) if np.issubdtype(array.dtype, np.integer) else total.astype(array.dtype)


def reduction_note(before: tuple[int, int], after: tuple[int, int]) -> str:
    """(width, height) before and after the reduction, for the user."""
    return (f"large image ({before[0]}x{before[1]} px) reduced to {after[0]}x{after[1]} px for analysis (the model "
            "reads 224x224 px)")


def check_finite(values: np.ndarray) -> None:
    """NaN or infinite pixels have no brightness to show: refused, not turned into black."""
    if not np.isfinite(values).all():
        raise CorruptImageError(
            "The image holds pixel values that are not numbers (NaN) or are infinite, so it cannot be shown or "
            "analysed. Export it again from the source software."
        )


__all__ = ["DEFLATED_BUDGET", "MAX_DICOM_READS", "MAX_FILE_BYTES", "MAX_PIXELS", "MAX_SIDE", "MAX_WORKING_VALUES",
           "MIN_SIDE", "CorruptImageError", "ImageTooLargeError", "ImageTooSmallError", "InputError", "LoadedImage",
           "NotAnImageError", "UnsupportedImageError", "block_means", "check_dimensions", "check_finite",
           "reduction_factor", "reduction_note", "too_large"]
