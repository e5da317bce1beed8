"""The paper's central experiment: its CNN-LSTM against its "competitive CNN" (the same trunk with a dense head), on
the same test images, each scored once by its own training run (`report/predictions.csv`, calibrated).

- The paper's per-class tables (Tables 3-4) and confusion matrices in the layout of its Fig. 6, for both.
- The difference (CNN-LSTM minus CNN) in accuracy, macro-F1 and macro AUC with a paired bootstrap 95% interval
  (patients resampled, both models scored on the same resample), and McNemar's exact test on the paired
  correct/incorrect calls (scipy's binomial test on the discordant pairs).
- Both shortcut audits (report key `shortcut_audit`), training time from each run's report and test time measured
  side by side, beside the paper's Table 5.
- A verdict that says what the data support.

Used by scripts/compare_models.py; the result is stored in both checkpoints' reports (key `comparison`), shown by
their cards, report.md and the app's report tab.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxr_common.report import PREDICTIONS_FILE, percent
from train.metrics.cxr_metrics.cxr_metrics import compute_classification_metrics
from train.training.report import per_class_table, percentile_interval, read_predictions, resamples

DIFFERENCE_KEYS = ("accuracy", "macro_f1", "macro_auc")
# What the paper reports for its two networks (Islam, Islam & Asraf 2020; image-level split, 915 test images): the
# accuracy and AUC of the text, the misclassifications of Fig. 6, the times of Table 5 (CNN-LSTM, GTX 1050 Ti).
PAPER = {
    "test_images": 915,
    "CNN-LSTM": {"accuracy": 0.994, "macro_auc": 0.999, "errors": 8},
    "CNN": {"accuracy": 0.98, "macro_auc": 0.998, "errors": 14},
    "train_seconds": 18372,
    "test_seconds": 113,
    "hardware": "NVIDIA GTX 1050 Ti (the paper's Table 5)",
}


@dataclass
class Predictions:
    """One model's calibrated test predictions, as its training run wrote them."""

    name: str
    probabilities: np.ndarray
    labels: np.ndarray
    groups: list[str]
    keys: list[str]  # sha256 of each image: the two runs must have scored the same images in the same order
    report: dict[str, Any]


def load_predictions(model_dir: Path, name: str) -> Predictions:
    import json

    report_dir = Path(model_dir) / "report"
    report = json.loads((report_dir / "metrics.json").read_text())
    probabilities, labels, groups, keys = read_predictions(report_dir / PREDICTIONS_FILE, list(report["label_names"]))
    if groups is None:
        raise ValueError(f"{report_dir / PREDICTIONS_FILE} has no patient_id column: the bootstrap resamples patients")
    return Predictions(name, probabilities, labels, groups, keys, report)


def paired_bootstrap(
    first: np.ndarray,
    second: np.ndarray,
    labels: np.ndarray,
    names: list[str],
    groups: list[str],
    samples: int,
    seed: int,
) -> dict[str, dict[str, float]]:
    """Percentile 95% intervals of first - second for DIFFERENCE_KEYS, resampling patients (both models scored on
    the same resample); resamples where a difference is undefined (a class missing: no AUC) are left out."""
    found: dict[str, list[float]] = {key: [] for key in DIFFERENCE_KEYS}
    for indices in resamples(len(labels), groups, samples, seed):
        a = compute_classification_metrics(first[indices], labels[indices], names, input_type="probabilities")
        b = compute_classification_metrics(second[indices], labels[indices], names, input_type="probabilities")
        for key in DIFFERENCE_KEYS:
            if a[key] is not None and b[key] is not None and np.isfinite(a[key]) and np.isfinite(b[key]):
                found[key].append(a[key] - b[key])
    return {key: percentile_interval(values) for key, values in found.items() if values}


