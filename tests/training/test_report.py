"""train/training/report.py: bootstrap intervals (macro and per class, from the same resamples), the report's
markdown with and without per-class intervals and the shortcut audit, and `scripts/update_card.py
--recompute_bootstrap` on a real checkpoint folder."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

from train.metrics.cxr_metrics.cxr_metrics import softmax
from train.training.model_card import card_context, describe_network, write_model_card
from train.training.report import (
    INTERVAL_KEYS,
    PER_CLASS_INTERVAL_KEYS,
    bootstrap_intervals,
    percent,
    render_report_markdown,
    write_report,
)

LABEL_NAMES = ["COVID-19", "Normal", "Pneumonia"]


def synthetic(num_patients: int, seed: int, signal: float = 1.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logits, labels, patient ids): 1-3 images per patient, one label per patient, noisy logits that favour it."""
    rng = np.random.default_rng(seed)
    patient_labels = np.arange(num_patients) % 3
    images = rng.integers(1, 4, num_patients)
    patients = np.repeat([f"p{index:03d}" for index in range(num_patients)], images)
    labels = np.repeat(patient_labels, images)
    logits = rng.normal(size=(len(labels), 3))
    logits[np.arange(len(labels)), labels] += signal
    return logits, labels, patients


def reference_intervals(
    probabilities: np.ndarray, labels: np.ndarray, patients: np.ndarray, samples: int, seed: int
) -> tuple[dict[str, tuple[float, float]], dict[str, dict[str, tuple[float, float]]]]:
    """Patient resampling written out independently (scikit-learn metrics), with the draws of the function as it was
    before per-class intervals: the same generator, one `integers` call per resample over the sorted patient ids.
    Assumes every class is present and predicted in every resample (true for the data used below)."""
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(patients == patient) for patient in np.unique(patients)]
    macro: dict[str, list[float]] = {"accuracy": [], "macro_f1": [], "macro_auc": []}
    per_class = {name: {"sensitivity": [], "specificity": [], "precision": [], "f1": [], "auc": []}
                 for name in LABEL_NAMES}  # fmt: skip
    for _ in range(samples):
        chosen = rng.integers(0, len(members), len(members))
        indices = np.concatenate([members[group] for group in chosen])
        truth, scores = labels[indices], probabilities[indices]
        guess = scores.argmax(axis=1)
        macro["accuracy"].append(float((truth == guess).mean()))
        macro["macro_f1"].append(float(f1_score(truth, guess, average="macro")))
        aucs = [roc_auc_score(truth == index, scores[:, index]) for index in range(3)]
        macro["macro_auc"].append(float(np.mean(aucs)))
        for index, name in enumerate(LABEL_NAMES):
            positive, predicted = truth == index, guess == index
            per_class[name]["sensitivity"].append(recall_score(positive, predicted))
            per_class[name]["specificity"].append(float((~predicted[~positive]).mean()))
            per_class[name]["precision"].append(precision_score(positive, predicted))
            per_class[name]["f1"].append(f1_score(positive, predicted))
            per_class[name]["auc"].append(aucs[index])

    def interval(found: list[float]) -> tuple[float, float]:
        return float(np.percentile(found, 2.5)), float(np.percentile(found, 97.5))

    return (
        {key: interval(found) for key, found in macro.items()},
        {name: {key: interval(found) for key, found in values.items()} for name, values in per_class.items()},
    )


def test_intervals_match_an_independent_reference_and_the_old_draws():
    """Macro intervals are those of the original (macro-only) resampling for the seed; per-class intervals come from
    the same resamples."""
    logits, labels, patients = synthetic(90, seed=3)
    probabilities = softmax(logits)
    result = bootstrap_intervals(probabilities, labels, LABEL_NAMES, patients, samples=60, seed=11)
    macro, per_class = reference_intervals(probabilities, labels, patients, samples=60, seed=11)
    assert result["unit"] == "patient" and result["samples"] == 60 and result["seed"] == 11
    assert set(result["intervals"]) == set(INTERVAL_KEYS)
    for key, (low, high) in macro.items():
        assert result["intervals"][key]["low"] == pytest.approx(low, abs=1e-12), key
        assert result["intervals"][key]["high"] == pytest.approx(high, abs=1e-12), key
        assert result["intervals"][key]["n"] == 60
    assert list(result["per_class"]) == LABEL_NAMES
    for name in LABEL_NAMES:
        assert set(result["per_class"][name]) == set(PER_CLASS_INTERVAL_KEYS)
        for key, (low, high) in per_class[name].items():
            found = result["per_class"][name][key]
            assert found["low"] == pytest.approx(low, abs=1e-12), (name, key)
            assert found["high"] == pytest.approx(high, abs=1e-12), (name, key)
            assert found["n"] == 60, (name, key)
    other_seed = bootstrap_intervals(probabilities, labels, LABEL_NAMES, patients, samples=60, seed=12)
    assert other_seed["per_class"] != result["per_class"]  # the seed drives the per-class resamples too


