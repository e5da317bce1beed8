"""Temperature scaling (Guo et al., ICML 2017): one scalar T > 0 fitted on validation logits, logits / T at inference.

T changes the probabilities the model reports, never its argmax, so every accuracy-type metric is unchanged and only
calibration (ECE, NLL) moves. The fitted T is stored in the saved config (`calibration_temperature`), which the model
applies in its forward pass. The fit is a bounded 1-D search on log T (a grid, then golden-section refinement):
deterministic, no gradients, and it cannot run off to T -> 0 when the validation set happens to be all correct.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from train.metrics.cxr_metrics.cxr_metrics import calibration_bins, expected_calibration_error, softmax

TEMPERATURE_BOUNDS = (0.05, 20.0)


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean cross-entropy of softmax(logits / T) in float64."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    shifted = scaled - scaled.max(axis=1, keepdims=True)
    log_normalizer = np.log(np.exp(shifted).sum(axis=1))
    picked = shifted[np.arange(len(labels)), np.asarray(labels, dtype=np.int64)]
    return float(np.mean(log_normalizer - picked))


def fit_temperature(
    logits: np.ndarray, labels: np.ndarray, bounds: tuple[float, float] = TEMPERATURE_BOUNDS, grid_points: int = 121
) -> float:
    """The T in `bounds` that minimises the NLL of softmax(logits / T) on (logits, labels)."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if logits.ndim != 2 or len(logits) != len(labels) or len(labels) == 0:
        raise ValueError(f"need (n, c) logits and n labels, got {logits.shape} and {labels.shape}")
    low, high = math.log(bounds[0]), math.log(bounds[1])
    grid = np.linspace(low, high, grid_points)
    losses = [negative_log_likelihood(logits, labels, math.exp(log_t)) for log_t in grid]
    best = int(np.argmin(losses))
    # golden-section search in the bracket around the best grid point
    left, right = grid[max(best - 1, 0)], grid[min(best + 1, grid_points - 1)]
    ratio = (math.sqrt(5.0) - 1.0) / 2.0

    def loss(log_t: float) -> float:
        return negative_log_likelihood(logits, labels, math.exp(log_t))

    for _ in range(60):
        inner_left, inner_right = right - ratio * (right - left), left + ratio * (right - left)
        if loss(inner_left) <= loss(inner_right):
            right = inner_right
        else:
            left = inner_left
    candidate = (left + right) / 2.0
    return float(math.exp(candidate if loss(candidate) <= losses[best] else grid[best]))


def calibration_summary(
    logits: np.ndarray, labels: np.ndarray, temperature: float, num_bins: int = 15
) -> dict[str, Any]:
    """ECE, NLL and reliability bins before (T = 1) and after temperature scaling, on the same logits."""
    before = softmax(np.asarray(logits, dtype=np.float64))
    after = softmax(np.asarray(logits, dtype=np.float64) / temperature)
    return {
        "temperature": float(temperature),
        "ece_before": expected_calibration_error(before, labels, num_bins),
        "ece_after": expected_calibration_error(after, labels, num_bins),
        "nll_before": negative_log_likelihood(logits, labels, 1.0),
        "nll_after": negative_log_likelihood(logits, labels, temperature),
        "bins_before": calibration_bins(before, labels, num_bins),
        "bins_after": calibration_bins(after, labels, num_bins),
        "num_bins": num_bins,
    }
