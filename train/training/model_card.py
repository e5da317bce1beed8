"""Render `model_card.md` (a template with `{{ name }}` fields) into the final folder's README.md.

Every field must be filled: a missing value or a field left in the output is an error, so a card with a
placeholder can never be written (or pushed).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from train.training.report import (
    atomic_write_text,
    calibration_table,
    cv_table,
    intervals_table,
    per_class_table,
    per_source_table,
    percent,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TEMPLATE = REPO_ROOT / "model_card.md"
FIELD = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
PLOT_TITLES = {
    "confusion_matrix": "Confusion matrix (paper Fig. 6)",
    "accuracy_curves": "Training and validation accuracy per epoch (paper Fig. 7)",
    "loss_curves": "Training and validation loss per epoch (paper Fig. 8)",
    "per_class_metrics": "Per-class metrics (paper Figs. 9 and 10)",
    "roc_curves": "One-vs-rest ROC curves (paper Fig. 11)",
    "reliability_diagram": "Reliability diagram before and after temperature scaling",
}


class CardError(ValueError):
    """The template and the values do not fit together."""


def render_model_card(template: str, context: dict[str, Any]) -> str:
    """Fill every `{{ name }}`; fail on unknown names and on any field left over."""
    missing = sorted({name for name in FIELD.findall(template) if name not in context})
    if missing:
        raise CardError(f"model card fields without a value: {missing}")
    rendered = FIELD.sub(lambda match: str(context[match.group(1)]), template)
    if FIELD.search(rendered) or "{{" in rendered or "}}" in rendered:
        raise CardError("model card still holds a placeholder after rendering")
    return rendered


def _yaml_number(value: float | None) -> str:
    return "null" if value is None else f"{value:.4f}"


def _yaml_scalar(text: str) -> str:
    """A YAML-safe single-line scalar (JSON strings are valid YAML)."""
    return json.dumps(str(text))


def card_context(report: dict[str, Any], info: dict[str, Any], report_folder: str = "report") -> dict[str, str]:
    """Template values from a report (`train.training.report.write_report`) and facts about the run (`info`)."""
    metrics = report["metrics"]
    plots = "\n\n".join(
        f"**{PLOT_TITLES.get(name, name)}**\n\n![{name}]({report_folder}/{file})"
        for name, file in report["plots"].items()
    )
    datasets = info.get("datasets") or []
    context = {
        "model_name": _yaml_scalar(info["model_name"])[1:-1],
        "model_id": info["model_id"],
        "network_name": info["network_name"],
        "architecture_summary": info["architecture_summary"],
        "num_parameters": f"{info['num_parameters']:,}",
        "image_size": info["image_size"],
        "num_channels": info["num_channels"],
        "label_list": ", ".join(f"`{name}`" for name in report["label_names"]),
        "datasets_yaml": json.dumps([str(name) for name in datasets]),  # a YAML flow list
        "dataset_label": _yaml_scalar(info["dataset_label"]),
        "dataset_type": _yaml_scalar(info["dataset_type"]),
        "test_split": _yaml_scalar(info["test_split"]),
        "accuracy_value": _yaml_number(metrics["accuracy"]),
        "macro_f1_value": _yaml_number(metrics["macro_f1"]),
        "macro_sensitivity_value": _yaml_number(metrics["macro_sensitivity"]),
        "macro_auc_value": _yaml_number(metrics["macro_auc"]),
        "accuracy_percent": percent(metrics["accuracy"]),
        "macro_auc_percent": percent(metrics["macro_auc"]),
        "macro_specificity_percent": percent(metrics["macro_specificity"]),
        "macro_sensitivity_percent": percent(metrics["macro_sensitivity"]),
        "macro_f1_percent": percent(metrics["macro_f1"]),
        "data_summary": info["data_summary"],
        "training_summary": info["training_summary"],
        "test_images": report["num_samples"],
        "per_class_table": per_class_table(metrics),
        "intervals_table": intervals_table(report),
        "cv_table": cv_table(report.get("cross_validation")),
        "calibration_table": calibration_table(report),
        "per_source_table": per_source_table(report),
        "plots_markdown": plots,
        "calibration_fitted_on": report["calibration"]["fitted_on"],
        "shortcut_audit_section": shortcut_audit_section(report.get("shortcut_audit")),
        "leaky_protocol_row": leaky_protocol_row(report.get("leaky_protocol")),
    }
    return {key: str(value) for key, value in context.items()}


def shortcut_audit_section(audit: dict[str, Any] | None) -> str:
    """The `scripts/shortcut_audit.py` result as a table, or a line saying it was not run."""
    if not audit:
        return (
            "Not run for this checkpoint. `python scripts/shortcut_audit.py --model FOLDER --data_dir CORPUS` "
            "evaluates the test images as they are, with the lung fields masked and with only the lung fields "
            "visible."
        )
    names = audit["label_names"]
    lines = [
        f"{audit['num_samples']} `{audit['split']}` images. {audit['mask']}",
        "",
        "| Condition | Accuracy | Macro F1 | " + " | ".join(f"Sensitivity {name}" for name in names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for condition, values in audit["conditions"].items():
        cells = " | ".join(percent(values["sensitivity"][name]) for name in names)
        lines.append(f"| {condition} | {percent(values['accuracy'])} | {percent(values['macro_f1'])} | {cells} |")
    return "\n".join([*lines, "", audit["interpretation"]])


def leaky_protocol_row(metrics: dict[str, Any] | None) -> str:
    """A comparison-table row: the same network trained and tested on the paper's leaky image-level split."""
    label = "Same network, the paper's leaky image-level split (`--protocol paper`)"
    if not metrics:
        return f"| {label} | not run | not run | not run | not run | not run |"
    keys = ("accuracy", "macro_auc", "macro_specificity", "macro_sensitivity", "macro_f1")
    return f"| {label} | " + " | ".join(percent(metrics.get(key)) for key in keys) + " |"


def write_model_card(
    destination: Path, report: dict[str, Any], info: dict[str, Any], template: str | Path | None = None
) -> Path:
    """Render and write the card atomically (temporary file in the same folder, then os.replace)."""
    text = Path(template or DEFAULT_TEMPLATE).read_text(encoding="utf-8")
    return atomic_write_text(destination, render_model_card(text, card_context(report, info)))
