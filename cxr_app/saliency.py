"""Saliency maps for the CNN-LSTM with Captum: Grad-CAM (default), Integrated Gradients, Occlusion; overlays.

Why these three: Grad-CAM on the last convolutional block is cheap (one trunk forward, a backward through the small
head only) and coarse (7x7); Integrated Gradients is pixel-level and satisfies completeness but needs many
forward+backward passes; Occlusion needs no gradients at all (it asks "what if this patch were not there"). Their
defaults are chosen to stay under ~15 s on a 2-core CPU
(scripts/benchmark_app.py) while remaining meaningful: IG with 16 Gauss-Legendre steps from a black image,
Occlusion with 56 px windows at a 28 px stride (a 7x7 grid of positions, like the feature map) filled with the
image's mean.

The model stays in eval mode and every method runs it in exact fp32 (never the opt-in fast CPU runner, which may be
bf16): a map explains the model's own numbers. Captum needs a forward that returns a tensor: the model package's
`CnnLstmLogits`. On CUDA, cuDNN refuses the LSTM backward in eval mode; attribution runs under
`torch.backends.cudnn.flags(enabled=False)`.

Not part of the Hub-uploaded model: nothing in the model files imports this module.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from modeling_cnn_lstm.fast_inference_cnn_lstm import CnnLstmLogits
from modeling_cnn_lstm.image_processing_cnn_lstm import pad_box

GRAD_CAM, INTEGRATED_GRADIENTS, OCCLUSION = "Grad-CAM", "Integrated Gradients", "Occlusion"
METHODS = (GRAD_CAM, INTEGRATED_GRADIENTS, OCCLUSION)
ProgressCallback = Callable[[float, str], None]


@dataclass
class SaliencySettings:
    """Defaults that keep IG and Occlusion under ~15 s for the paper network on 2 CPU cores."""

    ig_steps: int = 16
    ig_internal_batch_size: int = 4
    occlusion_window: float = 0.25  # fraction of the model's input side (56 px at 224)
    occlusion_stride: float = 0.125  # 28 px at 224
    occlusion_batch_size: int = 8
    ig_smoothing: int = 7  # box filter (px at model input) over |IG|: pixel-level maps are speckled otherwise


class HeadOnly(nn.Module):
    """The head as a function of the last block's output. Grad-CAM's layer is `feature_map`, an identity on that
    output, so its gradients are exactly those at `model.cnn_lstm.encoder.blocks[-1]` while the trunk ran without
    gradients (no autograd graph for the 27-GFLOP trunk, no hook on the shared model)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.feature_map = nn.Identity()

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.feature_map(feature_map))


class _CountingForward:
    """Calls a forward function and reports progress after each call (Captum has no progress hook for IG)."""

    def __init__(self, forward: Callable, total_calls: int, progress: ProgressCallback | None, label: str) -> None:
        self.forward, self.total, self.progress, self.label = forward, max(1, total_calls), progress, label
        self.calls = 0

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        output = self.forward(*args)
        self.calls += 1
        if self.progress is not None:
            self.progress(min(1.0, self.calls / self.total), self.label)
        return output


def _attribution_context(device: torch.device):
    return torch.backends.cudnn.flags(enabled=False) if device.type == "cuda" else contextlib.nullcontext()


def _normalise(saliency: torch.Tensor, clip_quantile: float | None = None) -> np.ndarray | None:
    """2-D map -> [0, 1] numpy, or None when it is all zero / not finite (an untrained model often gives that)."""
    saliency = saliency.detach().float().cpu()
    if not torch.isfinite(saliency).all():
        return None
    top = float(torch.quantile(saliency.flatten(), clip_quantile)) if clip_quantile else float(saliency.max())
    if top <= 1e-12:
        top = float(saliency.max())
    if top <= 1e-12:
        return None
    return (saliency.clamp(min=0) / top).clamp(max=1.0).numpy()


