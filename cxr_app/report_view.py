"""The "Model report" tab: the served checkpoint's own test-split report (`report/metrics.json` and its figures,
written by train/run.py next to the weights) turned into what a user needs to judge a prediction.

The report travels with the model folder (and so with the Space and the Hub repo): a local checkpoint folder is
read directly; for a Hub id only `report/*` is fetched (from the local cache when offline). Nothing is looked up
elsewhere: a checkpoint without a report gets a tab that says so. The app never imports the training code; the
report is plain JSON, read and rendered here.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxr_common.report import PREDICTIONS_FILE, markdown_table, number, percent

logger = logging.getLogger(__name__)

REPORT_SUBDIR = "report"
METRICS_FILE = "metrics.json"
FIGURES = {  # key in metrics.json "plots" -> caption
    "confusion_matrix": "Confusion matrix (test split)",
    "roc_curves": "ROC curves, one class against the rest (test split)",
    "reliability_diagram": "Reliability diagram before and after temperature scaling (test split)",
}
MAX_METRICS_BYTES = 2 * 2**20  # a report's metrics.json is ~20 kB; anything far larger is not one
PER_CLASS_COLUMNS = (("sensitivity", "Sensitivity"), ("specificity", "Specificity"), ("f1", "F1"), ("auc", "AUC"))
AUDIT_CONDITIONS = {"original": "as is", "lungs_masked": "lung fields masked", "lungs_only": "only lung fields"}

TRUST_PARAGRAPH = (
    "**What these numbers mean, and what they do not.** They are this model's results on its own held-out test "
    "split: {n} images of patients it never saw in training or calibration, from {sources} public collections. "
    "The intervals are 95% bootstrap intervals over {unit}s: how much each number could move with another test "
    "set drawn the same way. They do **not** say how the model does on your films. In these public collections "
    "each class comes mostly from different sources (hospitals, scanners, countries, patient ages), so part of "
    "what the model learned can be the source rather than the disease: the per-source table and the shortcut "
    "audit below show how much. Sensitivity and specificity carry over to another setting only if its films look "
    "like these; predictive values also depend on how common each class is there (the prevalence slider on the "
    "first tab). This is a research model, **not a diagnostic**: never use it for clinical decisions."
)


@dataclass(frozen=True)
class ModelReport:
    folder: Path
    data: dict[str, Any]

    @property
    def label_names(self) -> list[str]:
        return list(self.data["label_names"])

    def figures(self) -> list[tuple[Path, str]]:
        """(PNG path, caption) of the figures this report has, in display order."""
        plots = self.data.get("plots") or {}
        found = []
        for key, caption in FIGURES.items():
            name = plots.get(key)
            if isinstance(name, str) and Path(name).name == name and (self.folder / name).is_file():
                found.append((self.folder / name, caption))
        return found

    def patients(self) -> int | None:
        """Distinct patients in the test predictions (report/predictions.csv), when it has patient ids."""
        path = self.folder / PREDICTIONS_FILE
        try:
            with path.open(newline="", encoding="utf-8") as handle:
                ids = {row["patient_id"] for row in csv.DictReader(handle) if row.get("patient_id")}
        except (OSError, KeyError, csv.Error, UnicodeDecodeError):
            return None
        return len(ids) or None


def report_folder(source: str, revision: str | None = None) -> Path | None:
    """`<source>/report` for a local checkpoint folder; for a Hub id, its `report/` files from the Hub (or the local
    cache when offline). None when there is none."""
    path = Path(source).expanduser()
    if path.is_dir():
        folder = path / REPORT_SUBDIR
        return folder if (folder / METRICS_FILE).is_file() else None
    try:
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(source, revision=revision, allow_patterns=[f"{REPORT_SUBDIR}/*"]))
    except Exception as error:  # noqa: BLE001 - offline and not cached, no such repo: the tab says there is no report
        logger.info("no report for %s: %s", source, str(error).splitlines()[0] if str(error) else error)
        return None
    folder = local / REPORT_SUBDIR
    return folder if (folder / METRICS_FILE).is_file() else None


def load_report(folder: Path | None) -> ModelReport | None:
    """The report in `folder`, or None (logged) when it is missing, too large or not a report."""
    if folder is None:
        return None
    path = folder / METRICS_FILE
    try:
        if path.stat().st_size > MAX_METRICS_BYTES:
            raise ValueError(f"{path.stat().st_size} bytes is too large for a report")
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("metrics", {}).get("per_class"), dict):
            raise ValueError("no per-class metrics")
        data.setdefault("label_names", list(data["metrics"]["per_class"]))
    except (OSError, ValueError, AttributeError) as error:
        logger.warning("ignoring the report in %s: %s", folder, error)
        return None
    return ModelReport(folder, data)


def _percent(value: Any, interval: dict[str, Any] | None = None) -> str:
    return percent(value, interval, unit="%")


def summary_markdown(report: ModelReport) -> str:
    """The paragraph on what the numbers mean, the headline numbers and the per-class table with intervals."""
    data, metrics = report.data, report.data["metrics"]
    bootstrap = data.get("bootstrap") or {}
    intervals = bootstrap.get("intervals") or {}
    per_class_intervals = bootstrap.get("per_class") or {}
    paragraph = TRUST_PARAGRAPH.format(
        n=data.get("num_samples", metrics.get("num_samples", "?")),
        sources=len(data.get("per_source") or {}) or "several",
        unit=bootstrap.get("unit") or "image",
    )
    patients = report.patients()
    counted = f"{data.get('num_samples', '?')} test images" + (f" of {patients} patients" if patients else "")
    headline = (
        f"**Test split ({counted}):** accuracy {_percent(metrics.get('accuracy'), intervals.get('accuracy'))}, "
        f"macro F1 {_percent(metrics.get('macro_f1'), intervals.get('macro_f1'))}, "
        f"macro AUC {_percent(metrics.get('macro_auc'), intervals.get('macro_auc'))}."
    )
    rows = []
    for name, values in metrics["per_class"].items():
        bounds = per_class_intervals.get(name) or {}
        cells = [_percent(values.get(key), bounds.get(key)) for key, _ in PER_CLASS_COLUMNS]
        rows.append([name, *cells, str(values.get("support", "?"))])
    table = markdown_table(["Class", *(title for _, title in PER_CLASS_COLUMNS), "Images"], rows)
    if per_class_intervals:
        note = "Each class against the other two; 95% bootstrap interval in brackets."
    else:
        note = ("Each class against the other two. This report has no per-class intervals (an older report: "
                "`python scripts/update_card.py --model_dir MODEL --recompute_bootstrap` adds them).")
    return "\n\n".join(["## How far to trust this model", paragraph, headline, "### Per class", table, note])


def confusion_markdown(report: ModelReport) -> str:
    matrix = report.data["metrics"].get("confusion_matrix")
    names = report.label_names
    if not (isinstance(matrix, list) and len(matrix) == len(names)):
        return ""
    rows = [[f"**{name}**", *(str(count) for count in row)] for name, row in zip(names, matrix, strict=True)]
    return "### Confusion matrix\n\nRows: true class; columns: predicted.\n\n" + markdown_table(["", *names], rows)


def calibration_markdown(report: ModelReport) -> str:
    calibration = report.data.get("calibration") or {}
    temperature = number(calibration.get("temperature"))
    if temperature is None:
        return "### Calibration\n\nThis report has no calibration section."
    before, after = number(calibration.get("ece_before")), number(calibration.get("ece_after"))
    text = (
        f"### Calibration\n\nThe probabilities shown are divided by a temperature T = {temperature:.2f} fitted on "
        f"the {calibration.get('fitted_on', 'validation')} split, so that a 70% answer is right about 70% of the "
        "time."
    )
    if before is not None and after is not None:
        text += f" Expected calibration error on the test split: {before:.3f} before, {after:.3f} after."
    return text


def sources_markdown(report: ModelReport) -> str:
    per_source = report.data.get("per_source") or {}
    if not per_source:
        return "### Per source\n\nThis report has no per-source metrics."
    names = report.label_names
    rows = []
    for source, values in per_source.items():
        counts, sensitivity = values.get("class_counts") or {}, values.get("sensitivity") or {}
        cells = [
            f"{_percent(sensitivity[name])} (n={counts.get(name, '?')})" if name in sensitivity else "–"
            for name in names
        ]
        rows.append([source, str(values.get("num_samples", "?")), _percent(values.get("accuracy")), *cells])
    return (
        "### Per source\n\nWithin each public collection of the test split. Where a collection holds mostly one "
        "class, a model can score well by recognising the collection.\n\n"
        + markdown_table(["Source", "Images", "Accuracy", *(f"Sensitivity {name}" for name in names)], rows)
    )


def audit_markdown(report: ModelReport) -> str:
    """The audit's own Markdown section as the training side rendered it (`markdown`), or an older audit's table;
    then the model this one replaced, side by side, when the report holds that comparison."""
    audit = report.data.get("shortcut_audit")
    previous = report.data.get("previous_model")
    comparison = []
    if isinstance(previous, dict) and isinstance(previous.get("markdown"), str):
        comparison = [f"Side by side with the model it replaced ({previous.get('name', 'previous model')}), on the "
                      f"same test images:\n\n{previous['markdown']}"]  # fmt: skip
    if not isinstance(audit, dict) or not isinstance(audit.get("conditions"), dict):
        missing = ("### Shortcut audit\n\nNot run for this checkpoint (`python scripts/shortcut_audit.py --help`): it "
                   "would show how the model does with the lung fields hidden.")  # fmt: skip
        return "\n\n".join([missing, *comparison])
    intro = ["### Shortcut audit", "The same test images with the lung fields hidden, and with only them visible. "
             "A model that reads the lungs should fall to chance without them.", *comparison]  # fmt: skip
    if isinstance(audit.get("markdown"), str):
        return "\n\n".join([*intro, audit["markdown"]])
    names = report.label_names
    rows = []
    for key, values in audit["conditions"].items():
        sensitivity = values.get("sensitivity") or {}
        rows.append([AUDIT_CONDITIONS.get(key, key), _percent(values.get("accuracy")),
                     _percent(values.get("macro_f1")), *(_percent(sensitivity.get(name)) for name in names)])
    table = markdown_table(["Test images", "Accuracy", "Macro F1", *(f"Sensitivity {name}" for name in names)], rows)
    parts = [*intro, table]
    parts += [str(audit[key]) for key in ("interpretation", "mask") if isinstance(audit.get(key), str)]
    return "\n\n".join(parts)


def comparison_view(report: ModelReport) -> tuple[str, Path | None] | None:
    """The paper's experiment (this network against the competitive CNN, scripts/compare_models.py) as the page shows
    it: the Markdown without its figure line, and the figure (the paper's Fig. 6 layout) when it is there."""
    comparison = report.data.get("comparison")
    if not isinstance(comparison, dict) or not isinstance(comparison.get("markdown"), str):
        return None
    figure = comparison.get("figure")
    lines = [line for line in comparison["markdown"].splitlines() if not (figure and line.endswith(f"]({figure})"))]
    text = "### CNN-LSTM against the paper's competitive CNN\n\nBoth trained on the same corpus with the same recipe "
    text += "and scored once on the same test images.\n\n" + "\n".join(lines).strip()
    path = report.folder / figure if isinstance(figure, str) and Path(figure).name == figure else None
    return text, path if path is not None and path.is_file() else None


def no_report_markdown(source: str) -> str:
    return (
        "## No model report\n\nThe served checkpoint "
        f"(`{source}`) has no `report/metrics.json`, so this page cannot say how well it did on held-out data. "
        "Checkpoints written by `python train/run.py` carry one; `python scripts/evaluate_checkpoint.py --help` "
        "evaluates any checkpoint on a corpus. Until then, treat its outputs as untested."
    )


__all__ = ["ModelReport", "audit_markdown", "calibration_markdown", "confusion_markdown", "load_report",
           "no_report_markdown", "report_folder", "sources_markdown", "summary_markdown"]
