"""The evaluation report: metrics JSON, paper-style tables, bootstrap intervals, per-source metrics, PNG figures.

Written at the end of training (on the test split) and by `scripts/evaluate_checkpoint.py`. Numbers come from the
project's metric module (`train/metrics/cxr_metrics`), the same code `compute_metrics` runs during training. Bootstrap
intervals resample PATIENTS when patient ids are known (images of one patient are not independent), else images.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxr_common.atomic import atomic_write_text
from cxr_common.report import PLOT_FILES, PREDICTIONS_FILE, percent
from train.metrics.cxr_metrics.cxr_metrics import compute_classification_metrics, softmax
from train.training.calibration import calibration_summary
from train.training.plots import (
    plot_confusion_matrix,
    plot_per_class,
    plot_reliability,
    plot_roc,
    plot_training_curves,
)

INTERVAL_KEYS = (
    "accuracy",
    "macro_precision",
    "macro_sensitivity",
    "macro_specificity",
    "macro_f1",
    "macro_auc",
    "ece",
)
PER_CLASS_INTERVAL_KEYS = ("precision", "sensitivity", "specificity", "f1", "auc")
TABLE_KEYS = ("accuracy", "precision", "sensitivity", "specificity", "f1", "auc")

def _defined(value: float | None) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def percentile_interval(found: list[float]) -> dict[str, Any]:
    return {"low": float(np.percentile(found, 2.5)), "high": float(np.percentile(found, 97.5)), "n": len(found)}


def resamples(count: int, groups: Sequence[str] | None, samples: int, seed: int) -> Iterator[np.ndarray]:
    """`samples` bootstrap resamples of `count` items as index arrays: whole groups (patients) drawn with
    replacement when `groups` is given, else single items."""
    rng = np.random.default_rng(seed)
    if groups is not None:
        _, group_index = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
        members = [np.flatnonzero(group_index == group) for group in range(group_index.max() + 1)]
    else:
        members = [np.array([index]) for index in range(count)]
    for _ in range(samples):
        yield np.concatenate([members[group] for group in rng.integers(0, len(members), len(members))])


def bootstrap_intervals(
    probabilities: np.ndarray,
    labels: np.ndarray,
    label_names: Sequence[str],
    groups: Sequence[str] | None = None,
    samples: int = 1000,
    seed: int = 0,
    ece_bins: int = 15,
) -> dict[str, Any]:
    """Percentile 95% intervals over `samples` resamples (of groups when given): of the macro metrics (`intervals`)
    and, from the same resamples, of each class's metrics (`per_class`). Undefined values (the AUC of a resample
    without a class) are left out; `n` counts the resamples an interval was taken over."""
    names = list(label_names)
    if samples <= 0:
        return {"samples": 0, "unit": None, "seed": seed, "intervals": {}, "per_class": {}}
    values: dict[str, list[float]] = {key: [] for key in INTERVAL_KEYS}
    class_values = {name: {key: [] for key in PER_CLASS_INTERVAL_KEYS} for name in names}
    for indices in resamples(len(labels), groups, samples, seed):
        result = compute_classification_metrics(
            probabilities[indices], labels[indices], names, input_type="probabilities", ece_bins=ece_bins
        )
        for key in INTERVAL_KEYS:
            if _defined(result[key]):
                values[key].append(result[key])
        for name, collected in class_values.items():
            for key, found in collected.items():
                if _defined(result["per_class"][name][key]):
                    found.append(result["per_class"][name][key])
    intervals = {key: percentile_interval(found) for key, found in values.items() if found}
    per_class = {
        name: {key: percentile_interval(found) for key, found in collected.items() if found}
        for name, collected in class_values.items()
        if any(collected.values())
    }
    unit = "patient" if groups is not None else "image"
    return {"samples": samples, "unit": unit, "seed": seed, "intervals": intervals, "per_class": per_class}


def per_source_metrics(
    probabilities: np.ndarray, labels: np.ndarray, sources: Sequence[str], label_names: Sequence[str]
) -> dict[str, Any]:
    """Accuracy and per-class sensitivity within each data source: a model can learn the source, not the disease."""
    sources = np.asarray(sources, dtype=object).astype(str)
    predicted = probabilities.argmax(axis=1)
    result = {}
    for source in sorted(set(sources)):
        mask = sources == source
        truth, guess = labels[mask], predicted[mask]
        sensitivity = {
            name: float((guess[truth == index] == index).mean())
            for index, name in enumerate(label_names)
            if (truth == index).any()
        }
        counts = {name: int((truth == index).sum()) for index, name in enumerate(label_names)}
        result[source] = {
            "num_samples": int(mask.sum()),
            "accuracy": float((truth == guess).mean()),
            "class_counts": counts,
            "sensitivity": sensitivity,
        }
    return result


def write_report(
    report_dir: str | Path,
    logits: np.ndarray,
    labels: np.ndarray,
    label_names: Sequence[str],
    *,
    temperature: float = 1.0,
    calibration_fitted_on: str = "validation",
    columns: dict[str, Sequence[Any]] | None = None,
    histories: dict[str, list[dict[str, Any]]] | None = None,
    bootstrap_samples: int = 1000,
    ece_bins: int = 15,
    seed: int = 0,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything for one evaluated split from its UNSCALED logits; returns what metrics.json holds."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    names = list(label_names)
    columns = columns or {}
    probabilities = softmax(logits / temperature)
    metrics = compute_classification_metrics(
        probabilities, labels, names, input_type="probabilities", ece_bins=ece_bins
    )
    calibration = calibration_summary(logits, labels, temperature, ece_bins)
    calibration["fitted_on"] = calibration_fitted_on
    report: dict[str, Any] = {
        "num_samples": int(len(labels)),
        "label_names": names,
        "metrics": metrics,
        "calibration": calibration,
        "bootstrap": bootstrap_intervals(
            probabilities, labels, names, columns.get("patient_id"), bootstrap_samples, seed, ece_bins
        ),
        "per_source": per_source_metrics(probabilities, labels, columns["source"], names)
        if "source" in columns
        else {},
    }
    report.update(extra or {})
    plot_confusion_matrix(metrics["confusion_matrix"], names, report_dir / PLOT_FILES["confusion_matrix"])
    plot_per_class(metrics["per_class"], report_dir / PLOT_FILES["per_class_metrics"])
    plot_roc(probabilities, labels, metrics["per_class"], report_dir / PLOT_FILES["roc_curves"])
    plot_reliability(calibration, report_dir / PLOT_FILES["reliability_diagram"])
    plots = ["confusion_matrix", "per_class_metrics", "roc_curves", "reliability_diagram"]
    if histories:
        plot_training_curves(histories, "accuracy", report_dir / PLOT_FILES["accuracy_curves"])
        plot_training_curves(histories, "loss", report_dir / PLOT_FILES["loss_curves"])
        plots += ["accuracy_curves", "loss_curves"]
    report["plots"] = {name: PLOT_FILES[name] for name in plots}
    atomic_write_text(report_dir / "metrics.json", json.dumps(report, indent=2))
    atomic_write_text(report_dir / "report.md", render_report_markdown(report))
    atomic_write_text(report_dir / PREDICTIONS_FILE, predictions_csv(probabilities, labels, names, columns))
    if histories:
        atomic_write_text(report_dir / "training_history.json", json.dumps(histories, indent=1))
    return report


def predictions_csv(
    probabilities: np.ndarray, labels: np.ndarray, label_names: Sequence[str], columns: dict[str, Sequence[Any]]
) -> str:
    """One row per evaluated image: identifiers known to the split, true and predicted class, the calibrated
    probabilities (paired comparisons between models, per-image audits, and the shipped-model check in the tests)."""
    names = list(label_names)
    keys = [key for key in ("sha256", "patient_id", "source") if key in columns]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["index", *keys, "label", "predicted", *(f"p_{name}" for name in names)])
    for index, (row, label) in enumerate(zip(probabilities, labels, strict=True)):
        identifiers = [columns[key][index] for key in keys]
        writer.writerow([index, *identifiers, names[label], names[int(np.argmax(row))], *(f"{p:.6f}" for p in row)])
    return buffer.getvalue()


def read_predictions(path: Path, label_names: list[str]) -> tuple[np.ndarray, np.ndarray, list[str] | None, list[str]]:
    """(probabilities, label indices, patient ids or None, image keys) from a report's predictions.csv."""
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    columns = [f"p_{name}" for name in label_names]
    if not rows or any(column not in rows[0] for column in columns):
        raise ValueError(f"{path} has no rows or lacks the columns {columns}")
    probabilities = np.array([[float(row[column]) for column in columns] for row in rows])
    labels = np.array([label_names.index(row["label"]) for row in rows], dtype=np.int64)
    groups = [row["patient_id"] for row in rows] if "patient_id" in rows[0] else None
    keys = [row.get("sha256") or row["index"] for row in rows]
    return probabilities, labels, groups, keys


