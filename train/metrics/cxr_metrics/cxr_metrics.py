"""Chest X-ray classification metrics as an `evaluate` module (self-contained: numpy + evaluate + datasets).

Everything a paper-style report of a multi-class classifier needs from one call: accuracy; per-class and macro
precision, sensitivity (recall), specificity, F1, one-vs-rest ROC AUC and one-vs-rest accuracy; the confusion
matrix; and the expected calibration error with its reliability bins. Loadable offline by path,
`evaluate.load("train/metrics/cxr_metrics")`, and publishable to the Hub as a Space.

The numpy functions at module level are the single implementation: the training report imports them for the
bootstrap intervals and the plots, so the numbers in a report and in `compute()` cannot drift apart.
"""

from __future__ import annotations

from typing import Any

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Metrics for single-label multi-class image classification as reported in medical-imaging papers: accuracy,
per-class and macro-averaged precision, sensitivity (recall), specificity and F1, one-vs-rest ROC AUC, the confusion
matrix, and the expected calibration error (ECE, equal-width confidence bins) with its reliability-diagram bins.
Undefined values (for example the AUC of a class without positives) are returned as None and left out of the macro
averages.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: per-sample class scores, `list[list[float]]` of shape (n, num_classes), probabilities or logits;
        or hard class indices `list[int]` (then AUC, ECE and NLL are None).
    references: true class indices, `list[int]`.
    label_names (`list[str]`, optional): class names, in index order; default "0", "1", ...
    num_classes (`int`, optional): number of classes; default: len(label_names), else the score width, else
        max index + 1.
    input_type (`str`, default "auto"): "probabilities", "logits", or "auto" (rows in [0, 1] that sum to 1 are
        probabilities, anything else is softmaxed).
    ece_bins (`int`, default 15): number of equal-width confidence bins for the ECE.
Returns:
    accuracy, macro_precision, macro_sensitivity, macro_specificity, macro_f1, macro_auc, ece, nll,
    per_class ({name: {accuracy, precision, sensitivity, specificity, f1, auc, support}}),
    confusion_matrix (rows: true class, columns: predicted class), calibration_bins, label_names, num_samples.
Examples:
    >>> metric = evaluate.load("train/metrics/cxr_metrics")
    >>> result = metric.compute(predictions=[[0.9, 0.05, 0.05], [0.2, 0.7, 0.1]], references=[0, 1],
    ...                         label_names=["COVID-19", "Normal", "Pneumonia"])
    >>> result["accuracy"]
    1.0