def mcnemar(first_correct: np.ndarray, second_correct: np.ndarray) -> dict[str, Any]:
    """McNemar's exact test: under H0 the discordant pairs split 50/50 (scipy.stats.binomtest, two-sided)."""
    from scipy.stats import binomtest

    only_first = int(np.sum(first_correct & ~second_correct))
    only_second = int(np.sum(~first_correct & second_correct))
    discordant = only_first + only_second
    p_value = float(binomtest(only_first, discordant, 0.5).pvalue) if discordant else 1.0
    table = [
        [int(np.sum(first_correct & second_correct)), only_first],
        [only_second, int(np.sum(~first_correct & ~second_correct))],
    ]
    return {
        "table": table,
        "only_first_correct": only_first,
        "only_second_correct": only_second,
        "discordant": discordant,
        "p_value": p_value,
        "test": "McNemar exact (binomial on discordant pairs)",
    }


def audit_summary(report: dict[str, Any]) -> dict[str, Any] | None:
    audit = report.get("shortcut_audit")
    if not isinstance(audit, dict) or "conditions" not in audit:
        return None
    conditions, gate = audit["conditions"], audit.get("gate", {})
    return {
        "accuracy_original": conditions["original"]["accuracy"],
        "accuracy_lungs_hidden": conditions["lungs_hidden"]["accuracy"],
        "covid_sensitivity_lungs_hidden": gate.get("sensitivity_hidden_COVID-19"),
        "accuracy_lungs_only": conditions["lungs_only"]["accuracy"],
        "class_shortcuts": [item.get("class") for item in audit.get("class_shortcuts", [])],
        "gate_passed": gate.get("passed"),
        "gradcam_share": (audit.get("attribution") or {}).get("gradcam_share"),
        "area_share": (audit.get("attribution") or {}).get("area_share"),
    }


def training_time(report: dict[str, Any]) -> dict[str, Any]:
    stats = (report.get("run") or {}).get("stats") or {}
    stages = [stats, stats.get("low_res_stage") or {}]
    images = sum(stage.get("train_samples_per_second", 0.0) * stage.get("train_runtime", 0.0) for stage in stages)
    runtime = sum(stage.get("train_runtime", 0.0) for stage in stages)
    return {
        "wall_seconds": stats.get("wall_seconds"),
        "train_runtime": runtime or None,
        "images_per_second": images / runtime if runtime else None,
    }


def compare(
    lstm: Predictions, cnn: Predictions, samples: int = 2000, seed: int = 42, test_seconds: dict | None = None
) -> dict[str, Any]:
    """Everything the comparison reports, as JSON-ready data (first = CNN-LSTM, second = CNN)."""
    names = list(lstm.report["label_names"])
    if list(cnn.report["label_names"]) != names:
        raise ValueError(f"label names differ: {names} against {cnn.report['label_names']}")
    if lstm.keys != cnn.keys or not np.array_equal(lstm.labels, cnn.labels):
        raise ValueError("the two reports did not score the same test images in the same order")
    labels = lstm.labels
    metrics = {
        model.name: compute_classification_metrics(model.probabilities, labels, names, input_type="probabilities")
        for model in (lstm, cnn)
    }
    correct = {model.name: model.probabilities.argmax(1) == labels for model in (lstm, cnn)}
    differences = {key: metrics[lstm.name][key] - metrics[cnn.name][key] for key in DIFFERENCE_KEYS}
    intervals = paired_bootstrap(lstm.probabilities, cnn.probabilities, labels, names, lstm.groups, samples, seed)
    result = {
        "models": [lstm.name, cnn.name],
        "label_names": names,
        "num_samples": int(len(labels)),
        "num_patients": len(set(lstm.groups)),
        "metrics": metrics,
        "errors": {name: int((~ok).sum()) for name, ok in correct.items()},
        "differences": differences,
        "intervals": intervals,
        "bootstrap": {"samples": samples, "seed": seed, "unit": "patient", "paired": True},
        "mcnemar": mcnemar(correct[lstm.name], correct[cnn.name]),
        "audit": {model.name: audit_summary(model.report) for model in (lstm, cnn)},
        "training_time": {model.name: training_time(model.report) for model in (lstm, cnn)},
        "test_seconds": test_seconds or {},
        "paper": PAPER,
    }
    result["verdict"] = verdict(result)
    return result