def per_class_table(metrics: dict[str, Any]) -> str:
    """The paper's Tables 3/4 layout (in %), plus precision, AUC and support, and a macro-average row."""
    lines = [
        "| Class | Accuracy | Precision | Sensitivity | Specificity | F1 | AUC | Support |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, values in metrics["per_class"].items():
        cells = " | ".join(percent(values[key]) for key in TABLE_KEYS)
        lines.append(f"| {name} | {cells} | {values['support']} |")
    macro = " | ".join(
        percent(metrics[f"macro_{key}"] if key != "accuracy" else metrics["accuracy"]) for key in TABLE_KEYS
    )
    lines.append(f"| **Overall** (accuracy; macro averages) | {macro} | {metrics['num_samples']} |")
    return "\n".join(lines)


def intervals_table(report: dict[str, Any]) -> str:
    bootstrap = report["bootstrap"]
    if not bootstrap["intervals"]:
        return "Bootstrap intervals were not computed (`--bootstrap_samples 0`)."
    lines = [
        f"95% percentile intervals from {bootstrap['samples']} bootstrap resamples of {bootstrap['unit']}s.",
        "",
        "| Metric | Estimate | 95% interval |",
        "|---|---|---|",
    ]
    for key, interval in bootstrap["intervals"].items():
        estimate = report["metrics"][key]
        if key == "ece":
            lines.append(f"| ECE | {estimate:.3f} | {interval['low']:.3f} - {interval['high']:.3f} |")
        else:
            lines.append(f"| {key} | {percent(estimate)} | {percent(interval['low'])} - {percent(interval['high'])} |")
    per_class = per_class_intervals_table(report)
    return "\n".join(lines) + (f"\n\n{per_class}" if per_class else "")


def per_class_intervals_table(report: dict[str, Any]) -> str:
    """Each class's estimate (95% interval) in %, from the macro intervals' resamples; "" for reports written
    before per-class intervals were collected."""
    per_class = report["bootstrap"].get("per_class")
    if not per_class:
        return ""
    keys = {"sensitivity": "Sensitivity", "specificity": "Specificity", "f1": "F1", "auc": "AUC"}
    lines = [
        "Per class (%, estimate (95% interval), same resamples):",
        "",
        "| Class | " + " | ".join(keys.values()) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for name, estimates in report["metrics"]["per_class"].items():
        intervals = per_class.get(name, {})
        cells = [
            f"{percent(estimates.get(key))} ({percent(intervals[key]['low'])} - {percent(intervals[key]['high'])})"
            if key in intervals
            else f"{percent(estimates.get(key))} (n/a)"
            for key in keys
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def calibration_table(report: dict[str, Any]) -> str:
    calibration = report["calibration"]
    return "\n".join(
        [
            f"Temperature T = {calibration['temperature']:.3f} (fitted on the {calibration['fitted_on']} logits; "
            "stored as `calibration_temperature` in config.json and applied by the model).",
            "",
            "| | ECE | NLL |",
            "|---|---|---|",
            f"| before (T = 1) | {calibration['ece_before']:.3f} | {calibration['nll_before']:.3f} |",
            f"| after (T = {calibration['temperature']:.2f}) | {calibration['ece_after']:.3f} | "
            f"{calibration['nll_after']:.3f} |",
        ]
    )


def per_source_table(report: dict[str, Any]) -> str:
    if not report["per_source"]:
        return "The evaluated data carried no `source` column."
    names = report["label_names"]
    header = " | ".join(f"Sensitivity {name}" for name in names)
    lines = [f"| Source | Images | Accuracy | {header} |", "|---|---|---|" + "---|" * len(names)]
    for source, values in report["per_source"].items():
        cells = " | ".join(
            f"{percent(values['sensitivity'][name])} (n={values['class_counts'][name]})"
            if name in values["sensitivity"]
            else "-"
            for name in names
        )
        lines.append(f"| {source} | {values['num_samples']} | {percent(values['accuracy'])} | {cells} |")
    return "\n".join(lines)


def cv_table(cv: dict[str, Any] | None) -> str:
    if not cv:
        return "Cross-validation was not run for this checkpoint."
    folds = cv["folds"]
    lines = [
        f"{len(folds)}-fold cross-validation, patient-grouped (no patient in two folds). "
        + (
            f"Fold f is scored by a model trained on the other {len(folds) - 2} folds, whose checkpoint, early "
            "stopping and temperature were chosen on the inner validation fold (f + 1) mod "
            f"{len(folds)}; fold f's images were used for neither training nor selection."
            if cv.get("protocol")
            else "Each fold's model was evaluated on the fold its checkpoint was also chosen on (older protocol: "
            "optimistic)."
        )
        + " Mean +- standard deviation over folds (in %; ECE as a fraction, after the fold's temperature).",
        "",
        "| Metric | " + " | ".join(f"fold {fold['fold']}" for fold in folds) + " | mean +- std |",
        "|---|" + "---|" * (len(folds) + 1),
    ]
    for key, summary in cv["summary"].items():
        scale = (lambda v: f"{v:.3f}") if key == "ece" else percent
        cells = " | ".join(scale(fold["metrics"].get(key)) for fold in folds)
        lines.append(f"| {key} | {cells} | {scale(summary['mean'])} +- {scale(summary['std'])} |")
    if cv.get("note"):
        lines += ["", str(cv["note"])]
    return "\n".join(lines)


def shortcut_audit_section(audit: dict[str, Any] | None) -> str:
    """The shortcut audit's own Markdown (train/training/shortcut_audit.py), an older audit's table, or a line saying
    it was not run (report and card)."""
    if not audit:
        return (
            "Not run for this checkpoint. `python scripts/shortcut_audit.py --model FOLDER --data_dir CORPUS` "
            "evaluates the test images as they are, with the lung fields hidden and with only the lung fields "
            "visible; `python scripts/update_card.py --model_dir FOLDER --shortcut_audit shortcut_audit.json` "
            "adds its result here."
        )
    if isinstance(audit.get("markdown"), str):
        return audit["markdown"].rstrip("\n")
    names = audit["label_names"]
    lines = [
        f"{audit['num_samples']} `{audit['split']}` images. {audit.get('mask', '')}",
        "",
        "| Condition | Accuracy | Macro F1 | " + " | ".join(f"Sensitivity {name}" for name in names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for condition, values in audit["conditions"].items():
        cells = " | ".join(percent(values["sensitivity"].get(name)) for name in names)
        lines.append(f"| {condition} | {percent(values['accuracy'])} | {percent(values['macro_f1'])} | {cells} |")
    return "\n".join([*lines, "", audit["interpretation"]])


def previous_model_section(previous: dict[str, Any] | None) -> str:
    """The model this one replaced, side by side on the same images (`update_card.py --previous_model`), or ""."""
    if not isinstance(previous, dict) or not isinstance(previous.get("markdown"), str):
        return ""
    return f"#### Against the model it replaced ({previous.get('name', 'previous model')})\n\n" + previous[
        "markdown"
    ].rstrip("\n")


def comparison_section(comparison: dict[str, Any] | None, from_report_folder: bool = False) -> str:
    """The paper's experiment, this network against its companion (scripts/compare_models.py), or "". Links and the
    figure are stored relative to the model folder (the card's place); report.md sits one level down in report/."""
    if not isinstance(comparison, dict) or not isinstance(comparison.get("markdown"), str):
        return ""
    text = comparison["markdown"].rstrip("\n")
    figure = comparison.get("figure")
    link = comparison.get("companion_link")
    if from_report_folder and link:
        link = f"../{link}"
    if not from_report_folder and figure:
        text = text.replace(f"]({figure})", f"](report/{figure})")
    if link:
        label = comparison.get("companion_label", comparison.get("companion", "the other network"))
        text = (f"The other network: [{label}]({link}) (`{comparison.get('companion', link)}`), trained on the same "
                f"corpus with the same recipe.\n\n{text}")  # fmt: skip
    return text


def render_report_markdown(report: dict[str, Any]) -> str:
    figures = "\n".join(f"![{name}]({file})" for name, file in report["plots"].items())
    return "\n\n".join(
        [
            f"# Evaluation report ({report['num_samples']} images)",
            "## Per-class metrics (%)",
            per_class_table(report["metrics"]),
            "## Bootstrap intervals",
            intervals_table(report),
            "## Calibration",
            calibration_table(report),
            "## Per-source metrics",
            per_source_table(report),
            "## Shortcut audit",
            "\n\n".join(
                filter(
                    None,
                    [
                        shortcut_audit_section(report.get("shortcut_audit")),
                        previous_model_section(report.get("previous_model")),
                    ],
                )
            ),
            "## Cross-validation",
            cv_table(report.get("cross_validation")),
            *(["## CNN-LSTM against the competitive CNN", comparison_section(report.get("comparison"), True)]
              if comparison_section(report.get("comparison")) else []),  # fmt: skip
            "## Figures",
            figures,
        ]
    )
