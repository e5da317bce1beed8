"""Is this upload plausibly a frontal chest radiograph, and is the model sure of its answer?

A classifier trained on three kinds of chest X-ray answers one of those three for *any* input, a holiday photo
included. The app therefore checks the input first and warns (it still answers, but never silently).

Method: a few image statistics, each a documented rule with a threshold set from the 1,038 real radiographs of
`../shared/data/cxr3` (their extremes, with margin) and from non-radiograph images generated in the tests. The
statistics are computed on a copy whose longer side is 256 px, so one check costs a few milliseconds:

- colour: share of pixels whose chroma (max - min of R, G, B) exceeds 48/255. Radiographs are grey; screenshots of
  them with coloured arrows stay far below the limit. cxr3: 0 everywhere. Limit 5%.
- flat: standard deviation of grey values. cxr3: min 14.6. Limit 8.
- noise: lag-1 autocorrelation of grey values (mean of horizontal and vertical). Radiographs are smooth at 256 px
  (cxr3: min 0.91); noise and fine textures are not. Limit 0.75.
- text/graphics: share of pixels inside exactly uniform areas (both neighbour steps < 0.25 grey levels), black
  (< 12) left out because radiographs often have black borders (cxr3: max 0.20), and share of strong steps between
  neighbours (|difference| > 60; cxr3: max 0.021). Documents and screenshots have large uniform backgrounds and
  sharp glyph edges. Limits 0.35 and 0.05.
- shape: width/height outside 0.4..3.0 (cxr3: 0.75..2.51; phone screenshots and banners fall outside).
- DICOM header, where present: a modality other than CR/DX/DR/RG, or a lateral view position.

Measured (tests/test_app_logic.py): false alarms on all 1,038 cxr3 radiographs 0/1038; hits on the generated
non-radiographs (colour photos, documents and screenshots with text, flat images, noise) 100% per kind. What it
cannot see: greyscale photographs of smooth scenes, other radiographs (hand, knee, lateral chest without a DICOM
header), CT slices saved as PNG. A high model confidence on such an input means nothing.

Not part of the Hub-uploaded model: nothing in the model files imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from modeling_cnn_lstm.image_processing_cnn_lstm import match_channels

ANALYSIS_SIDE = 256
COLOUR_CHROMA = 48.0
MAX_COLOUR_SHARE = 0.05
MIN_STD = 8.0
MIN_SMOOTHNESS = 0.75
UNIFORM_STEP = 0.25
BLACK_LEVEL = 12.0
MAX_UNIFORM_SHARE = 0.35
EDGE_STEP = 60.0
MAX_EDGE_SHARE = 0.05
ASPECT_RANGE = (0.4, 3.0)
RADIOGRAPH_MODALITIES = ("CR", "DX", "DR", "RG")
LATERAL_VIEWS = ("LL", "RL", "LAT", "LATERAL", "LLD", "RLD")
LOW_CONFIDENCE = 0.6  # top probability below this (three classes: chance is 0.33) -> warning


@dataclass(frozen=True)
class Finding:
    """One reason to doubt the input or the answer; `code` is stable for tests and API users."""

    code: str
    message: str


def _thumbnail(pixels: np.ndarray) -> np.ndarray:
    """HxWxC float 0..255 -> at most 256 px on the longer side, same channels (bilinear, PIL)."""
    height, width = pixels.shape[:2]
    scale = min(1.0, ANALYSIS_SIDE / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    channels = [
        np.asarray(Image.fromarray(np.ascontiguousarray(pixels[..., c], dtype=np.float32), mode="F").resize(
            size, Image.BILINEAR
        ))
        for c in range(pixels.shape[-1])
    ]
    return np.stack(channels, axis=-1)


def _lag1_correlation(first: np.ndarray, second: np.ndarray) -> float:
    first, second = first - first.mean(), second - second.mean()
    denominator = float(np.sqrt((first * first).sum() * (second * second).sum()))
    return float((first * second).sum() / denominator) if denominator > 0 else 1.0


def image_statistics(pixels: np.ndarray) -> dict[str, float]:
    """The statistics the rules use, for an HxWxC (C = 1 or 3) float image on the 0..255 scale."""
    small = _thumbnail(pixels)
    if small.shape[-1] == 3:
        colour_share = float(((small.max(-1) - small.min(-1)) > COLOUR_CHROMA).mean())
        grey = match_channels(small, 1)[..., 0]
    else:
        colour_share, grey = 0.0, small[..., 0]
    steps_x, steps_y = np.abs(np.diff(grey, axis=1)), np.abs(np.diff(grey, axis=0))
    edge_share = 0.5 * (float((steps_x > EDGE_STEP).mean()) + float((steps_y > EDGE_STEP).mean()))
    # (H-1)x(W-1) grid of pixels whose right and lower neighbours are the same grey level, black borders left out
    uniform = (steps_x[:-1] < UNIFORM_STEP) & (steps_y[:, :-1] < UNIFORM_STEP) & (grey[:-1, :-1] >= BLACK_LEVEL)
    smoothness = 0.5 * (_lag1_correlation(grey[:, 1:], grey[:, :-1]) + _lag1_correlation(grey[1:], grey[:-1]))
    return {
        "colour_share": colour_share,
        "std": float(grey.std()),
        "smoothness": smoothness,
        "uniform_share": float(uniform.mean()) if uniform.size else 1.0,
        "edge_share": edge_share,
        "aspect": pixels.shape[1] / pixels.shape[0],
    }


def check_radiograph(pixels: np.ndarray, dicom: dict[str, object] | None = None) -> list[Finding]:
    """Reasons why the input does not look like a frontal chest radiograph (empty when it does)."""
    stats = image_statistics(pixels)
    findings = []
    if stats["colour_share"] > MAX_COLOUR_SHARE:
        findings.append(Finding("colour", f"it is a colour image ({stats['colour_share']:.0%} strongly coloured "
                                          "pixels), e.g. a photograph; radiographs are greyscale"))
    if stats["std"] < MIN_STD:
        findings.append(Finding("flat", "it is almost uniform (no visible structure)"))
    elif stats["smoothness"] < MIN_SMOOTHNESS:
        findings.append(Finding("noise", "it looks like noise or a fine texture, not an X-ray"))
    graphic = stats["uniform_share"] > MAX_UNIFORM_SHARE or stats["edge_share"] > MAX_EDGE_SHARE
    if graphic and not any(finding.code == "flat" for finding in findings):
        findings.append(Finding("text", "it looks like a document or screenshot (large uniform background "
                                        "or sharp text-like edges)"))
    low, high = ASPECT_RANGE
    if not low <= stats["aspect"] <= high:
        findings.append(Finding("aspect", f"its shape (width/height {stats['aspect']:.2f}) is unusual for a chest "
                                          "radiograph"))
    dicom = dicom or {}
    modality = str(dicom.get("Modality", "")).upper()
    if modality and modality not in RADIOGRAPH_MODALITIES:
        findings.append(Finding("modality", f"the DICOM modality is {modality}, not a radiograph (CR/DX)"))
    view = str(dicom.get("ViewPosition", "")).upper()
    if view in LATERAL_VIEWS:
        findings.append(Finding("lateral", f"the DICOM view position is {view}; the model reads frontal views only"))
    return findings


def check_confidence(probabilities: dict[str, float]) -> list[Finding]:
    """A low top probability is a warning: the answer is close to a guess among three classes."""
    top_label, top = max(probabilities.items(), key=lambda item: item[1])
    if top < LOW_CONFIDENCE:
        return [Finding("low_confidence", f"the model is not confident (top class {top_label} at {top:.0%}, below "
                                          f"{LOW_CONFIDENCE:.0%}); treat the answer as uncertain")]
    return []


def warning_text(findings: list[Finding]) -> str:
    """One user-facing sentence for input findings."""
    if not findings:
        return ""
    reasons = "; ".join(finding.message for finding in findings)
    return f"This does not look like a frontal chest radiograph: {reasons}. The prediction is not meaningful for it."


__all__ = ["Finding", "LOW_CONFIDENCE", "check_confidence", "check_radiograph", "image_statistics", "warning_text"]