def verdict(result: dict[str, Any]) -> str:
    """One paragraph: the differences with their intervals, McNemar's p, and what that supports."""
    first, second = result["models"]
    n, test = result["num_samples"], result["mcnemar"]
    parts = []
    for key, label in (("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("macro_auc", "macro AUC")):
        interval = result["intervals"].get(key)
        span = f" (95% CI {100 * interval['low']:+.1f} to {100 * interval['high']:+.1f})" if interval else ""
        parts.append(f"{label} {100 * result['differences'][key]:+.1f} points{span}")
    intervals = result["intervals"].items()
    excludes_zero = [key for key, interval in intervals if interval["low"] > 0 or interval["high"] < 0]
    favoured = {key: first if result["differences"][key] > 0 else second for key in excludes_zero}
    better = next(iter(favoured.values()), first if result["differences"]["accuracy"] > 0 else second)
    mcnemar_says = test["p_value"] < 0.05
    if len(set(favoured.values())) > 1:
        conclusion = ("no consistent difference: the paired intervals exclude zero in opposite directions ("
                      + ", ".join(f"{key} for the {name}" for key, name in favoured.items()) + ")")  # fmt: skip
    elif not excludes_zero and not mcnemar_says:
        conclusion = (f"no detectable difference between the two heads at n = {n} images "
                      f"({result['num_patients']} patients)")  # fmt: skip
    elif excludes_zero and mcnemar_says:
        conclusion = f"a difference in favour of the {better} ({', '.join(excludes_zero)} and McNemar at the 5% level)"
    else:
        which = f"the paired intervals of {', '.join(excludes_zero)} exclude zero" if excludes_zero else "McNemar does"
        other = "McNemar's test does not reach 5%" if excludes_zero else "no paired interval excludes zero"
        conclusion = f"at most weak evidence in favour of the {better}: {which}, {other}"
    conclusion += "; each network was trained once (one seed), so seed-to-seed variation is not in these intervals"
    return (
        f"{first} minus {second} on the same {n} test images: {'; '.join(parts)}. McNemar's exact test on the "
        f"paired calls: {test['only_first_correct']} images only the {first} got right, {test['only_second_correct']} "
        f"only the {second}, p = {test['p_value']:.3g}. The data support {conclusion}."
    )


def markdown(result: dict[str, Any], figure: str | None = "comparison_confusion.png") -> str:
    """The comparison as Markdown: tables, figure, audit, time, the paper's numbers, the verdict."""
    first, second = result["models"]
    metrics, paper = result["metrics"], result["paper"]
    sections = [f"**Verdict.** {result['verdict']}"]
    for name in (first, second):
        sections.append(
            f"Per class, {name} (%, the paper's Tables 3-4 layout):\n\n" + per_class_table(metrics[name])
        )
    if figure:
        sections.append(f"![confusion matrices of both networks, the paper's Fig. 6 layout]({figure})")
    rows = ["| Difference (CNN-LSTM - CNN), points | Estimate | Paired patient-bootstrap 95% CI |", "|---|---|---|"]
    for key in DIFFERENCE_KEYS:
        interval = result["intervals"].get(key)
        span = f"{100 * interval['low']:+.1f} to {100 * interval['high']:+.1f}" if interval else "n/a"
        rows.append(f"| {key} | {100 * result['differences'][key]:+.1f} | {span} |")
    test = result["mcnemar"]
    rows.append(
        f"\nMcNemar's exact test on the {result['num_samples']} paired calls: both right {test['table'][0][0]}, "
        f"only {first} right {test['only_first_correct']}, only {second} right {test['only_second_correct']}, "
        f"both wrong {test['table'][1][1]}; p = {test['p_value']:.3g}. Images of one patient are not "
        f"independent, so treat p as approximate; the bootstrap above resamples patients "
        f"({result['bootstrap']['samples']} resamples)."
    )
    sections.append("\n".join(rows))
    audit = result["audit"]
    if audit.get(first) and audit.get(second):
        lines = [f"| Shortcut audit (test) | {first} | {second} |", "|---|---|---|"]
        for key, label in (
            ("accuracy_original", "accuracy as is"),
            ("accuracy_lungs_hidden", "accuracy, lungs hidden"),
            ("covid_sensitivity_lungs_hidden", "COVID-19 sensitivity, lungs hidden"),
            ("accuracy_lungs_only", "accuracy, only the lungs"),
            ("gradcam_share", "Grad-CAM share inside the lungs"),
        ):
            lines.append(f"| {label} | {percent(audit[first][key])} | {percent(audit[second][key])} |")
        shortcuts = [", ".join(audit[name]["class_shortcuts"]) or "none" for name in (first, second)]
        lines.append(f"| classes found without the lungs | {shortcuts[0]} | {shortcuts[1]} |")
        gates = ["passed" if audit[name]["gate_passed"] else "failed" for name in (first, second)]
        lines.append(f"| lungs-hidden gate | {gates[0]} | {gates[1]} |")
        sections.append("\n".join(lines))
    times, tests = result["training_time"], result["test_seconds"]
    lines = [f"| Time (the paper's Table 5) | {first} | {second} | the paper's CNN-LSTM |", "|---|---|---|---|"]
    wall = [times[name]["wall_seconds"] for name in (first, second)]
    lines.append(
        f"| training, s | {_s(wall[0])} | {_s(wall[1])} | {paper['train_seconds']:,} (125 epochs, 3,660 images) |"
    )
    speed = [times[name]["images_per_second"] for name in (first, second)]
    lines.append(f"| training images/s (mean over the stages) | {_f(speed[0])} | {_f(speed[1])} | ~25 |")
    if tests:
        lines.append(
            f"| test, s ({tests.get('images', '?')} images) | {_s(tests.get(first))} | {_s(tests.get(second))} | "
            f"{paper['test_seconds']} (915 images) |"
        )
    hardware = tests.get("hardware", "this CPU")
    lines.append(f"| hardware | {hardware} | {hardware} | {paper['hardware']} |")
    sections.append("\n".join(lines))
    ours = [metrics[name] for name in (first, second)]
    lines = ["| Beside the paper | Accuracy | Macro AUC | Misclassified | Test images |", "|---|---|---|---|---|"]
    for label, key in ((f"the paper's {first}", first), (f"the paper's {second}", second)):
        claim = paper[key]
        implied = 1 - claim["errors"] / paper["test_images"]
        lines.append(
            f"| {label} | {percent(claim['accuracy'])} (Fig. 6 implies {percent(implied)}) | "
            f"{percent(claim['macro_auc'])} | {claim['errors']} | {paper['test_images']} (image-level split) |"
        )
    for label, name, found in ((first, first, ours[0]), (second, second, ours[1])):
        lines.append(
            f"| ours, {label} | {percent(found['accuracy'])} | {percent(found['macro_auc'])} | "
            f"{result['errors'][name]} | {result['num_samples']} (patient-disjoint) |"
        )
    sections.append("\n".join(lines))
    return "\n\n".join(sections) + "\n"


def _s(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def _f(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def plot_confusions(result: dict[str, Any], path: Path) -> Path:
    """Both confusion matrices side by side, counts per cell, true class down, predicted across (paper Fig. 6)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = result["label_names"]
    figure, axes = plt.subplots(1, 2, figsize=(9.5, 4.2))
    for axis, name in zip(axes, result["models"], strict=True):
        matrix = np.array(result["metrics"][name]["confusion_matrix"])
        axis.imshow(matrix, cmap="Blues", vmin=0, vmax=max(int(matrix.max()), 1))
        for (row, column), count in np.ndenumerate(matrix):
            colour = "white" if count > matrix.max() / 2 else "black"
            axis.text(column, row, str(count), ha="center", va="center", color=colour, fontsize=12)
        axis.set_xticks(range(len(names)), names)
        axis.set_yticks(range(len(names)), names)
        axis.set_xlabel("predicted")
        axis.set_ylabel("true")
        axis.set_title(f"{name}: {result['errors'][name]} of {result['num_samples']} misclassified")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