class Explainer:
    """Attribution for one model; the model is put in eval mode with frozen parameters (gradients w.r.t. inputs
    only) and is never hooked, so predictions can run on it concurrently."""

    def __init__(
        self, model: nn.Module, settings: SaliencySettings | None = None, no_grad_logits: Callable | None = None
    ) -> None:
        """`no_grad_logits`: a faster pixel_values -> logits function for Occlusion, which needs no gradients (the
        app passes its opt-in CPU runner, checked against eager fp32); default: the model's own fp32 graph."""
        self.no_grad_logits = no_grad_logits
        self.model = model.eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.settings = settings or SaliencySettings()
        self.device = next(self.model.parameters()).device

    @functools.cached_property
    def gradcam_grid(self) -> tuple[int, int]:
        """(rows, columns) of the trunk's output map, i.e. of a Grad-CAM map before it is resized: the paper's 7x7,
        other for a timm backbone or another input size. Measured once on a black input."""
        size = self.model.config.image_size
        pixels = torch.zeros(1, self.model.config.num_channels, size, size, device=self.device)
        with torch.no_grad():
            rows, columns = self.model.forward_features(pixels).shape[-2:]
        return int(rows), int(columns)

    def predicted_class(self, pixel_values: torch.Tensor) -> int:
        with torch.inference_mode():
            return int(self.model(pixel_values=pixel_values).logits[0].argmax())

    def gradcam_with_logits(
        self, pixel_values: torch.Tensor, target: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One eager pass of the trunk -> (calibrated logits (1, C), the raw Grad-CAM map (H, W) at the model's
        input size, the class explained: `target` or the predicted one). Predictions and their lung-evidence share
        come from the same pass."""
        from captum.attr import LayerAttribution, LayerGradCam

        pixel_values = pixel_values.to(self.device)
        with torch.no_grad():  # the trunk's output is all Grad-CAM needs from it
            feature_map = self.model.forward_features(pixel_values)
            head = HeadOnly(self.model)
            logits = head(feature_map)
        if target is None:  # the head's own answer: no second forward pass
            target = int(logits[0].argmax())
        with _attribution_context(self.device):
            cam = LayerGradCam(head, head.feature_map).attribute(feature_map, target=target, relu_attributions=True)
        # (1, 1, 7, 7) -> (1, 1, H, W) at the model's input size
        cam = LayerAttribution.interpolate(cam, tuple(pixel_values.shape[-2:]), interpolate_mode="bilinear")
        return logits, cam[0, 0].detach(), target

    def gradcam(self, pixel_values: torch.Tensor, target: int | None) -> tuple[np.ndarray | None, int]:
        _, cam, target = self.gradcam_with_logits(pixel_values, target)
        return _normalise(cam), target

    def integrated_gradients(
        self, pixel_values: torch.Tensor, target: int, baseline: torch.Tensor, progress: ProgressCallback | None
    ) -> np.ndarray | None:
        from captum.attr import IntegratedGradients

        steps, batch = self.settings.ig_steps, self.settings.ig_internal_batch_size
        forward = _CountingForward(CnnLstmLogits(self.model), math.ceil(steps / batch), progress, INTEGRATED_GRADIENTS)
        attributions = IntegratedGradients(forward).attribute(
            pixel_values, baselines=baseline, target=target, n_steps=steps, internal_batch_size=batch
        )
        # (1, C, H, W) -> (1, 1, H, W): magnitude summed over channels, then a small box filter
        magnitude = attributions.abs().sum(dim=1, keepdim=True)
        kernel = self.settings.ig_smoothing
        if kernel > 1:
            magnitude = F.avg_pool2d(magnitude, kernel, stride=1, padding=kernel // 2, count_include_pad=False)
        return _normalise(magnitude[0, 0], clip_quantile=0.995)

    def occlusion(
        self, pixel_values: torch.Tensor, target: int, progress: ProgressCallback | None
    ) -> np.ndarray | None:
        from captum.attr import Occlusion

        side = pixel_values.shape[-1]
        window = max(2, round(side * self.settings.occlusion_window))
        stride = max(1, round(side * self.settings.occlusion_stride))
        channels = pixel_values.shape[1]
        positions = ((pixel_values.shape[-2] - window) // stride + 1) * ((side - window) // stride + 1)
        per_eval = self.settings.occlusion_batch_size
        total = 1 + math.ceil(positions / per_eval)
        logits = self.no_grad_logits or CnnLstmLogits(self.model)
        forward = _CountingForward(lambda inputs: logits(inputs).softmax(-1), total, progress, OCCLUSION)
        # Each patch is replaced by the image's own mean (per channel): no artificial black or white edges.
        fill = pixel_values.mean(dim=(2, 3), keepdim=True).expand_as(pixel_values).contiguous()
        attributions = Occlusion(forward).attribute(
            pixel_values,
            sliding_window_shapes=(channels, window, window),
            strides=(channels, stride, stride),
            baselines=fill,
            target=target,
            perturbations_per_eval=per_eval,
        )
        # (1, C, H, W) -> (H, W): the drop in the target's probability when a patch is hidden (evidence for it)
        return _normalise(attributions.mean(dim=1)[0])

    def attribute(
        self,
        pixel_values: torch.Tensor,
        method: str,
        target: int | None = None,
        baseline: torch.Tensor | None = None,
        progress: ProgressCallback | None = None,
    ) -> tuple[np.ndarray | None, int]:
        """One image (1, C, H, W) -> (an HxW map in [0, 1] at the model's input size or None if it is all zero,
        the class explained: `target`, or the predicted class when None). IG's baseline defaults to zeros."""
        if method not in METHODS:
            raise ValueError(f"unknown saliency method {method!r}; choose one of {METHODS}")
        pixel_values = pixel_values.to(self.device)
        with _attribution_context(self.device):
            if method == GRAD_CAM:
                return self.gradcam(pixel_values, target)
            target = self.predicted_class(pixel_values) if target is None else target
            if method == INTEGRATED_GRADIENTS:
                baseline = torch.zeros_like(pixel_values) if baseline is None else baseline.to(self.device)
                return self.integrated_gradients(pixel_values, target, baseline, progress), target
            return self.occlusion(pixel_values, target, progress), target


def map_to_image(saliency: np.ndarray, height: int, width: int, resize_mode: str = "stretch") -> np.ndarray:
    """A map at the model's input size -> the image's own HxW (undoing the processor's stretch or pad)."""
    model_height, model_width = saliency.shape
    if resize_mode == "pad":  # the same centred box as the processor's pad resize
        top, left, box_height, box_width = pad_box(height, width, {"height": model_height, "width": model_width})
        saliency = saliency[top : top + box_height, left : left + box_width]
    resized = Image.fromarray(np.ascontiguousarray(saliency, dtype=np.float32), mode="F").resize(
        (width, height), Image.BILINEAR
    )
    return np.clip(np.asarray(resized), 0.0, 1.0)


# A jet-like colour scale (blue -> cyan -> yellow -> red): "red = most important" needs no legend.
_ANCHORS = np.array([[0, 0, 140], [0, 90, 255], [0, 220, 255], [255, 230, 0], [255, 60, 0], [170, 0, 0]], np.float32)


def colourise(values: np.ndarray) -> np.ndarray:
    """HxW in [0, 1] -> HxWx3 float RGB on 0..255."""
    position = np.clip(values, 0.0, 1.0) * (len(_ANCHORS) - 1)
    low = np.floor(position).astype(np.int64).clip(0, len(_ANCHORS) - 2)
    fraction = (position - low)[..., None]
    return _ANCHORS[low] * (1 - fraction) + _ANCHORS[low + 1] * fraction


UNCOLOURED_BELOW = 0.15  # of the image's strongest attribution: weaker areas keep the plain X-ray
FULL_COLOUR_AT = 0.5  # from here up the colour has the chosen opacity; between the two it fades in
DEFAULT_OPACITY = 0.65


OUTLINE_COLOUR = (0, 255, 140)  # the lung fields' outline: a green the colour scale never uses


def map_to_frame(
    values: np.ndarray, height: int, width: int, resize_mode: str, frame: tuple[int, int, int, int] | None
) -> np.ndarray:
    """A map at the model's input size -> HxW; `frame` (top, left, bottom, right in HxW's pixels) is where the model's
    input came from (a lung crop), None for the whole image. Outside the frame the map is zero."""
    if frame is None:
        return map_to_image(values, height, width, resize_mode)
    top, left, bottom, right = frame
    placed = np.zeros((height, width), dtype=np.float32)
    if bottom > top and right > left:
        placed[top:bottom, left:right] = map_to_image(values, bottom - top, right - left, resize_mode)
    return placed


def _outline(mask: np.ndarray) -> np.ndarray:
    """The 2-pixel-wide border of a boolean mask."""
    padded = np.pad(mask, 1, mode="edge")
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:] & mask
    edge = mask & ~interior
    grown = np.pad(edge, 1)
    return edge | grown[:-2, 1:-1] | grown[2:, 1:-1] | grown[1:-1, :-2] | grown[1:-1, 2:]


