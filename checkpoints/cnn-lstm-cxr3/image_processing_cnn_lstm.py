"""Image processor of the CNN-LSTM chest X-ray classifier.

Radiographs arrive in many forms: 8-bit JPEG, 16-bit PNG, RGBA screenshots, CMYK scans, numpy arrays from DICOM.
Every input is first brought to one canonical form (float32, height x width x channels, values on the 0..255
scale) by a fixed rule, then resized, rescaled and normalized. The same rule everywhere means the same pixels reach
the model in training, in `pipeline` and in the app.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

from .configuration_cnn_lstm import default_normalisation
from .lung_region_cnn_lstm import crop_to_lung_box

try:
    from PIL import Image
except ImportError:  # pragma: no cover - pillow comes with transformers' vision extras
    Image = None

RESIZE_MODES = ("stretch", "pad")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def _alpha_composite_on_black(rgba: np.ndarray) -> np.ndarray:
    """Transparent pixels become black (a radiograph's background) instead of showing arbitrary hidden colours."""
    colour, alpha = rgba[..., :-1], rgba[..., -1:] / 255.0
    return colour * alpha


def _pil_to_array(image: Image.Image) -> np.ndarray:
    """PIL image -> float32 HxWxC on the 0..255 scale (C is 1 or 3)."""
    if image.width == 0 or image.height == 0:
        raise ValueError(f"image has zero size ({image.width}x{image.height})")
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        # 16-bit PNGs open as I;16: scale the full 16-bit range to 0..255, keep the precision as float.
        array = np.asarray(image, dtype=np.float64)
        return (np.clip(array, 0, 65535) * (255.0 / 65535.0)).astype(np.float32)[..., None]
    if mode == "I":
        # 32-bit integer pixels (some 16-bit PNG/TIFF readers): the same rule as an integer numpy array
        return _numeric_to_array(np.asarray(image, dtype=np.int32), channels_first=False)
    if mode == "F":
        return _float_array_to_255(np.asarray(image, dtype=np.float32))[..., None]
    if mode in ("1", "L"):
        return np.asarray(image.convert("L"), dtype=np.float32)[..., None]
    if mode in ("LA", "La", "PA", "P", "RGBA", "RGBa") or "transparency" in image.info:
        return _alpha_composite_on_black(np.asarray(image.convert("RGBA"), dtype=np.float32))
    # RGB, CMYK, YCbCr, LAB, HSV: PIL's own conversion is deterministic.
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def _float_array_to_255(array: np.ndarray) -> np.ndarray:
    """Float pixels: [0, 1] -> x255; [0, 255] kept; any other range min-max scaled (a fixed, documented rule)."""
    low, high = float(array.min()), float(array.max())
    if low >= 0.0 and high <= 1.0:
        return array * 255.0
    if low >= 0.0 and high <= 255.0:
        return array
    span = high - low
    return (array - low) * (255.0 / span) if span > 0 else np.zeros_like(array)


def _numeric_to_array(array: np.ndarray, channels_first: bool) -> np.ndarray:
    """numpy/torch pixels -> float32 HxWxC on the 0..255 scale (C is 1, 3 or 4 here)."""
    if array.size == 0:
        raise ValueError(f"image array is empty (shape {array.shape})")
    if array.ndim == 3 and channels_first:
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"image array must be HxW or HxWxC with C in (1, 3, 4) (or CxHxW), got shape {array.shape}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"image has zero size (shape {array.shape})")
    if array.dtype == np.bool_:
        pixels = array.astype(np.float32) * 255.0
    elif array.dtype == np.uint8:
        pixels = array.astype(np.float32)
    elif array.dtype == np.uint16:
        pixels = array.astype(np.float32) * (255.0 / 65535.0)
    elif np.issubdtype(array.dtype, np.integer):
        # Other integers: 8-bit range if it fits, otherwise the 16-bit range (DICOM stores 12-16 bit as int).
        pixels = array.astype(np.float32)
        if pixels.min() < 0 or pixels.max() > 255:
            pixels = np.clip(pixels, 0, 65535) * (255.0 / 65535.0)
    elif np.issubdtype(array.dtype, np.floating):
        pixels = array.astype(np.float32)
        if not np.isfinite(pixels).all():
            raise ValueError("image contains NaN or infinite values")
        pixels = _float_array_to_255(pixels)
    else:
        raise ValueError(f"unsupported image dtype {array.dtype}")
    if pixels.shape[-1] == 4:
        pixels = _alpha_composite_on_black(pixels)
    return pixels


def to_canonical_array(image: Any) -> np.ndarray:
    """One image (PIL, numpy or torch) -> float32 HxWxC (C in 1, 3) on the 0..255 scale."""
    if Image is not None and isinstance(image, Image.Image):
        return _pil_to_array(image)
    if isinstance(image, torch.Tensor):
        array = image.detach().cpu().numpy()
        # torch images are channels-first (torchvision convention) when 3-D
        return _numeric_to_array(array, channels_first=array.ndim == 3 and array.shape[0] in (1, 3, 4))
    if isinstance(image, np.ndarray):
        channels_first = image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4)
        return _numeric_to_array(image, channels_first=channels_first)
    if isinstance(image, (str, bytes)):
        raise ValueError(
            "CnnLstmImageProcessor takes decoded images (PIL, numpy, torch), not paths or bytes; "
            "open the file first, e.g. PIL.Image.open(path)"
        )
    raise ValueError(f"unsupported image type {type(image).__name__}; expected a PIL image, numpy array or tensor")


