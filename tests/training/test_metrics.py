"""The `evaluate` metric module: numbers against scikit-learn, input forms, ECE, offline loading by path, errors."""

from __future__ import annotations

import math
from pathlib import Path

import evaluate
import numpy as np
import pytest
from sklearn.metrics import confusion_matrix as sk_confusion_matrix
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

from train.metrics.cxr_metrics.cxr_metrics import (
    binary_auc,
    calibration_bins,
    compute_classification_metrics,
    expected_calibration_error,
    softmax,
)

METRIC_DIR = Path(__file__).resolve().parents[2] / "train" / "metrics" / "cxr_metrics"
NAMES = ["COVID-19", "Normal", "Pneumonia"]


@pytest.fixture(scope="module")
def metric() -> evaluate.Metric:
    return evaluate.load(str(METRIC_DIR), keep_in_memory=True)


def random_problem(seed: int, n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), labels] += rng.uniform(0, 2.5, n)
    return logits, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_scikit_learn(seed: int):
    logits, labels = random_problem(seed)
    probabilities = softmax(logits)
    predicted = probabilities.argmax(1)
    result = compute_classification_metrics(logits, labels, NAMES, input_type="logits")
    assert result["accuracy"] == pytest.approx(float((predicted == labels).mean()))
    assert result["confusion_matrix"] == sk_confusion_matrix(labels, predicted, labels=[0, 1, 2]).tolist()
    for average, key in ((None, None), ("macro", "macro")):
        precision = precision_score(labels, predicted, average=average, zero_division=0)
        recall = recall_score(labels, predicted, average=average, zero_division=0)
        f1 = f1_score(labels, predicted, average=average, zero_division=0)
        if key == "macro":
            assert result["macro_precision"] == pytest.approx(precision)
            assert result["macro_sensitivity"] == pytest.approx(recall)
            assert result["macro_f1"] == pytest.approx(f1)
        else:
            for index, name in enumerate(NAMES):
                assert result["per_class"][name]["precision"] == pytest.approx(precision[index])
                assert result["per_class"][name]["sensitivity"] == pytest.approx(recall[index])
                assert result["per_class"][name]["f1"] == pytest.approx(f1[index])
    matrix = np.asarray(result["confusion_matrix"])
    for index, name in enumerate(NAMES):
        true_negative = matrix.sum() - matrix[index].sum() - matrix[:, index].sum() + matrix[index, index]
        negatives = matrix.sum() - matrix[index].sum()
        assert result["per_class"][name]["specificity"] == pytest.approx(true_negative / negatives)
        assert result["per_class"][name]["auc"] == pytest.approx(
            roc_auc_score(labels == index, probabilities[:, index])
        )
        assert result["per_class"][name]["support"] == int((labels == index).sum())
    assert result["macro_auc"] == pytest.approx(roc_auc_score(labels, probabilities, multi_class="ovr"))
    assert result["nll"] == pytest.approx(-np.mean(np.log(probabilities[np.arange(len(labels)), labels])))


def test_auc_handles_ties_like_scikit_learn():
    rng = np.random.default_rng(5)
    positive = rng.integers(0, 2, 80).astype(bool)
    scores = rng.integers(0, 4, 80) / 3.0  # many ties
    assert binary_auc(positive, scores) == pytest.approx(roc_auc_score(positive, scores))
    assert binary_auc(np.ones(5, bool), np.arange(5.0)) is None


def test_logits_and_probabilities_give_the_same_result():
    logits, labels = random_problem(3)
    from_logits = compute_classification_metrics(logits, labels, NAMES)  # auto: not distributions -> softmax
    from_probabilities = compute_classification_metrics(softmax(logits), labels, NAMES)
    for key in ("accuracy", "macro_f1", "macro_auc", "ece", "nll"):
        assert from_logits[key] == pytest.approx(from_probabilities[key])
    with pytest.raises(ValueError, match="not probability distributions"):
        compute_classification_metrics(logits, labels, NAMES, input_type="probabilities")