def render_overlay(
    display: np.ndarray,
    saliency: np.ndarray | None,
    resize_mode: str = "stretch",
    max_side: int = 768,
    opacity: float = DEFAULT_OPACITY,
    outline: np.ndarray | None = None,
    frame: tuple[int, int, int, int] | None = None,
) -> Image.Image:
    """The X-ray (HxW or HxWx3 uint8) with the map blended in, at the input's aspect ratio (longer side <= 768).
    Areas under `UNCOLOURED_BELOW` of the peak stay plain grey, so "uncoloured = mattered little" holds and the
    anatomy under the strong areas stays visible; `opacity` (0-1) is the colour's weight where the map is strong.
    `outline`: a boolean mask at the model's input size (the lung fields) drawn as a green line. `frame`: where the
    model's input lies in `display`, in its pixels (top, left, bottom, right), when the processor cropped it."""
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be in [0, 1], got {opacity!r}")
    height, width = display.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    base = Image.fromarray(display).convert("RGB").resize(size, Image.BILINEAR)
    if saliency is None and outline is None:
        return base
    if frame is not None:
        frame = tuple(round(value * scale) for value in frame)  # type: ignore[assignment]
    blended = np.asarray(base, dtype=np.float32)
    if saliency is not None:
        values = map_to_frame(saliency, size[1], size[0], resize_mode, frame)
        ramp = np.clip((values - UNCOLOURED_BELOW) / (FULL_COLOUR_AT - UNCOLOURED_BELOW), 0.0, 1.0)
        alpha = (opacity * ramp)[..., None]
        blended = blended * (1 - alpha) + colourise(values) * alpha
    if outline is not None:
        inside = map_to_frame(outline.astype(np.float32), size[1], size[0], resize_mode, frame) >= 0.5
        blended[_outline(inside)] = OUTLINE_COLOUR
    return Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8))