def match_channels(pixels: np.ndarray, num_channels: int) -> np.ndarray:
    """Grayscale -> repeated channels; colour -> luminance (ITU-R 601-2 weights, as PIL's convert("L"))."""
    if pixels.shape[-1] == num_channels:
        return pixels
    if num_channels == 3:
        return np.repeat(pixels, 3, axis=-1)
    return (pixels @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., None]


def pad_box(height: int, width: int, size: dict[str, int]) -> tuple[int, int, int, int]:
    """Where an HxW image lands in `size` under `resize_mode="pad"`: (top, left, box height, box width), centred."""
    scale = min(size["height"] / height, size["width"] / width)
    box_height, box_width = max(1, round(height * scale)), max(1, round(width * scale))
    return (size["height"] - box_height) // 2, (size["width"] - box_width) // 2, box_height, box_width


def resize_tensor(pixels: torch.Tensor, size: dict[str, int], resize_mode: str, pad_value: float) -> torch.Tensor:
    """CxHxW float tensor -> CxHxW at `size`: bilinear with antialiasing (so downscaling does not alias)."""
    height, width = size["height"], size["width"]
    if resize_mode == "stretch":
        top, left, box_height, box_width = 0, 0, height, width
    else:
        top, left, box_height, box_width = pad_box(pixels.shape[1], pixels.shape[2], size)
    if tuple(pixels.shape[1:]) != (box_height, box_width):
        pixels = F.interpolate(
            pixels[None], size=(box_height, box_width), mode="bilinear", antialias=True, align_corners=False
        )[0]
    if (box_height, box_width) != (height, width):
        canvas = torch.full((pixels.shape[0], height, width), float(pad_value), dtype=pixels.dtype)
        canvas[:, top : top + box_height, left : left + box_width] = pixels
        pixels = canvas
    return pixels


def _split_batch(images: Any) -> list[Any]:
    """A single image or a batch (list/tuple, 4-D array or tensor) -> list of single images."""
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError("no images given (empty list)")
        return list(images)
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        if images.shape[0] == 0:
            raise ValueError("no images given (empty batch)")
        return list(images)  # each item's channel layout is inferred like a single image's
    return [images]