def test_expected_calibration_error_by_hand():
    # two bins used: confidence 0.9 (2 samples, 1 correct) and 0.6 (2 samples, 2 correct)
    probabilities = np.array([[0.9, 0.05, 0.05], [0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.2, 0.6, 0.2]])
    labels = np.array([0, 1, 0, 1])
    expected = 0.5 * abs(0.5 - 0.9) + 0.5 * abs(1.0 - 0.6)
    assert expected_calibration_error(probabilities, labels, 10) == pytest.approx(expected)
    bins = calibration_bins(probabilities, labels, 10)
    assert sum(entry["count"] for entry in bins) == 4
    assert [entry["count"] for entry in bins if entry["count"]] == [2, 2]


def test_undefined_values_are_none_and_left_out_of_macro():
    probabilities = np.array([[0.8, 0.1, 0.1], [0.7, 0.2, 0.1], [0.2, 0.7, 0.1]])
    result = compute_classification_metrics(probabilities, [0, 0, 1], NAMES)
    pneumonia = result["per_class"]["Pneumonia"]
    assert pneumonia["support"] == 0 and pneumonia["sensitivity"] is None and pneumonia["auc"] is None
    assert pneumonia["precision"] is None  # never predicted either
    assert result["macro_sensitivity"] == pytest.approx(1.0)  # mean over COVID-19 and Normal only
    assert result["macro_auc"] == pytest.approx(1.0)


def test_hard_predictions_have_no_probability_metrics():
    result = compute_classification_metrics(np.array([0, 1, 2, 2]), np.array([0, 1, 1, 2]), NAMES)
    assert result["accuracy"] == 0.75
    assert result["macro_auc"] is None and result["ece"] is None and result["nll"] is None


@pytest.mark.parametrize(
    ("predictions", "references", "message"),
    [
        ([[0.5, 0.5, 0.0]], [0, 1], "1 predictions for 2 references"),
        ([[0.5, 0.5, 0.0]], [3], "class indices"),
        ([[0.5, 0.5]], [0], "expected 3"),
        ([[math.nan, 0.5, 0.5]], [0], "NaN"),
        (np.zeros((0, 3)), [], "no samples"),
    ],
)
def test_bad_inputs_fail_clearly(predictions, references, message):
    with pytest.raises(ValueError, match=message):
        compute_classification_metrics(np.asarray(predictions, dtype=float), references, NAMES)


def test_loads_offline_by_folder_and_by_file(metric: evaluate.Metric):
    logits, labels = random_problem(7, n=60)
    direct = compute_classification_metrics(logits, labels, NAMES, input_type="logits")
    result = metric.compute(predictions=logits.tolist(), references=labels.tolist(), label_names=NAMES)
    assert result["accuracy"] == pytest.approx(direct["accuracy"])
    assert result["per_class"]["Normal"]["auc"] == pytest.approx(direct["per_class"]["Normal"]["auc"])
    by_file = evaluate.load(str(METRIC_DIR / "cxr_metrics.py"), keep_in_memory=True)
    for start in range(0, 60, 25):  # incremental use, as in an evaluation loop
        by_file.add_batch(predictions=logits[start : start + 25].tolist(), references=labels[start : start + 25])
    assert by_file.compute(label_names=NAMES)["macro_f1"] == pytest.approx(direct["macro_f1"])
    hard = metric.compute(predictions=[0, 1, 2], references=[0, 1, 1], label_names=NAMES)
    assert hard["accuracy"] == pytest.approx(2 / 3)


def test_metric_card_is_publishable():
    from huggingface_hub import ModelCard

    text = (METRIC_DIR / "README.md").read_text()
    card = ModelCard(text)
    assert card.data.to_dict()["tags"] and "evaluate" in card.data.to_dict()["tags"]
    for section in ("## Metric Description", "## How to Use", "## Citation", "## Limitations"):
        assert section in text
