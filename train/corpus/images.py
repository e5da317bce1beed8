"""Opening, fingerprinting and re-encoding single images: the one place where corpus images are decoded.

Fingerprints:
- `sha256`: SHA-256 of the *decoded pixels* (mode, size and raw pixel bytes), not of the file bytes, so one
  picture saved twice (other file name, PNG chunk metadata, lossless re-save) is still an exact duplicate.
- perceptual hash: a 256-bit DCT pHash (grayscale, 32x32 Lanczos, 2-D DCT-II, the 16x16 lowest frequencies,
  each bit = coefficient above their median). Two images are near-duplicates when their Hamming distance is at
  most `PHASH_THRESHOLD`.

Why 256 bits and 40: chest X-rays look alike, so the common 64-bit pHash puts distinct cxr3 images of different
patients 4-8 bits apart, inside the range of a mere re-crop. With 256 bits, measured on ../shared/data/cxr3
(1,038 images, 538k pairs): the closest pair of *distinct* images is 52 bits apart (0.001% quantile 56), while
copies of each image stay within: resize to 256 px or 224x224 <= 8, JPEG q20-50 <= 12, contrast x1.2 <= 30,
brightness x1.1 <= 20, 0.5% crop per side <= 20, 1% crop per side <= 37 for 99% of images (max 46), 1.5% crop
<= 40 for ~90%. So 40 catches resizes, recompressions, tone changes and crops of up to ~1% per side, and keeps a
12-bit margin to the closest distinct pair. Larger crops, rotations or overlays are not caught. A false merge
only joins two patient groups (conservative); a miss can leak, hence the threshold sits close to the margin.
"""

import hashlib
import io
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from modeling_cnn_lstm.image_processing_cnn_lstm import to_canonical_array

PHASH_SIZE = 16  # 16x16 low frequencies -> 256 bits
PHASH_BITS = PHASH_SIZE * PHASH_SIZE
PHASH_THRESHOLD = 40
_PHASH_INPUT = 32
_HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


class ImageProblem(Exception):
    """An individual image that cannot be used; it is skipped and listed in the report with this reason."""


@dataclass
class LoadedImage:
    """What the builder keeps of one decoded image."""

    sha256: str
    phash: np.ndarray  # uint64 words of the packed 256-bit hash
    mode: str
    width: int
    height: int
    format: str
    data: bytes  # bytes to store: the original file, or the re-encoded image when pre-resizing
    stored_suffix: str


def _dct_matrix(size: int) -> np.ndarray:
    """Orthonormal DCT-II basis (rows = frequencies), so `D @ X @ D.T` is the 2-D DCT without scipy."""
    frequency = np.arange(size)[:, None]
    position = np.arange(size)[None, :]
    basis = np.cos(np.pi * (2 * position + 1) * frequency / (2 * size)) * np.sqrt(2.0 / size)
    basis[0] /= np.sqrt(2.0)
    return basis


_DCT = _dct_matrix(_PHASH_INPUT)


def to_gray8(image: Image.Image) -> Image.Image:
    """8-bit grayscale; 16-bit and float X-rays are min-max scaled instead of clipped by PIL's convert."""
    if image.mode in _HIGH_DEPTH_MODES:
        pixels = np.asarray(image, dtype=np.float64)
        low, high = float(pixels.min()), float(pixels.max())
        scaled = (pixels - low) * (255.0 / (high - low)) if high > low else np.zeros_like(pixels)
        return Image.fromarray(np.round(scaled).astype(np.uint8), "L")
    return image.convert("L")


def perceptual_hash(image: Image.Image) -> np.ndarray:
    """256-bit DCT pHash packed into four uint64 words (see the module docstring for why this size)."""
    small = to_gray8(image).resize((_PHASH_INPUT, _PHASH_INPUT), Image.Resampling.LANCZOS)
    coefficients = _DCT @ np.asarray(small, dtype=np.float64) @ _DCT.T  # (32, 32)
    low = coefficients[:PHASH_SIZE, :PHASH_SIZE].ravel()  # (256,)
    return np.packbits(low > np.median(low)).view(np.uint64).copy()