class CnnLstmImageProcessor(BaseImageProcessor):
    r"""
    Image processor for the CNN-LSTM: canonical conversion, resize to `size`, rescale, normalize.

    Grayscale inputs are repeated to `num_channels`; colour inputs are reduced to luminance when `num_channels` is 1.
    16-bit inputs keep their precision (scaled to 0..255 as float). Transparent pixels are composited on black.

    Args:
        do_resize (`bool`, defaults to `True`): Resize to `size`.
        size (`dict[str, int]`, defaults to `{"height": 224, "width": 224}`): Output size.
        resize_mode (`str`, defaults to `"stretch"`):
            `"stretch"`: plain resize to `size` (the paper). `"pad"`: keep the aspect ratio, fit the longer side and
            pad the rest with `pad_value` (centred).
        pad_value (`float`, defaults to 0.0): Fill for `"pad"`, on the 0..255 scale before rescaling.
        do_rescale (`bool`, defaults to `True`): Multiply by `rescale_factor`.
        rescale_factor (`float`, defaults to `1/255`): Rescaling factor.
        do_normalize (`bool`, defaults to `True`): Subtract `image_mean` and divide by `image_std`.
        image_mean, image_std (`list[float]`): Per-channel statistics (ImageNet by default).
        num_channels (`int`, defaults to 3): Channels the model expects (1 or 3).
        crop_to_lungs (`bool`, defaults to `False`):
            Crop to the lung fields' bounding box plus a 5% margin (`lung_region_cnn_lstm.py`, a few ms) before
            the resize. Set from the model config; `False` keeps the whole image (the paper, older checkpoints).
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        do_resize: bool = True,
        size: dict[str, int] | None = None,
        resize_mode: str = "stretch",
        pad_value: float = 0.0,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        num_channels: int = 3,
        crop_to_lungs: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.do_resize = do_resize
        self.size = dict(size) if size is not None else {"height": 224, "width": 224}
        self.resize_mode = resize_mode
        self.pad_value = pad_value
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        default_mean, default_std = default_normalisation(num_channels)  # the config's own defaults
        self.image_mean = list(image_mean) if image_mean is not None else default_mean
        self.image_std = list(image_std) if image_std is not None else default_std
        self.num_channels = num_channels
        self.crop_to_lungs = crop_to_lungs
        self._check_settings(self.__dict__)

    @classmethod
    def from_model_config(cls, config: Any, **kwargs: Any) -> CnnLstmImageProcessor:
        """The processor that matches a `CnnLstmConfig` (input size, channels, normalization statistics)."""
        settings = {
            "size": {"height": config.image_size, "width": config.image_size},
            "num_channels": config.num_channels,
            "image_mean": config.image_mean,
            "image_std": config.image_std,
            "crop_to_lungs": getattr(config, "crop_to_lungs", False),
        }
        settings.update(kwargs)
        return cls(**settings)

    @staticmethod
    def _check_settings(settings: dict[str, Any]) -> None:
        size = settings["size"]
        if not isinstance(size, dict) or set(size) != {"height", "width"} or min(size.values()) < 1:
            raise ValueError(f"size must be {{'height': H, 'width': W}} with positive values, got {size!r}")
        if settings["resize_mode"] not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {settings['resize_mode']!r}")
        if settings["num_channels"] not in (1, 3):
            raise ValueError(f"num_channels must be 1 or 3, got {settings['num_channels']!r}")
        for name in ("image_mean", "image_std"):
            if len(settings[name]) != settings["num_channels"]:
                raise ValueError(f"{name} needs {settings['num_channels']} values, got {settings[name]!r}")
        if any(value <= 0 for value in settings["image_std"]):
            raise ValueError(f"image_std must be positive, got {settings['image_std']!r}")
        if not isinstance(settings.get("crop_to_lungs", False), bool):
            raise ValueError(f"crop_to_lungs must be True or False, got {settings['crop_to_lungs']!r}")

    def preprocess(self, images: Any, return_tensors: str | None = "pt", **kwargs: Any) -> BatchFeature:
        """Images (one or a batch) -> `BatchFeature` with `pixel_values` of shape (batch, C, H, W)."""
        settings = {key: kwargs.pop(key, getattr(self, key)) for key in (
            "do_resize", "size", "resize_mode", "pad_value", "do_rescale", "rescale_factor", "do_normalize",
            "image_mean", "image_std", "num_channels", "crop_to_lungs",
        )}
        kwargs.pop("data_format", None)
        kwargs.pop("input_data_format", None)
        if kwargs:
            raise ValueError(f"unknown arguments to CnnLstmImageProcessor: {sorted(kwargs)}")
        self._check_settings(settings)
        if images is None:
            raise ValueError("no images given (None)")
        if settings["do_normalize"]:
            mean = torch.tensor(settings["image_mean"], dtype=torch.float32).view(-1, 1, 1)
            std = torch.tensor(settings["image_std"], dtype=torch.float32).view(-1, 1, 1)
        processed = []
        for index, image in enumerate(_split_batch(images)):
            try:
                pixels = match_channels(to_canonical_array(image), settings["num_channels"])
            except ValueError as error:
                raise ValueError(f"image {index}: {error}") from None
            # HxWxC numpy -> CxHxW tensor
            tensor = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
            if settings["crop_to_lungs"]:
                tensor = crop_to_lung_box(tensor)
            if settings["do_resize"]:
                tensor = resize_tensor(tensor, settings["size"], settings["resize_mode"], settings["pad_value"])
            if settings["do_rescale"]:
                tensor = tensor * settings["rescale_factor"]
            if settings["do_normalize"]:
                tensor = (tensor - mean) / std
            processed.append(tensor)
        if return_tensors is None:
            pixel_values: Any = [tensor.numpy() for tensor in processed]
        elif len({tuple(tensor.shape) for tensor in processed}) > 1:
            raise ValueError("images of different sizes cannot be batched; keep do_resize=True or return_tensors=None")
        elif return_tensors in ("pt", torch):
            pixel_values = torch.stack(processed)
        elif return_tensors in ("np", np):
            pixel_values = torch.stack(processed).numpy()
        else:
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        return BatchFeature(data={"pixel_values": pixel_values})


__all__ = ["CnnLstmImageProcessor"]
