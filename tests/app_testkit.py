"""Shared helpers of the app tests: tiny checkpoints, files of every kind (good, bad, DICOM), fake non-radiographs,
and a launched app server. Nothing here is a test; the test_app_* modules import it."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from modeling_cnn_lstm import CnnLstmForImageClassification
from tests.model_testkit import save_tiny_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]
LABELS = ["COVID-19", "Normal", "Pneumonia"]


# -- checkpoints ---------------------------------------------------------------------------------------------------
def make_checkpoint(folder: Path, **overrides: object) -> CnnLstmForImageClassification:
    """A 32x32, two-block CNN-LSTM with seeded, fan-in-scaled weights (non-trivial outputs), saved with processor."""
    return save_tiny_checkpoint(folder, scale=2.0, **overrides)


# -- files ---------------------------------------------------------------------------------------------------------
def png_bytes(image: Image.Image, format: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format, **options)
    return buffer.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def huge_png(path: Path, side: int = 20_000) -> Path:
    """A valid side x side 1-bit PNG of a few kB: the decompression-bomb case, made without allocating it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    compressor = zlib.compressobj(9)
    row = b"\x00" + b"\x00" * ((side + 7) // 8)  # filter byte + packed bits
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return write(path, b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def sixteen_bit_png(path: Path, height: int = 300, width: int = 240) -> Path:
    ramp = np.linspace(0, 65535, height * width).reshape(height, width).astype(np.uint16)
    return write(path, png_bytes(Image.fromarray(ramp)))


def rgba_xray_png(xray: Path, path: Path) -> Path:
    """A real X-ray as RGBA with its right half fully transparent."""
    rgba = np.asarray(Image.open(xray).convert("RGBA")).copy()
    rgba[:, rgba.shape[1] // 2 :, 3] = 0
    return write(path, png_bytes(Image.fromarray(rgba)))


def write_dicom(path: Path, array: np.ndarray, photometric: str = "MONOCHROME2", **tags: object) -> Path:
    """An uncompressed 12-bit DICOM built in code (pydicom's sample files would need the network), with patient tags
    that must never reach the user."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Doe^Jane", "SECRET-123", "19700101"
    ds.InstitutionName = "St Elsewhere Hospital"
    ds.Modality = "DX"
    ds.Rows, ds.Columns = array.shape[-2:]
    if array.ndim == 3:
        ds.NumberOfFrames = array.shape[0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for name, value in tags.items():
        setattr(ds, name, value)
    ds.PixelData = np.ascontiguousarray(array, dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def xray_as_dicom(xray: Path, path: Path, photometric: str = "MONOCHROME2", **tags: object) -> Path:
    """A real X-ray stored as 12-bit DICOM; MONOCHROME1 stores the inverted values, as such detectors do."""
    grey = np.asarray(Image.open(xray).convert("L"), dtype=np.float64) * (4095 / 255)
    stored = 4095 - grey if photometric == "MONOCHROME1" else grey
    return write_dicom(path, np.rint(stored).astype(np.uint16), photometric,
                       WindowCenter=2048, WindowWidth=4096, **tags)


# -- fake non-radiographs (for the guardrail's hit rate) -------------------------------------------------------------
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
# The finding each kind must raise (others may come with it: text also looks like fine texture, for one).
EXPECTED_FINDING = {"colour photo": "colour", "document": "text", "screenshot": "text", "flat": "flat",
                    "noise": "noise"}


# -- a launched app ------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_app(model: Path | None, home: Path, timeout: float = 240) -> tuple[subprocess.Popen, str]:
    """`python app.py --model MODEL --port N` in a subprocess, offline, one thread; returns (process, url).
    `model=None`: no --model, i.e. what `python app.py` serves on a fresh clone (checkpoints/cnn-lstm-cxr3)."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(home), "OMP_NUM_THREADS": "1",
           "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(home / "gradio"), "PYTHONUNBUFFERED": "1"}
    env.pop("CNN_LSTM_MODEL", None)
    log = (home / "server.log").open("w")
    model_args = [] if model is None else ["--model", str(model)]
    process = subprocess.Popen([sys.executable, "app.py", *model_args, "--port", str(port)],
                               cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"app exited with {process.returncode}:\n{(home / 'server.log').read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/config", timeout=5) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            time.sleep(0.5)
    stop_app(process)
    raise RuntimeError(f"app did not answer within {timeout} s:\n{(home / 'server.log').read_text()[-3000:]}")


def stop_app(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@contextlib.contextmanager
def served_tiny_checkpoint(home: Path) -> Iterator[str]:
    """A tiny checkpoint under `home`, served by `app.py` for the duration; yields the URL."""
    make_checkpoint(home / "checkpoint")
    process, url = start_app(home / "checkpoint", home)
    try:
        yield url
    finally:
        stop_app(process)
