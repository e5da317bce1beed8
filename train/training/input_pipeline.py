"""The training input path: decoded, resized uint8 images in memory; batches gathered in one copy; float on the device.

Why this shape (measured on an H200 with scripts/benchmark_train.py): on a fast GPU, a Trainer whose collate
converts to normalized float on the CPU reached only 0.37-0.46x of a plain PyTorch loop; sending uint8 and
normalizing on the device reached 0.76x. So:
- every image is decoded and resized ONCE (the same canonical conversion and antialiased bilinear resize as
  `CnnLstmImageProcessor`, rounded to uint8) and kept in one `(n, c, h, w)` uint8 array, cached on disk by dataset
  fingerprint; grayscale radiographs are stored with ONE channel (3x less to copy, pin and transfer);
- the dataset's `__getitems__` gathers a whole batch with one numpy fancy index (no per-sample tensors to stack);
- `DeviceBatchTransform` runs on the accelerator: uint8 -> float, the paper's random rotation (training only),
  channel repeat, normalization with the processor's mean/std, channels-last. `CxrTrainer._prepare_inputs` and
  the plain loop of `scripts/benchmark_train.py` both call it, so they measure the same work.
The only difference from the processor's path is the uint8 rounding after the resize (at most 0.5/255).
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub import constants as hf_constants
from PIL import Image

from cxr_common.atomic import atomic_file
from modeling_cnn_lstm.image_processing_cnn_lstm import match_channels, resize_tensor, to_canonical_array
from modeling_cnn_lstm.lung_region_cnn_lstm import crop_to_lung_box, find_lung_region

logger = logging.getLogger(__name__)
CACHE_VERSION = "uint8-v1"
LUNG_CROP_VERSION = "lung-crop-v2"  # part of the cache key when images are cropped to the lung fields


def default_cache_dir() -> Path:
    """`<HF_HOME>/cnn_lstm_image_cache`, where huggingface_hub puts its own cache (it honours HF_HOME, else
    XDG_CACHE_HOME, and reads them when first imported: tests/conftest.py sets HF_HOME to a temporary folder first)."""
    return Path(hf_constants.HF_HOME) / "cnn_lstm_image_cache"


def decode_resize(image: Any, image_size: int, num_channels: int, crop_to_lungs: bool = False) -> np.ndarray:
    """One image (PIL, bytes/path dict, numpy) -> uint8 (c, image_size, image_size), c = 1 for grayscale.

    `crop_to_lungs`: first crop to the lung fields' box, exactly as the processor does for such a model."""
    if isinstance(image, dict):  # datasets' undecoded Image: {"bytes": ..., "path": ...}
        image = Image.open(io.BytesIO(image["bytes"])) if image.get("bytes") else Image.open(image["path"])
    pixels = to_canonical_array(image)  # float32 HxWxC on the 0..255 scale, C in (1, 3)
    if num_channels == 1:  # colour -> luminance by the processor's rule; grayscale stays one channel either way
        pixels = match_channels(pixels, 1)
    # HxWxC numpy -> CxHxW tensor
    tensor = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
    if crop_to_lungs:
        tensor = crop_to_lung_box(tensor)
    size = {"height": image_size, "width": image_size}
    tensor = resize_tensor(tensor, size, "stretch", 0.0)  # the processor's exact resize rule
    return tensor.round_().clamp_(0, 255).to(torch.uint8).numpy()


def _stack(images: list[np.ndarray]) -> np.ndarray:
    """Stack (c, h, w) images; one channel if all are grayscale, else grayscale ones repeated to 3."""
    channels = max(image.shape[0] for image in images)
    return np.stack([np.repeat(image, channels, axis=0) if image.shape[0] != channels else image for image in images])