def test_per_class_intervals_hold_their_estimates():
    from train.metrics.cxr_metrics.cxr_metrics import compute_classification_metrics

    logits, labels, patients = synthetic(150, seed=5)
    probabilities = softmax(logits)
    estimates = compute_classification_metrics(probabilities, labels, LABEL_NAMES, input_type="probabilities")
    result = bootstrap_intervals(probabilities, labels, LABEL_NAMES, patients, samples=200, seed=0)
    for name in LABEL_NAMES:
        for key in PER_CLASS_INTERVAL_KEYS:
            interval, estimate = result["per_class"][name][key], estimates["per_class"][name][key]
            assert interval["low"] < estimate < interval["high"], (name, key)
            assert interval["high"] - interval["low"] < 0.4, (name, key)  # ~150 patients: not degenerate either


def test_perfect_classifier_gives_intervals_of_one():
    labels = np.repeat([0, 1, 2], 20)
    probabilities = np.full((60, 3), 0.05)
    probabilities[np.arange(60), labels] = 0.9
    result = bootstrap_intervals(probabilities, labels, LABEL_NAMES, None, samples=100, seed=0)
    assert result["unit"] == "image"
    for name in LABEL_NAMES:
        for key in PER_CLASS_INTERVAL_KEYS:
            interval = result["per_class"][name][key]
            assert (interval["low"], interval["high"]) == (1.0, 1.0), (name, key)
            assert 0 < interval["n"] <= 100


def test_undefined_per_class_values_are_left_out_and_counted():
    """One Pneumonia patient among many: resamples without it have no Pneumonia sensitivity or AUC, and `n` is the
    number of resamples that drew it."""
    labels = np.array([0] * 20 + [1] * 20 + [2])
    patients = np.array([f"p{index}" for index in range(len(labels))])
    probabilities = np.full((len(labels), 3), 0.2)
    probabilities[np.arange(len(labels)), labels] = 0.6
    result = bootstrap_intervals(probabilities, labels, LABEL_NAMES, patients, samples=50, seed=4)
    rng = np.random.default_rng(4)
    rare = list(np.unique(patients)).index("p40")
    drawn = sum(rare in rng.integers(0, len(labels), len(labels)) for _ in range(50))
    assert 0 < drawn < 50
    pneumonia = result["per_class"]["Pneumonia"]
    assert pneumonia["sensitivity"]["n"] == pneumonia["auc"]["n"] == drawn
    assert pneumonia["specificity"]["n"] == 50  # negatives are always there
    assert result["per_class"]["COVID-19"]["sensitivity"]["n"] == 50
    assert all(not np.isnan(value) for classes in result["per_class"].values() for interval in classes.values()
               for value in (interval["low"], interval["high"]))  # fmt: skip


def test_zero_samples_compute_nothing():
    logits, labels, patients = synthetic(10, seed=0)
    result = bootstrap_intervals(softmax(logits), labels, LABEL_NAMES, patients, samples=0)
    assert result["intervals"] == {} and result["per_class"] == {} and result["samples"] == 0


def audit_condition(accuracy: float, macro_f1: float, *sensitivity: float | None) -> dict:
    sensitivity_per_class = dict(zip(LABEL_NAMES, sensitivity, strict=True))
    return {"accuracy": accuracy, "macro_f1": macro_f1, "sensitivity": sensitivity_per_class}


AUDIT = {  # the structure scripts/shortcut_audit.py writes
    "model": "checkpoints/x",
    "data_dir": "corpus",
    "split": "test",
    "num_samples": 60,
    "label_names": LABEL_NAMES,
    "mask": "Fixed mask, no segmentation: two ellipses.",
    "conditions": {
        "original": audit_condition(0.75, 0.7, 0.9, 0.6, 0.75),
        "lungs_masked": audit_condition(0.45, 0.375, 0.8, 0.5, 0.05),
        "lungs_only": audit_condition(0.35, 0.2, 1.0, 0.0, None),
    },
    "interpretation": "Masking the lungs brings accuracy near chance.",
}