"""

_CITATION = """
@article{islam2020combined,
  title={A combined deep CNN-LSTM network for the detection of novel coronavirus (COVID-19) using X-ray images},
  author={Islam, Md Zabirul and Islam, Md Milon and Asraf, Amanullah},
  journal={Informatics in Medicine Unlocked}, volume={20}, pages={100412}, year={2020}
}
@inproceedings{guo2017calibration,
  title={On Calibration of Modern Neural Networks}, author={Guo, Chuan and Pleiss, Geoff and Sun, Yu and
  Weinberger, Kilian Q.}, booktitle={ICML}, year={2017}
}
"""

MACRO_KEYS = ("precision", "sensitivity", "specificity", "f1", "auc")


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (stable for large logits)."""
    shifted = np.asarray(logits, dtype=np.float64) - np.max(logits, axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def to_probabilities(scores: np.ndarray, input_type: str = "auto") -> np.ndarray:
    """Scores (n, c) -> probabilities; "auto" keeps rows that already are distributions."""
    scores = np.asarray(scores, dtype=np.float64)
    if input_type not in ("auto", "probabilities", "logits"):
        raise ValueError(f"input_type must be 'auto', 'probabilities' or 'logits', got {input_type!r}")
    if not np.isfinite(scores).all():
        raise ValueError("predictions contain NaN or infinite values")
    if input_type == "logits":
        return softmax(scores)
    is_distribution = bool(
        scores.size and scores.min() >= 0.0 and scores.max() <= 1.0 and np.allclose(scores.sum(axis=1), 1.0, atol=1e-3)
    )
    if input_type == "probabilities":
        if not is_distribution:
            raise ValueError("input_type='probabilities' but the rows are not probability distributions")
        return scores / scores.sum(axis=1, keepdims=True)
    return scores / scores.sum(axis=1, keepdims=True) if is_distribution else softmax(scores)


def confusion_matrix(references: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts with rows = true class, columns = predicted class."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(references, dtype=np.int64), np.asarray(predicted, dtype=np.int64)), 1)
    return matrix


def binary_auc(positive: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC as the Mann-Whitney statistic with average ranks for ties; None without both classes."""
    positive = np.asarray(positive, dtype=bool)
    num_positive, num_negative = int(positive.sum()), int((~positive).sum())
    if num_positive == 0 or num_negative == 0:
        return None
    scores = np.asarray(scores)
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    # average rank (1-based) within each run of tied scores, vectorized
    run_starts_mask = np.r_[True, np.diff(sorted_scores) != 0]
    run_starts = np.flatnonzero(run_starts_mask)
    run_ends = np.r_[run_starts[1:], len(scores)]
    run_of_position = np.cumsum(run_starts_mask) - 1
    ranks = np.empty(len(scores), dtype=np.float64)
    ranks[order] = ((run_starts + run_ends + 1) / 2.0)[run_of_position]
    rank_sum = ranks[positive].sum()
    return float((rank_sum - num_positive * (num_positive + 1) / 2.0) / (num_positive * num_negative))


def roc_curve(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every distinct threshold, starting at (0, 0)."""
    positive = np.asarray(positive, dtype=bool)
    order = np.argsort(-np.asarray(scores), kind="mergesort")
    sorted_scores, sorted_positive = np.asarray(scores)[order], positive[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(sorted_scores) - 1]
    true_positives = np.cumsum(sorted_positive)[last_of_run]
    false_positives = (last_of_run + 1) - true_positives
    tpr = np.r_[0.0, true_positives / max(positive.sum(), 1)]
    fpr = np.r_[0.0, false_positives / max((~positive).sum(), 1)]
    return fpr, tpr


def calibration_bins(probabilities: np.ndarray, references: np.ndarray, num_bins: int = 15) -> list[dict[str, Any]]:
    """Equal-width bins of top-class confidence: count, mean confidence and accuracy per bin."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(references)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    # bin i holds confidences in (edges[i], edges[i + 1]]; confidence 0 cannot occur for a top class
    indices = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, num_bins - 1)
    bins = []
    for index in range(num_bins):
        members = indices == index
        count = int(members.sum())
        bins.append(
            {
                "lower": float(edges[index]),
                "upper": float(edges[index + 1]),
                "count": count,
                "confidence": float(confidence[members].mean()) if count else None,
                "accuracy": float(correct[members].mean()) if count else None,
            }
        )
    return bins


def expected_calibration_error(probabilities: np.ndarray, references: np.ndarray, num_bins: int = 15) -> float:
    """ECE (Guo et al. 2017): sum over bins of (bin size / n) * |accuracy - confidence|."""
    total = len(references)
    return float(
        sum(
            b["count"] / total * abs(b["accuracy"] - b["confidence"])
            for b in calibration_bins(probabilities, references, num_bins)
            if b["count"]
        )
    )


def _ratio(numerator: float, denominator: float) -> float | None:
    return float(numerator / denominator) if denominator > 0 else None


def _mean_defined(values: list[float | None]) -> float | None:
    defined = [value for value in values if value is not None]
    return float(np.mean(defined)) if defined else None


def _class_names(
    predictions: np.ndarray, references: np.ndarray, label_names: list[str] | None, num_classes: int | None
) -> list[str]:
    """The class names, their number taken from `num_classes`, else the names, the score width or the indices."""
    if num_classes is None:
        if label_names is not None:
            num_classes = len(label_names)
        elif predictions.ndim == 2:
            num_classes = predictions.shape[1]
        else:
            num_classes = int(max(references.max(), predictions.max())) + 1
    names = list(label_names) if label_names is not None else [str(index) for index in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} label names for {num_classes} classes")
    if references.min() < 0 or references.max() >= num_classes:
        raise ValueError(f"references must be class indices in [0, {num_classes}), got {sorted(set(references))}")
    return names


def _predicted_classes(
    predictions: np.ndarray, num_classes: int, input_type: str
) -> tuple[np.ndarray | None, np.ndarray]:
    """(probabilities or None for hard predictions, predicted class per sample)."""
    if predictions.ndim == 2:
        if predictions.shape[1] != num_classes:
            raise ValueError(f"predictions have {predictions.shape[1]} scores per sample, expected {num_classes}")
        probabilities = to_probabilities(predictions, input_type)
        return probabilities, probabilities.argmax(axis=1)
    if predictions.ndim == 1:
        predicted = predictions.astype(np.int64)
        if predicted.min() < 0 or predicted.max() >= num_classes:
            raise ValueError(f"hard predictions must be class indices in [0, {num_classes})")
        return None, predicted
    raise ValueError(f"predictions must be (n,) class indices or (n, c) scores, got shape {predictions.shape}")


def _per_class(
    matrix: np.ndarray, names: list[str], references: np.ndarray, probabilities: np.ndarray | None
) -> dict[str, dict[str, Any]]:
    """One-vs-rest accuracy, precision, sensitivity, specificity, F1, AUC and support of every class."""
    total = int(matrix.sum())
    per_class: dict[str, dict[str, Any]] = {}
    for index, name in enumerate(names):
        true_positive = int(matrix[index, index])
        false_negative = int(matrix[index].sum()) - true_positive
        false_positive = int(matrix[:, index].sum()) - true_positive
        true_negative = total - true_positive - false_negative - false_positive
        per_class[name] = {
            "accuracy": _ratio(true_positive + true_negative, total),
            "precision": _ratio(true_positive, true_positive + false_positive),
            "sensitivity": _ratio(true_positive, true_positive + false_negative),
            "specificity": _ratio(true_negative, true_negative + false_positive),
            "f1": _ratio(2 * true_positive, 2 * true_positive + false_positive + false_negative),
            "auc": binary_auc(references == index, probabilities[:, index]) if probabilities is not None else None,
            "support": true_positive + false_negative,
        }
    return per_class


def _calibration(probabilities: np.ndarray | None, references: np.ndarray, ece_bins: int) -> dict[str, Any]:
    """ECE, NLL and the reliability bins (all None for hard predictions)."""
    if probabilities is None:
        return {"ece": None, "nll": None, "calibration_bins": None}
    picked = probabilities[np.arange(len(references)), references]
    return {
        "ece": expected_calibration_error(probabilities, references, ece_bins),
        "nll": float(-np.mean(np.log(np.clip(picked, 1e-12, None)))),
        "calibration_bins": calibration_bins(probabilities, references, ece_bins),
    }


def compute_classification_metrics(
    predictions: Any,
    references: Any,
    label_names: list[str] | None = None,
    num_classes: int | None = None,
    input_type: str = "auto",
    ece_bins: int = 15,
) -> dict[str, Any]:
    """The whole metric set from scores (n, c) or hard predictions (n,) and true indices (n,)."""
    references = np.asarray(references, dtype=np.int64).reshape(-1)
    predictions = np.asarray(predictions)
    if len(references) == 0:
        raise ValueError("no samples to evaluate (empty references)")
    if predictions.shape[0] != len(references):
        raise ValueError(f"{predictions.shape[0]} predictions for {len(references)} references")
    names = _class_names(predictions, references, label_names, num_classes)
    probabilities, predicted = _predicted_classes(predictions, len(names), input_type)
    matrix = confusion_matrix(references, predicted, len(names))
    per_class = _per_class(matrix, names, references, probabilities)
    result: dict[str, Any] = {"accuracy": float(np.trace(matrix) / matrix.sum())}
    for key in MACRO_KEYS:
        result[f"macro_{key}"] = _mean_defined([per_class[name][key] for name in names])
    result.update(_calibration(probabilities, references, ece_bins))
    result["per_class"], result["confusion_matrix"] = per_class, matrix.tolist()
    result["label_names"], result["num_samples"] = names, len(references)
    return result


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CxrMetrics(evaluate.Metric):
    """`evaluate` wrapper around `compute_classification_metrics`."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {
                        "predictions": datasets.Sequence(datasets.Value("float64")),
                        "references": datasets.Value("int64"),
                    }
                ),
                datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
            ],
            reference_urls=["https://doi.org/10.1016/j.imu.2020.100412", "https://arxiv.org/abs/1706.04599"],
        )

    def _compute(self, predictions: Any, references: Any, **options: Any) -> dict[str, Any]:
        """`options`: label_names, num_classes, input_type, ece_bins (see `compute_classification_metrics`)."""
        # evaluate hands over python lists (its numpy format does not take sequence features)
        return compute_classification_metrics(predictions, references, **options)