def cache_images(
    dataset: Any,
    image_size: int,
    num_channels: int,
    image_column: str = "image",
    cache_dir: str | os.PathLike | None = None,
    num_workers: int = 4,
    crop_to_lungs: bool = False,
) -> np.ndarray:
    """Decode + resize every image of a `datasets.Dataset` to uint8 (n, c, h, w), reusing a disk cache if present.

    The cache key is the dataset's fingerprint plus size and channels; the file is written atomically, so that in
    DDP the main process can build it (under `main_process_first`) and the others read it.
    """
    from datasets import Image as ImageFeature

    fingerprint = getattr(dataset, "_fingerprint", None)
    path = None
    if cache_dir is not None and fingerprint:
        version = f"{CACHE_VERSION}-{LUNG_CROP_VERSION}" if crop_to_lungs else CACHE_VERSION
        key = hashlib.sha256(f"{fingerprint}-{image_size}-{num_channels}-{version}".encode()).hexdigest()[:24]
        path = Path(cache_dir) / f"{key}.npy"
        if path.is_file():
            cached = np.load(path)
            if len(cached) == len(dataset):
                return cached
    if len(dataset) == 0:
        return np.zeros((0, 1, image_size, image_size), dtype=np.uint8)
    raw = dataset.cast_column(image_column, ImageFeature(decode=False))[image_column]
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:  # PIL decode and torch resize drop the GIL
        images = list(pool.map(lambda item: decode_resize(item, image_size, num_channels, crop_to_lungs), raw))
    pixels = _stack(images)
    if path is not None:
        with atomic_file(path) as tmp, open(tmp, "wb") as stream:  # a file object: np.save adds no ".npy"
            np.save(stream, pixels)
    return pixels


def lung_masks_of(pixels: np.ndarray) -> np.ndarray:
    """uint8 (n, c, h, w) images -> uint8 (n, 1, h, w) lung-field masks (1 inside), by the model package's rule."""
    masks = [find_lung_region(torch.from_numpy(image).float()).mask.numpy() for image in pixels]
    return np.stack(masks)[:, None].astype(np.uint8) if masks else np.zeros((0, 1, *pixels.shape[2:]), np.uint8)


def hide_lungs_uint8(pixels: np.ndarray) -> np.ndarray:
    """uint8 (n, c, h, w) -> a copy whose lung fields hold each image's mean (per channel, whole frame): the data-level
    shortcut check trains and scores on these."""
    masks = lung_masks_of(pixels).astype(bool)  # (n, 1, h, w)
    means = np.rint(pixels.reshape(*pixels.shape[:2], -1).mean(axis=-1))[..., None, None].astype(np.uint8)
    return np.where(masks, np.broadcast_to(means, pixels.shape), pixels)