def _popcount(words: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2
        return np.bitwise_count(words)
    return np.unpackbits(words.view(np.uint8), axis=-1).reshape(*words.shape, 64).sum(-1)


def hamming_distance(hash_a: np.ndarray, hash_b: np.ndarray) -> int:
    return int(_popcount(np.bitwise_xor(hash_a, hash_b)).sum())


def near_duplicate_pairs(hashes: np.ndarray, threshold: int = PHASH_THRESHOLD) -> list[tuple[int, int, int]]:
    """All pairs (i, j, distance) with i < j and distance <= threshold; blockwise so memory stays bounded."""
    count = len(hashes)
    pairs: list[tuple[int, int, int]] = []
    if count < 2 or threshold < 0:
        return pairs
    block = max(1, 1_000_000 // count)
    for start in range(0, count, block):
        distances = _popcount(hashes[start : start + block, None, :] ^ hashes[None, :, :]).sum(-1)  # (block, N)
        rows, cols = np.nonzero(distances <= threshold)
        for row, col in zip(rows.tolist(), cols.tolist(), strict=True):
            if col > start + row:
                pairs.append((start + row, col, int(distances[row, col])))
    return pairs


def resize_longer_side(image: Image.Image, longer_side: int) -> Image.Image:
    """Shrink (never enlarge) so the longer side is `longer_side`; grayscale stays 8-bit gray, the rest RGB.

    Pixels are converted by the image processor's own rule (16-bit full range, alpha composited on black), so a
    pre-resized corpus holds what the model would see from the original file.
    """
    pixels = np.clip(np.round(to_canonical_array(image)), 0, 255).astype(np.uint8)  # HxWxC, C in (1, 3)
    image = Image.fromarray(pixels[..., 0], "L") if pixels.shape[-1] == 1 else Image.fromarray(pixels, "RGB")
    width, height = image.size
    scale = longer_side / max(width, height)
    if scale < 1:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return image


RESIZED_FORMATS = {"jpeg": ".jpg", "png": ".png"}


def encode_resized(image: Image.Image, fmt: str = "jpeg") -> bytes:
    """Storage for pre-resized images.

    jpeg (quality 95, no chroma subsampling): decodes fastest (256 px: ~1,170 images/s decode+preprocess on one
    core here, versus ~750 for PNG and ~470 for the 512 px source JPEGs) at a barely visible second-generation loss.
    png: lossless, for when pixel-exact copies of the decoded source matter more than loading speed.
    """
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, format="PNG", compress_level=6)
    else:
        image.save(buffer, format="JPEG", quality=95, subsampling=0)
    return buffer.getvalue()


def load_image(path, longer_side: int | None = None, resized_format: str = "jpeg") -> LoadedImage:
    """Read and fully decode one file; raise ImageProblem with a reason a user can act on."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ImageProblem(f"cannot read the file ({error.strerror or error})") from None
    if not data:
        raise ImageProblem("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # full decode: a truncated file fails here, not later during training
            fmt = image.format or "unknown"
            header = f"{image.mode} {image.width}x{image.height}\n".encode()
            sha256 = hashlib.sha256(header + image.tobytes()).hexdigest()
            phash = perceptual_hash(image)
            loaded = LoadedImage(sha256, phash, image.mode, image.width, image.height, fmt, data, path.suffix)
            if longer_side:
                loaded.data = encode_resized(resize_longer_side(image, longer_side), resized_format)
                loaded.stored_suffix = RESIZED_FORMATS[resized_format]
    except UnidentifiedImageError:
        raise ImageProblem("not an image file PIL can read") from None
    except Image.DecompressionBombError as error:
        raise ImageProblem(f"image too large to decode safely ({error})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageProblem(f"corrupt or truncated image ({error})") from None
    return loaded


def decode_for_training(data: bytes, size: int = 224) -> np.ndarray:
    """Decode + the minimal preprocessing every training step pays: RGB, resize to size x size, float in [0, 1]."""
    with Image.open(io.BytesIO(data)) as image:
        rgb = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.float32) / 255.0  # (size, size, 3)


def decode_images_per_second(blobs: list[bytes]) -> float:
    """Single-thread decode+preprocess throughput over `blobs` (what one data-loader worker can feed)."""
    if not blobs:
        return 0.0
    start = time.perf_counter()
    for blob in blobs:
        decode_for_training(blob)
    return len(blobs) / max(time.perf_counter() - start, 1e-9)