@pytest.fixture(scope="module")
def report_folder(tmp_path_factory: pytest.TempPathFactory, make_checkpoint) -> tuple[Path, dict]:
    """A real checkpoint folder (seeded tiny model) with a report written by `write_report` from synthetic logits, as
    training writes it (card_info included), with a 1-3-image-per-patient test split."""
    folder = tmp_path_factory.mktemp("report-folder") / "final"
    model = make_checkpoint(folder)
    logits, labels, patients = synthetic(60, seed=1)
    network, architecture = describe_network(model.config)
    info = {
        "model_name": "tiny", "model_id": "tiny", "network_name": network, "architecture_summary": architecture,
        "num_parameters": sum(parameter.numel() for parameter in model.parameters()), "image_size": 32,
        "num_channels": 3, "datasets": [], "dataset_label": "synthetic", "dataset_type": "local-corpus",
        "test_split": "test", "data_summary": "Synthetic logits.",
        "training_summary": "- Precision fp32; channels_last False; torch.compile False; seed 7.",
    }  # fmt: skip
    columns = {"patient_id": list(patients), "source": ["a" if i % 2 else "b" for i in range(len(labels))]}
    report = write_report(folder / "report", logits, labels, LABEL_NAMES, temperature=1.3,
                          calibration_fitted_on="validation", columns=columns,
                          bootstrap_samples=40, seed=7, extra={"card_info": info})  # fmt: skip
    write_model_card(folder / "README.md", report, info)
    return folder, report


def bootstrap_section(markdown: str) -> str:
    return markdown.split("## Bootstrap intervals", 1)[1].split("\n## ", 1)[0]


def audit_section(markdown: str) -> str:
    return markdown.split("## Shortcut audit", 1)[1].split("\n## ", 1)[0]


def test_report_shows_per_class_intervals(report_folder: tuple[Path, dict]):
    _, report = report_folder
    section = bootstrap_section(render_report_markdown(report))
    assert "| accuracy |" in section and "| Class | Sensitivity | Specificity | F1 | AUC |" in section
    for name in LABEL_NAMES:
        estimate = report["metrics"]["per_class"][name]["sensitivity"]
        interval = report["bootstrap"]["per_class"][name]["sensitivity"]
        cell = f"{percent(estimate)} ({percent(interval['low'])} - {percent(interval['high'])})"
        assert f"| {name} | {cell} |" in section
    card = card_context(report, report["card_info"])["intervals_table"]  # the card shows the same table
    assert "| Class | Sensitivity | Specificity | F1 | AUC |" in card


def test_report_without_per_class_intervals_still_renders(report_folder: tuple[Path, dict]):
    """metrics.json files written before per-class intervals existed."""
    _, report = report_folder
    old = json.loads(json.dumps(report))
    del old["bootstrap"]["per_class"], old["bootstrap"]["seed"]
    section = bootstrap_section(render_report_markdown(old))
    assert "| macro_auc |" in section and "| Class |" not in section
    zero = {**old, "bootstrap": {"samples": 0, "unit": None, "intervals": {}}}
    assert "were not computed" in bootstrap_section(render_report_markdown(zero))


def test_report_shortcut_audit_section(report_folder: tuple[Path, dict]):
    _, report = report_folder
    assert "shortcut_audit" not in report
    missing = audit_section(render_report_markdown(report))
    assert "Not run" in missing and "python scripts/shortcut_audit.py --model" in missing
    section = audit_section(render_report_markdown({**report, "shortcut_audit": AUDIT}))
    assert "| Condition | Accuracy | Macro F1 | Sensitivity COVID-19 | Sensitivity Normal | Sensitivity Pneumonia |" \
        in section  # fmt: skip
    assert "| original | 75.0 | 70.0 | 90.0 | 60.0 | 75.0 |" in section
    assert "| lungs_masked | 45.0 | 37.5 | 80.0 | 50.0 | 5.0 |" in section
    assert "| lungs_only | 35.0 | 20.0 | 100.0 | 0.0 | n/a |" in section
    assert AUDIT["mask"] in section and AUDIT["interpretation"] in section and "Not run" not in section


