"""How much of a prediction rests on the lungs: the share of its Grad-CAM evidence inside the lung fields.

Every prediction (page, API, batch, CSV, command line) is made in one eager pass that also yields the Grad-CAM map of
the predicted class (`Explainer.gradcam_with_logits`), and the lung fields are found on the model's input by the
model package's own rule (`modeling_cnn_lstm/lung_region_cnn_lstm.py`, the one the shortcut audit and training
use). The share of the map's mass inside the fields is shown beside the prediction; the fields' share of the image
area is what a map blind to anatomy would give. Below the checkpoint's threshold the call gets a warning.

The threshold comes from the checkpoint's own report (`report/metrics.json` -> `lung_evidence.threshold`): the 10th
percentile of the shares on its validation split, capped at 0.5 so that the warning's "most of the evidence lies
outside" is always literally true. A checkpoint without one gets 0.5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from modeling_cnn_lstm.lung_region_cnn_lstm import evidence_share, find_lung_region, lung_crop_box

DEFAULT_THRESHOLD = 0.5
WARNING = (
    "Most of the evidence for this call lies outside the lung fields (markers, borders, devices): do not rely on it."
)


@dataclass(frozen=True)
class LungEvidence:
    """The lung-evidence share of one prediction and what it is compared with."""

    share: float | None  # share of the Grad-CAM mass inside the lung fields; None when the map is zero everywhere
    area: float  # the fields' share of the model's input (an anatomy-blind map's share)
    mask: np.ndarray  # (H, W) bool at the model's input size: the outline drawn on the overlay
    threshold: float

    @property
    def low(self) -> bool:
        return self.share is not None and self.share < self.threshold

    def sentence(self) -> str:
        if self.share is None:
            return "Evidence inside the lung fields: not measurable (the Grad-CAM map is zero everywhere)."
        return (
            f"Evidence inside the lung fields: **{self.share:.0%}** of the Grad-CAM map (the fields cover "
            f"{self.area:.0%} of the image; below {self.threshold:.0%} the call gets a warning)."
        )

    def cell(self) -> str:
        """The batch/CSV column: the share to 2 decimals, empty when not measurable."""
        return "" if self.share is None else f"{self.share:.2f}"


def threshold_from_report(report: dict[str, Any] | None) -> float:
    """The checkpoint's validation-derived threshold (see the module doc), else `DEFAULT_THRESHOLD`."""
    section = (report or {}).get("lung_evidence")
    value = section.get("threshold") if isinstance(section, dict) else None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 < value <= DEFAULT_THRESHOLD:
        return float(value)
    return DEFAULT_THRESHOLD


def measure(cam: torch.Tensor, pixel_values: torch.Tensor, threshold: float) -> LungEvidence:
    """A raw Grad-CAM map (H, W) of the model's input (1, C, H, W) -> its `LungEvidence`."""
    mask = find_lung_region(pixel_values[0].detach().cpu()).mask
    share = float(evidence_share(cam.detach().cpu()[None], mask[None])[0])
    return LungEvidence(
        share=None if math.isnan(share) else share,
        area=float(mask.float().mean()),
        mask=mask.numpy(),
        threshold=threshold,
    )


def model_frame(model_input: np.ndarray, crop_to_lungs: bool) -> tuple[int, int, int, int] | None:
    """Where the model's input lies in the upload (top, left, bottom, right): the lung box for a processor that
    crops to it (computed by the same rule on the same pixels), None for the whole image."""
    if not crop_to_lungs:
        return None
    return lung_crop_box(torch.from_numpy(np.ascontiguousarray(model_input.transpose(2, 0, 1))))


__all__ = ["DEFAULT_THRESHOLD", "WARNING", "LungEvidence", "measure", "model_frame", "threshold_from_report"]
