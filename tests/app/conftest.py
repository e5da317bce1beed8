"""Fixtures of the app tests: upload files of every kind (good, bad, DICOM), generated non-radiographs, and a tiny
checkpoint served by `python app.py`."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from tests.app.crafted_files import secondary_capture


# -- upload files --------------------------------------------------------------------------------------------------
def encode(image: Image.Image, format: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format, **options)
    return buffer.getvalue()


class UploadFiles:
    """Writes test uploads into one folder; every method returns the written file's path."""

    encode = staticmethod(encode)

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def write(self, name: str, data: bytes) -> Path:
        path = self.folder / name
        path.write_bytes(data)
        return path

    def save(self, name: str, image: Image.Image, format: str = "PNG", **options: object) -> Path:
        return self.write(name, encode(image, format, **options))

    def huge_png(self, name: str, side: int = 20_000) -> Path:
        """A valid side x side 1-bit PNG of a few kB: the decompression-bomb case, made without allocating it."""

        def chunk(kind: bytes, data: bytes) -> bytes:
            crc = zlib.crc32(kind + data) & 0xFFFFFFFF
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

        compressor = zlib.compressobj(9)
        row = b"\x00" + b"\x00" * ((side + 7) // 8)  # filter byte + packed bits
        idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
        header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
        png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
        return self.write(name, png)

    def sixteen_bit_png(self, name: str, height: int = 300, width: int = 240) -> Path:
        ramp = np.linspace(0, 65535, height * width).reshape(height, width).astype(np.uint16)
        return self.save(name, Image.fromarray(ramp))

    def rgba_xray_png(self, xray: Path, name: str) -> Path:
        """A real X-ray as RGBA with its right half fully transparent."""
        rgba = np.asarray(Image.open(xray).convert("RGBA")).copy()
        rgba[:, rgba.shape[1] // 2 :, 3] = 0
        return self.save(name, Image.fromarray(rgba))

    def dicom(self, name: str, array: np.ndarray, photometric: str = "MONOCHROME2", **tags: object) -> Path:
        """An uncompressed 12-bit DICOM built in code (pydicom's sample files would need the network), with patient
        tags that must never reach the user."""
        ds = secondary_capture(patient=True)
        ds.Rows, ds.Columns = array.shape[-2:]
        if array.ndim == 3:
            ds.NumberOfFrames = array.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        for tag, value in tags.items():
            setattr(ds, tag, value)
        ds.PixelData = np.ascontiguousarray(array, dtype=np.uint16).tobytes()
        path = self.folder / name
        ds.save_as(path, enforce_file_format=True)
        return path

    def xray_as_dicom(self, xray: Path, name: str, photometric: str = "MONOCHROME2", **tags: object) -> Path:
        """A real X-ray stored as 12-bit DICOM; MONOCHROME1 stores the inverted values, as such detectors do."""
        grey = np.asarray(Image.open(xray).convert("L"), dtype=np.float64) * (4095 / 255)
        stored = 4095 - grey if photometric == "MONOCHROME1" else grey
        return self.dicom(name, np.rint(stored).astype(np.uint16), photometric,
                          WindowCenter=2048, WindowWidth=4096, **tags)


@pytest.fixture
def files(tmp_path: Path) -> UploadFiles:
    """Upload files written into the test's tmp_path: `files.huge_png("huge.png")`, `files.dicom(...)`, ..."""
    return UploadFiles(tmp_path)


# -- generated non-radiographs (for the guardrail's hit rate) ------------------------------------------------------
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "report", "patient", "findings", "lorem",
         "ipsum", "dolor", "sit", "amet"]


def colour_photo(seed: int) -> Image.Image:
    """Sky, ground and coloured blobs, blurred, with sensor-like noise."""
    rng = np.random.default_rng(seed)
    width, height = int(rng.integers(480, 1200)), int(rng.integers(360, 900))
    rows = np.linspace(0, 1, height)[:, None, None]
    sky, ground = rng.uniform([40, 90, 160], [120, 170, 255]), rng.uniform([30, 80, 20], [120, 160, 80])
    horizon = rng.uniform(0.3, 0.7)
    base = np.where(rows < horizon, sky * (0.7 + 0.3 * rows / horizon), ground * (1.2 - 0.4 * rows))
    image = Image.fromarray(np.clip(base * np.ones((1, width, 1)), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 12))):
        x, y, r = int(rng.integers(0, width)), int(rng.integers(0, height)), int(rng.integers(20, 200))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(2)), np.float32) + rng.normal(0, 4, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def document(seed: int) -> Image.Image:
    """A page of text, portrait or landscape, greyscale or RGB."""
    rng = np.random.default_rng(seed)
    size = (850, 1100) if seed % 2 == 0 else (1100, 850)
    image = Image.new("RGB", size, (250, 250, 250)) if seed % 3 == 0 else Image.new("L", size, 255)
    draw, y = ImageDraw.Draw(image), 40
    while y < size[1] - 40:
        draw.text((50, y), " ".join(rng.choice(WORDS, int(rng.integers(6, 14)))), fill=0,
                  font_size=int(rng.integers(14, 24)))
        y += int(rng.integers(22, 34))
    return image


def screenshot(seed: int) -> Image.Image:
    """An application window (light or dark) with a sidebar, coloured buttons and text."""
    rng = np.random.default_rng(seed)
    dark = seed % 2 == 1
    ink = (215, 215, 215) if dark else (25, 25, 25)
    image = Image.new("RGB", (1280, 800), (30, 30, 34) if dark else (245, 245, 245))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 0, 1280, 50], fill=(50, 50, 60) if dark else (220, 220, 225))
    draw.rectangle([0, 50, 220, 800], fill=(40, 40, 46) if dark else (235, 235, 240))
    for index in range(12):
        draw.text((20, 70 + 30 * index), " ".join(rng.choice(WORDS, 2)), fill=ink, font_size=16)
    for index in range(int(rng.integers(2, 5))):
        draw.rectangle([260 + 180 * index, 80, 410 + 180 * index, 120],
                       fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    for y in range(160, 770, 28):
        draw.text((260, y), " ".join(rng.choice(WORDS, int(rng.integers(5, 12)))), fill=ink, font_size=18)
    return image


def flat(seed: int) -> Image.Image:
    """One grey level (black, white, mid-grey, ...), sometimes with faint noise or as RGB."""
    rng = np.random.default_rng(seed)
    level = [0, 255, 128, 37, 200][seed % 5]
    pixels = np.full((600, 500), level, np.float32) + rng.normal(0, 1.5 if seed % 2 else 0, (600, 500))
    pixels = np.clip(pixels, 0, 255).astype(np.uint8)
    return Image.fromarray(np.stack([pixels] * 3, -1) if seed % 3 == 2 else pixels)


def noise(seed: int) -> Image.Image:
    """Uniform, Gaussian, salt-and-pepper or colour noise."""
    rng = np.random.default_rng(seed)
    shape = (512, 512)
    if seed % 4 == 3:
        return Image.fromarray(rng.integers(0, 256, (*shape, 3)).astype(np.uint8))
    pixels = [rng.integers(0, 256, shape), rng.normal(128, 50, shape), np.where(rng.random(shape) < 0.5, 0, 255)]
    return Image.fromarray(np.clip(pixels[seed % 4], 0, 255).astype(np.uint8))


NON_RADIOGRAPHS = {"colour photo": colour_photo, "document": document, "screenshot": screenshot, "flat": flat,
                   "noise": noise}


@pytest.fixture(scope="session")
def non_radiograph() -> Callable[[str, int], Image.Image]:
    """`non_radiograph(kind, seed)`: a generated image of one kind ("colour photo", "document", "screenshot", "flat",
    "noise") that the guardrail must flag."""

    def make(kind: str, seed: int) -> Image.Image:
        if kind not in NON_RADIOGRAPHS:
            raise ValueError(f"unknown kind {kind!r}; choose from {sorted(NON_RADIOGRAPHS)}")
        return NON_RADIOGRAPHS[kind](seed)

    return make


# -- a launched app ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_app_url(
    app_server: Callable, make_checkpoint: Callable, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A tiny checkpoint served by `python app.py` for the test module; the URL."""
    home = tmp_path_factory.mktemp("app")
    make_checkpoint(home / "checkpoint")
    with app_server(home / "checkpoint", home) as url:
        yield url


SHIPPED_REPORT = Path(__file__).resolve().parents[2] / "checkpoints" / "cnn-lstm-cxr3" / "report"


@pytest.fixture(scope="module")
def reported_checkpoint(make_checkpoint: Callable, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint carrying a copy of the shipped model's report/ (same three labels): the report tab and the
    prevalence reading get real numbers without loading the 17.8 M-parameter model."""
    import shutil

    folder = tmp_path_factory.mktemp("reported") / "checkpoint"
    make_checkpoint(folder)
    shutil.copytree(SHIPPED_REPORT, folder / "report")
    return folder


@pytest.fixture(scope="module")
def reported_app_url(app_server: Callable, reported_checkpoint: Path) -> Iterator[str]:
    """`reported_checkpoint` served by `python app.py` for the test module; the URL."""
    with app_server(reported_checkpoint, reported_checkpoint.parent) as url:
        yield url