def test_update_card_recompute_bootstrap_adds_per_class_intervals(
    report_folder: tuple[Path, dict], tmp_path: Path, load_script
):
    """An old report (macro intervals only, no stored seed) gains per-class intervals recomputed from its
    predictions.csv with the run's seed; the macro intervals stay; weights and every other file stay untouched."""
    import shutil

    folder = tmp_path / "final"
    shutil.copytree(report_folder[0], folder)
    metrics_path = folder / "report" / "metrics.json"
    written = json.loads(metrics_path.read_text())
    old = json.loads(metrics_path.read_text())
    del old["bootstrap"]["per_class"], old["bootstrap"]["seed"]
    old["shortcut_audit"] = AUDIT
    metrics_path.write_text(json.dumps(old, indent=2))
    updated = ("README.md", "report/metrics.json", "report/report.md")
    before = {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
              for path in sorted(folder.rglob("*")) if path.is_file()}  # fmt: skip
    assert "model.safetensors" in before and "report/predictions.csv" in before

    load_script("scripts/update_card.py").main(["--model_dir", str(folder), "--recompute_bootstrap"])

    after = {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
             for path in sorted(folder.rglob("*")) if path.is_file()}  # fmt: skip
    assert set(after) == set(before), "files appeared or vanished (temporary files?)"
    assert {name for name in before if before[name] != after[name]} == set(updated)
    report = json.loads(metrics_path.read_text())
    bootstrap = report["bootstrap"]
    assert bootstrap["seed"] == 7 and bootstrap["samples"] == 40 and bootstrap["unit"] == "patient"
    assert list(bootstrap["per_class"]) == LABEL_NAMES
    assert all(set(bootstrap["per_class"][name]) == set(PER_CLASS_INTERVAL_KEYS) for name in LABEL_NAMES)
    for key, interval in written["bootstrap"]["intervals"].items():  # the CSV holds probabilities to 6 decimals
        assert interval["low"] == pytest.approx(bootstrap["intervals"][key]["low"], abs=1e-4), key
        assert interval["high"] == pytest.approx(bootstrap["intervals"][key]["high"], abs=1e-4), key
    for name in LABEL_NAMES:
        for key, interval in written["bootstrap"]["per_class"][name].items():
            assert interval["low"] == pytest.approx(bootstrap["per_class"][name][key]["low"], abs=1e-4)
            assert interval["high"] == pytest.approx(bootstrap["per_class"][name][key]["high"], abs=1e-4)
    assert report["shortcut_audit"] == AUDIT and report["metrics"] == written["metrics"]
    for text in ((folder / "report" / "report.md").read_text(), (folder / "README.md").read_text()):
        assert "| Class | Sensitivity | Specificity | F1 | AUC |" in text and "| lungs_masked | 45.0 |" in text
    assert "{{" not in (folder / "README.md").read_text()


def test_update_card_refuses_predictions_of_another_model(report_folder: tuple[Path, dict], tmp_path: Path,
                                                          load_script):  # fmt: skip
    """A predictions.csv that does not reproduce the stored metrics is refused before anything is written."""
    import csv
    import shutil

    folder = tmp_path / "final"
    shutil.copytree(report_folder[0], folder)
    path = folder / "report" / "predictions.csv"
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:  # another model: the COVID-19 and Normal scores swapped
        row["p_COVID-19"], row["p_Normal"] = row["p_Normal"], row["p_COVID-19"]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    files = [folder / "README.md", folder / "report" / "metrics.json", folder / "report" / "report.md"]
    before = [file.read_bytes() for file in files]
    with pytest.raises(SystemExit, match="does not reproduce metrics.json"):
        load_script("scripts/update_card.py").main(["--model_dir", str(folder), "--recompute_bootstrap"])
    assert [file.read_bytes() for file in files] == before


