"""The report's figures as PNG (matplotlib, Agg backend: no display needed), numbered after the paper's.

confusion matrix (paper Fig. 6), accuracy and loss per epoch (Figs. 7, 8), per-class bars (Figs. 9, 10), one-vs-rest
ROC with AUC (Fig. 11), and the reliability diagram the paper lacks. Each function writes one file and returns it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from train.metrics.cxr_metrics.cxr_metrics import roc_curve  # noqa: E402

DPI = 120


def _save(figure: plt.Figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return path


def plot_confusion_matrix(matrix: list[list[int]], label_names: list[str], path: Path) -> Path:
    counts = np.asarray(matrix)
    figure, axis = plt.subplots(figsize=(4.8, 4.2))
    image = axis.imshow(counts, cmap="Blues")
    figure.colorbar(image, ax=axis, fraction=0.046)
    ticks = np.arange(len(label_names))
    axis.set_xticks(ticks, label_names, rotation=20)
    axis.set_yticks(ticks, label_names)
    axis.set_xlabel("Predicted class")
    axis.set_ylabel("True class")
    threshold = counts.max() / 2 if counts.size else 0
    for row in range(counts.shape[0]):
        for column in range(counts.shape[1]):
            colour = "white" if counts[row, column] > threshold else "black"
            axis.text(column, row, str(counts[row, column]), ha="center", va="center", color=colour)
    axis.set_title("Confusion matrix (test)")
    return _save(figure, path)


def _curves(history: list[dict[str, Any]], train_key: str, eval_key: str) -> tuple[list, list]:
    train = [(entry["epoch"], entry[train_key]) for entry in history if train_key in entry and "epoch" in entry]
    evaluation = [(entry["epoch"], entry[eval_key]) for entry in history if eval_key in entry and "epoch" in entry]
    return train, evaluation


def plot_training_curves(histories: dict[str, list[dict[str, Any]]], quantity: str, path: Path) -> Path:
    """`quantity` "accuracy" or "loss": training (solid) and validation (dashed) per epoch, one colour per run."""
    train_key = "train_accuracy" if quantity == "accuracy" else "loss"
    eval_key = f"eval_{quantity}"
    figure, axis = plt.subplots(figsize=(6, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    plotted = False
    for index, (name, history) in enumerate(histories.items()):
        colour = colours[index % len(colours)]
        train, evaluation = _curves(history, train_key, eval_key)
        prefix = f"{name}: " if len(histories) > 1 else ""
        if train:
            axis.plot(*zip(*train, strict=True), color=colour, marker=".", label=f"{prefix}training")
            plotted = True
        if evaluation:
            axis.plot(*zip(*evaluation, strict=True), color=colour, ls="--", marker=".", label=f"{prefix}validation")
            plotted = True
    if not plotted:
        axis.text(0.5, 0.5, "no training history", ha="center", va="center", transform=axis.transAxes)
    else:
        axis.legend(fontsize=7)
    axis.set_xlabel("Epoch")
    axis.set_ylabel(quantity.capitalize())
    axis.set_title(f"Training and validation {quantity}")
    axis.grid(alpha=0.3)
    return _save(figure, path)


def plot_per_class(per_class: dict[str, dict[str, Any]], path: Path) -> Path:
    keys = ("accuracy", "precision", "sensitivity", "specificity", "f1")
    names = list(per_class)
    width = 0.8 / len(keys)
    figure, axis = plt.subplots(figsize=(7, 4))
    for index, key in enumerate(keys):
        values = [per_class[name][key] if per_class[name][key] is not None else 0.0 for name in names]
        positions = np.arange(len(names)) + (index - (len(keys) - 1) / 2) * width
        axis.bar(positions, values, width, label=key.capitalize() if key != "f1" else "F1")
    axis.set_xticks(np.arange(len(names)), names)
    axis.set_ylim(0, 1.22)
    axis.set_yticks(np.linspace(0, 1, 6))
    axis.set_ylabel("Score")
    axis.set_title("Per-class metrics (test)")
    axis.legend(fontsize=8, ncols=len(keys), loc="upper center")
    return _save(figure, path)


def plot_roc(probabilities: np.ndarray, labels: np.ndarray, per_class: dict[str, dict[str, Any]], path: Path) -> Path:
    figure, axis = plt.subplots(figsize=(5, 4.6))
    for index, name in enumerate(per_class):
        positive = labels == index
        if positive.all() or not positive.any():
            continue
        fpr, tpr = roc_curve(positive, probabilities[:, index])
        axis.plot(fpr, tpr, label=f"{name} (AUC {per_class[name]['auc']:.3f})")
    axis.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
    axis.set_xlabel("False positive rate (1 - specificity)")
    axis.set_ylabel("True positive rate (sensitivity)")
    axis.set_title("One-vs-rest ROC (test)")
    axis.legend(fontsize=8, loc="lower right")
    return _save(figure, path)


def plot_reliability(calibration: dict[str, Any], path: Path) -> Path:
    """Accuracy vs confidence per bin, before and after temperature scaling, with the ECE of each."""
    figure, axis = plt.subplots(figsize=(5, 4.6))
    width = 1.0 / calibration["num_bins"]
    for key, label, offset, alpha in (("bins_before", "T = 1", -0.25, 0.5), ("bins_after", "calibrated", 0.25, 0.8)):
        bins = [entry for entry in calibration[key] if entry["count"]]
        centres = [(entry["lower"] + entry["upper"]) / 2 + offset * width for entry in bins]
        ece = calibration["ece_before" if key == "bins_before" else "ece_after"]
        axis.bar(
            centres, [entry["accuracy"] for entry in bins], width / 2, alpha=alpha, label=f"{label} (ECE {ece:.3f})"
        )
    axis.plot([0, 1], [0, 1], color="grey", ls=":", lw=1, label="perfect calibration")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1.05)
    axis.set_xlabel("Confidence (top-class probability)")
    axis.set_ylabel("Accuracy")
    axis.set_title(f"Reliability diagram (T = {calibration['temperature']:.2f})")
    axis.legend(fontsize=8, loc="upper left")
    return _save(figure, path)