def colour_bar_html(meaning: str = "the model's attribution, relative to the strongest area of this image") -> str:
    """The overlay's legend: the colour scale from `UNCOLOURED_BELOW` to the peak (the colours `render_overlay`
    uses), and what the uncoloured areas mean."""
    stops = ", ".join(
        "rgb({},{},{}) {:.0f}%".format(*np.rint(colourise(np.float32(value))).astype(int), 100 * index / 10)
        for index, value in enumerate(np.linspace(UNCOLOURED_BELOW, 1.0, 11))
    )
    return (
        '<div class="cxr-colour-bar" style="font-size:0.85em">'
        f'<div style="height:14px;border-radius:3px;background:linear-gradient(to right, {stops})"></div>'
        '<div style="display:flex;justify-content:space-between"><span>weak</span><span>strongest</span></div>'
        f"<div>Colour: {meaning}. Areas below {UNCOLOURED_BELOW:.0%} of the strongest are left uncoloured: they "
        "mattered little.</div></div>"
    )

__all__ = [
    "GRAD_CAM",
    "INTEGRATED_GRADIENTS",
    "METHODS",
    "OCCLUSION",
    "Explainer",
    "HeadOnly",
    "SaliencySettings",
    "colourise",
    "colour_bar_html",
    "DEFAULT_OPACITY",
    "UNCOLOURED_BELOW",
    "map_to_image",
    "render_overlay",
]