def test_a_battery_audit_shows_its_own_markdown_and_sets_the_apps_threshold(
    report_folder: tuple[Path, dict], tmp_path: Path, load_script
):
    """The audit of train/training/shortcut_audit.py carries its own Markdown: report, card and report tab show it as
    it is; `update_card.py --lung_evidence_from` turns a validation audit's shares into the app's threshold."""
    import shutil

    from cxr_app import report_view
    from cxr_app.lung_evidence import threshold_from_report

    folder = tmp_path / "final"
    shutil.copytree(report_folder[0], folder)
    battery = {**AUDIT, "markdown": "BATTERY SECTION | lungs hidden |\n", "conditions": {}}
    (tmp_path / "test_audit.json").write_text(json.dumps(battery))
    shares = [0.1 * index for index in range(11)]  # 10% quantile 0.1; plus a map that was zero everywhere
    validation = {"split": "validation", "attribution": {"shares": [*shares, None]}}
    (tmp_path / "validation_audit.json").write_text(json.dumps(validation))
    update = load_script("scripts/update_card.py")
    update.main(["--model_dir", str(folder), "--shortcut_audit", str(tmp_path / "test_audit.json"),
                 "--lung_evidence_from", str(tmp_path / "validation_audit.json")])  # fmt: skip
    report = json.loads((folder / "report" / "metrics.json").read_text())
    assert report["lung_evidence"]["threshold"] == pytest.approx(0.1) and report["lung_evidence"]["n"] == 11
    assert threshold_from_report(report) == pytest.approx(0.1)
    for text in ((folder / "report" / "report.md").read_text(), (folder / "README.md").read_text()):
        assert "BATTERY SECTION | lungs hidden |" in audit_section(text)
    assert "BATTERY SECTION" in report_view.audit_markdown(report_view.load_report(folder / "report"))
    high = {"split": "validation", "attribution": {"shares": [0.8, 0.9, 0.95]}}
    (tmp_path / "high.json").write_text(json.dumps(high))
    update.main(["--model_dir", str(folder), "--lung_evidence_from", str(tmp_path / "high.json")])
    assert json.loads((folder / "report" / "metrics.json").read_text())["lung_evidence"]["threshold"] == 0.5


def test_the_model_it_replaced_is_shown_side_by_side(report_folder: tuple[Path, dict], tmp_path: Path, load_script):
    """`update_card.py --previous_model` stores a comparison that the card, report.md and the report tab show; a
    report without one renders exactly as before."""
    import shutil

    from cxr_app import report_view
    from train.training.report import previous_model_section

    assert previous_model_section(None) == "" and previous_model_section({"name": "x"}) == ""
    folder = tmp_path / "final"
    shutil.copytree(report_folder[0], folder)
    before = (folder / "README.md").read_text()
    (tmp_path / "cmp.md").write_text("| measure | v1 | v2 |\n|---|---|---|\n| lungs hidden | 51.7 | 34.4 |\n")
    update = load_script("scripts/update_card.py")
    update.main(["--model_dir", str(folder), "--previous_model", str(tmp_path / "cmp.md"), "--previous_model_name",
                 "v1 (whole images)"])  # fmt: skip
    for text in ((folder / "report" / "report.md").read_text(), (folder / "README.md").read_text()):
        assert "Against the model it replaced (v1 (whole images))" in text and "| lungs hidden | 51.7 | 34.4 |" in text
    assert "| lungs hidden | 51.7 | 34.4 |" in report_view.audit_markdown(report_view.load_report(folder / "report"))
    assert "Against the model it replaced" not in before


def test_the_app_shows_what_training_wrote(report_folder: tuple[Path, dict]):
    """Round trip across the two sides of the shared layer: a report written by training's `write_report` is read
    by the app's `load_report` and shown by the app's Model report tab with the same numbers (cxr_common.report
    renders both)."""
    from cxr_app import report_view
    from cxr_app.demo import build_demo
    from cxr_app.loading import load_classifier
    from cxr_app.service import CxrDemo
    from cxr_common.report import PLOT_FILES, percent

    folder, report = report_folder
    loaded = report_view.load_report(folder / "report")
    assert loaded is not None and loaded.data == json.loads((folder / "report" / "metrics.json").read_text())
    shown = {path.name for path, _ in loaded.figures()}
    assert shown >= {PLOT_FILES[key] for key in ("confusion_matrix", "roc_curves")}
    app = CxrDemo(load_classifier(str(folder)), "Model: tiny.", report=loaded)
    demo = build_demo(app=app)
    texts = "\n".join(value for block in demo.config["components"]
                      if isinstance(value := block.get("props", {}).get("value"), str))  # fmt: skip
    accuracy = report["metrics"]["accuracy"]
    assert percent(accuracy, report["bootstrap"]["intervals"]["accuracy"], unit="%") in texts
    for name in LABEL_NAMES:
        sensitivity = report["metrics"]["per_class"][name]["sensitivity"]
        assert percent(sensitivity, unit="%") in texts, name
    demo.close()