@dataclass
class CachedSplit:
    """One split in memory: uint8 pixels, integer labels, the text columns the report needs, and (for the
    shortcut-breaking augmentation and the source adversary) lung masks and integer source ids."""

    pixels: np.ndarray  # (n, c, h, w) uint8, c = 1 (grayscale) or num_channels
    labels: np.ndarray  # (n,) int64
    columns: dict[str, list[Any]] = field(default_factory=dict)  # e.g. source, patient_id, fold
    masks: np.ndarray | None = None  # (n, 1, h, w) uint8 lung fields, when the training recipe needs them
    source_ids: np.ndarray | None = None  # (n,) int64 index into the training sources (-1: unseen), idem

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int] | np.ndarray) -> CachedSplit:
        indices = np.asarray(indices, dtype=np.int64)
        columns = {name: [values[i] for i in indices] for name, values in self.columns.items()}
        masks = self.masks[indices] if self.masks is not None else None
        source_ids = self.source_ids[indices] if self.source_ids is not None else None
        return CachedSplit(self.pixels[indices], self.labels[indices], columns, masks, source_ids)

    @staticmethod
    def concatenate(splits: Sequence[CachedSplit]) -> CachedSplit:
        channels = max(split.pixels.shape[1] for split in splits)
        pixels = np.concatenate([np.repeat(s.pixels, channels // s.pixels.shape[1], axis=1) for s in splits])
        names = set.intersection(*(set(split.columns) for split in splits))
        columns = {name: [value for split in splits for value in split.columns[name]] for name in sorted(names)}
        masks = source_ids = None
        if all(split.masks is not None for split in splits):
            masks = np.concatenate([split.masks for split in splits])
        if all(split.source_ids is not None for split in splits):
            source_ids = np.concatenate([split.source_ids for split in splits])
        return CachedSplit(pixels, np.concatenate([split.labels for split in splits]), columns, masks, source_ids)

    def with_training_extras(self, lung_masks: bool, source_names: Sequence[str] | None) -> CachedSplit:
        """A copy that also carries lung masks (computed here) and/or source ids (index in `source_names`)."""
        masks = (self.masks if self.masks is not None else lung_masks_of(self.pixels)) if lung_masks else None
        source_ids = None
        if source_names is not None:
            index = {name: position for position, name in enumerate(source_names)}
            source_ids = np.asarray([index.get(name, -1) for name in self.columns.get("source", [])], np.int64)
            if len(source_ids) != len(self):
                raise ValueError("the source adversary needs a 'source' column in every split")
        return CachedSplit(self.pixels, self.labels, self.columns, masks, source_ids)

    def torch_dataset(self) -> UInt8ImageDataset:
        return UInt8ImageDataset(self.pixels, self.labels, self.masks, self.source_ids)


class PreBatched(dict):
    """A batch already gathered by `UInt8ImageDataset.__getitems__`; `collate_uint8` passes it through."""


class UInt8ImageDataset(torch.utils.data.Dataset):
    """Map-style dataset over in-memory uint8 images; items are {"pixel_values": uint8 (c, h, w), "labels": int},
    plus "lung_mask" (uint8 (1, h, w)) and "source_ids" (int) when the split carries them."""

    def __init__(
        self,
        pixels: np.ndarray,
        labels: np.ndarray,
        masks: np.ndarray | None = None,
        source_ids: np.ndarray | None = None,
    ) -> None:
        if len(pixels) != len(labels):
            raise ValueError(f"{len(pixels)} images but {len(labels)} labels")
        for name, extra in (("lung masks", masks), ("source ids", source_ids)):
            if extra is not None and len(extra) != len(labels):
                raise ValueError(f"{len(labels)} images but {len(extra)} {name}")
        self.pixels, self.labels = pixels, np.asarray(labels, dtype=np.int64)
        self.masks, self.source_ids = masks, source_ids

    def __len__(self) -> int:
        return len(self.labels)

    def _extras(self, index: Any) -> dict[str, torch.Tensor]:
        extras = {}
        if self.masks is not None:
            extras["lung_mask"] = torch.from_numpy(np.asarray(self.masks[index]))
        if self.source_ids is not None:
            extras["source_ids"] = torch.as_tensor(self.source_ids[index])
        return extras

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = {"pixel_values": torch.from_numpy(self.pixels[index]), "labels": int(self.labels[index])}
        return {**item, **self._extras(index)}

    def __getitems__(self, indices: list[int]) -> list[PreBatched]:
        """The DataLoader fetcher calls this with a whole batch of indices: one gather instead of n small stacks."""
        index = np.asarray(indices, dtype=np.int64)
        pixels = torch.from_numpy(self.pixels[index])
        return [PreBatched(pixel_values=pixels, labels=torch.from_numpy(self.labels[index]), **self._extras(index))]


def collate_uint8(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Batch uint8 samples, or pass a batch gathered by `__getitems__` through; labels become int64.

    The gathered batch is recognised by its 4-D pixels, not its type: the Trainer's column-removing wrapper
    (remove_unused_columns=True) rebuilds each feature as a plain dict.
    """
    if len(features) == 1 and getattr(features[0].get("pixel_values"), "ndim", 0) == 4:
        batch = dict(features[0])
        batch["labels"] = torch.as_tensor(batch["labels"])
        return batch
    pixel_values = torch.stack([torch.as_tensor(feature["pixel_values"]) for feature in features])
    labels = torch.tensor([int(feature["labels"]) for feature in features], dtype=torch.long)
    batch = {"pixel_values": pixel_values, "labels": labels}
    for name in ("lung_mask", "source_ids"):
        if name in features[0]:
            batch[name] = torch.stack([torch.as_tensor(feature[name]) for feature in features])
    return batch


class DeviceBatchTransform:
    """uint8 (b, c, h, w) on the device -> normalized float (b, num_channels, h, w), rotated at random in training.

    Rotation: each image by an angle uniform in [-rotation_degrees, rotation_degrees] about its centre, bilinear,
    edges filled with the nearest border pixel (Keras' ImageDataGenerator(rotation_range=15) default fill).
    Normalization: (x / 255 - mean) / std with the model config's statistics, exactly as the image processor.
    Outside-lung swap (training only, `outside_lung_swap` = p): with probability p per image, every pixel outside its
    lung mask is replaced by the same pixel of another image of the batch (a cyclic shift), so what surrounds the
    lungs (markers, borders, text, collection-specific processing) comes from a random film of any class and
    collection and stops predicting the label; the lungs themselves are untouched.
    """

    def __init__(
        self,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        num_channels: int,
        rotation_degrees: float = 0.0,
        channels_last: bool = False,
        outside_lung_swap: float = 0.0,
    ) -> None:
        if rotation_degrees < 0:
            raise ValueError(f"rotation_degrees must be >= 0, got {rotation_degrees}")
        if not 0.0 <= outside_lung_swap <= 1.0:
            raise ValueError(f"outside_lung_swap must be a probability in [0, 1], got {outside_lung_swap}")
        self.outside_lung_swap = float(outside_lung_swap)
        mean = torch.tensor(image_mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(image_std, dtype=torch.float32).view(1, -1, 1, 1)
        self.scale = 1.0 / (255.0 * std)  # x * scale + shift == (x / 255 - mean) / std
        self.shift = -mean / std
        self.num_channels = num_channels
        self.rotation_degrees = float(rotation_degrees)
        self.channels_last = channels_last
        self._device_constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._device_constants:
            self._device_constants[device] = (self.scale.to(device), self.shift.to(device))
        return self._device_constants[device]

    def rotate(self, images: torch.Tensor) -> torch.Tensor:
        """Random rotation of a float batch (b, c, h, w), one angle per image, drawn from torch's global RNG."""
        batch = images.shape[0]
        limit = math.radians(self.rotation_degrees)
        angles = (torch.rand(batch, device=images.device) * 2.0 - 1.0) * limit
        cos, sin = torch.cos(angles), torch.sin(angles)
        zeros = torch.zeros_like(cos)
        # (b, 2, 3) affine matrices mapping output to input coordinates in [-1, 1]
        theta = torch.stack([torch.stack([cos, -sin, zeros], 1), torch.stack([sin, cos, zeros], 1)], 1)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def swap_outside_lungs(self, images: torch.Tensor, lung_mask: torch.Tensor) -> torch.Tensor:
        """Outside each chosen image's lung mask, the pixels of another image of the batch (see the class doc)."""
        batch = images.shape[0]
        if batch < 2:
            return images
        shift = int(torch.randint(1, batch, (1,)))
        donors = images.roll(shift, dims=0)
        if donors.shape[1] != images.shape[1]:
            donors = donors.expand_as(images)
        chosen = (torch.rand(batch, device=images.device) < self.outside_lung_swap).view(-1, 1, 1, 1)
        outside = (lung_mask.to(images.device) == 0) & chosen  # (b, 1, h, w)
        return torch.where(outside, donors, images)

    def __call__(self, pixel_values: torch.Tensor, train: bool, lung_mask: torch.Tensor | None = None) -> torch.Tensor:
        if pixel_values.dtype != torch.uint8:
            raise ValueError(f"DeviceBatchTransform expects uint8 pixel_values, got {pixel_values.dtype}")
        scale, shift = self._constants(pixel_values.device)
        images = pixel_values.float()
        if train and self.outside_lung_swap > 0:
            if lung_mask is None:
                raise ValueError("outside_lung_swap needs the batch's lung masks (CachedSplit.with_training_extras)")
            images = self.swap_outside_lungs(images, lung_mask)
        if train and self.rotation_degrees > 0:
            images = self.rotate(images)  # on the stored channels (usually 1): cheaper than after the repeat
        if images.shape[1] != self.num_channels:
            images = images.expand(-1, self.num_channels, -1, -1)
        images = images * scale + shift
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images
