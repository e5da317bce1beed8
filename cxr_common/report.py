"""The test report that travels with every checkpoint (`report/`): its files, its schema, and the one renderer of
its numbers. Training writes it (train/training/report.py: report.md, the model card); the app reads and shows it
(cxr_app/report_view.py: the Model report tab). Both format a number the same way because both call `percent`.
"""

from __future__ import annotations

import math
from typing import Any, TypedDict

METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.csv"
PLOT_FILES = {
    "confusion_matrix": "confusion_matrix.png",
    "accuracy_curves": "accuracy_curves.png",
    "loss_curves": "loss_curves.png",
    "per_class_metrics": "per_class_metrics.png",
    "roc_curves": "roc_curves.png",
    "reliability_diagram": "reliability_diagram.png",
}


class Interval(TypedDict):
    low: float
    high: float
    n: int  # resamples the interval was taken over


class ClassMetrics(TypedDict):
    accuracy: float | None  # one-vs-rest
    precision: float | None
    sensitivity: float | None
    specificity: float | None
    f1: float | None
    auc: float | None
    support: int


class Metrics(TypedDict, total=False):
    accuracy: float
    macro_precision: float
    macro_sensitivity: float
    macro_specificity: float
    macro_f1: float
    macro_auc: float | None
    ece: float
    nll: float
    calibration_bins: list[dict[str, Any]]
    per_class: dict[str, ClassMetrics]
    confusion_matrix: list[list[int]]
    label_names: list[str]
    num_samples: int


class Bootstrap(TypedDict, total=False):
    samples: int
    unit: str | None  # "patient" or "image"
    seed: int
    intervals: dict[str, Interval]
    per_class: dict[str, dict[str, Interval]]


class Report(TypedDict, total=False):
    """report/metrics.json. Written at the end of training (train/training/report.py `write_report`); later results
    are added by scripts/update_card.py and scripts/compare_models.py."""

    num_samples: int
    label_names: list[str]
    metrics: Metrics
    calibration: dict[str, Any]  # temperature, fitted_on, ECE/NLL before and after
    bootstrap: Bootstrap
    per_source: dict[str, Any]
    plots: dict[str, str]  # key of PLOT_FILES -> file name in report/
    run: dict[str, Any]
    cross_validation: dict[str, Any] | None
    shortcut_audit: dict[str, Any]
    lung_evidence: dict[str, Any]  # the app's warning threshold
    card_info: dict[str, Any]
    previous_model: dict[str, Any]
    comparison: dict[str, Any]  # the paper's experiment: this network against the competitive CNN
    leaky_protocol: dict[str, Any]


REPORT_KEYS = frozenset(Report.__annotations__)


def number(value: Any) -> float | None:
    """A finite number, or None (missing, NaN, infinite, not a number)."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def percent(value: Any, interval: dict[str, Any] | None = None, unit: str = "") -> str:
    """A fraction as a percentage with one decimal ("63.6"; with `unit="%"` "63.6%"), "n/a" when undefined, and its
    95% interval when given ("63.6 (55.9–71.1)")."""
    found = number(value)
    if found is None:
        return "n/a"
    text = f"{100 * found:.1f}{unit}"
    low, high = (None, None) if not interval else (number(interval.get("low")), number(interval.get("high")))
    if low is not None and high is not None:
        text += f" ({100 * low:.1f}–{100 * high:.1f})"
    return text


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


__all__ = ["METRICS_FILE", "PLOT_FILES", "PREDICTIONS_FILE", "REPORT_KEYS", "ClassMetrics", "Interval", "Metrics",
           "Report", "markdown_table", "number", "percent"]  # fmt: skip
