"""The paper's experiment on two real tiny runs (a CNN-LSTM and the dense-head CNN, same corpus and recipe), compared
by scripts/compare_models.py: the numbers come from each run's own predictions, McNemar's p and the paired intervals
agree with an independent computation, both cards and reports link each other, mismatched test sets are refused."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest

REPO_ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.shared_data


@pytest.fixture(scope="module")
def two_runs(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory, run_main, tiny_args) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("comparison")
    finals = {}
    for name, head in (("cnn-lstm", "lstm"), ("cnn-dense", "dense")):
        extra = ["--head_type", head, "--shortcut_audit", "--audit_ig_per_class", "0", "--bootstrap_samples", "20"]
        finals[name] = run_main(tiny_args(tiny_corpus, root / name, *extra))
    return finals


def calls(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    with (folder / "report" / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    return np.array([row["label"] for row in rows]), np.array([row["predicted"] for row in rows])


def test_compare_models(two_runs, tiny_corpus, load_script, capsys):
    lstm, cnn = two_runs["cnn-lstm"], two_runs["cnn-dense"]
    assert json.loads((cnn / "config.json").read_text())["head_type"] == "dense"
    script = load_script("scripts/compare_models.py")
    argv = ["--cnn_lstm", str(lstm), "--cnn", str(cnn), "--data_dir", str(tiny_corpus), "--bootstrap_samples", "200"]
    assert script.main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads((lstm / "report" / "comparison.json").read_text())
    assert result == json.loads((cnn / "report" / "comparison.json").read_text())

    # the numbers are the runs' own: metrics.json of each report, and McNemar from the predicted labels
    for name, folder in (("CNN-LSTM", lstm), ("CNN", cnn)):
        stored = json.loads((folder / "report" / "metrics.json").read_text())["metrics"]
        assert result["metrics"][name]["accuracy"] == pytest.approx(stored["accuracy"], abs=1e-6)
        assert result["metrics"][name]["macro_f1"] == pytest.approx(stored["macro_f1"], abs=1e-6)
    labels, lstm_calls = calls(lstm)
    _, cnn_calls = calls(cnn)
    only_lstm = int(np.sum((lstm_calls == labels) & (cnn_calls != labels)))
    only_cnn = int(np.sum((lstm_calls != labels) & (cnn_calls == labels)))
    test = result["mcnemar"]
    assert (test["only_first_correct"], test["only_second_correct"]) == (only_lstm, only_cnn)
    expected_p = binomtest(only_lstm, only_lstm + only_cnn, 0.5).pvalue if only_lstm + only_cnn else 1.0
    assert test["p_value"] == pytest.approx(expected_p)
    accuracy_difference = np.mean(lstm_calls == labels) - np.mean(cnn_calls == labels)
    assert result["differences"]["accuracy"] == pytest.approx(accuracy_difference)
    for key in ("accuracy", "macro_f1"):  # defined on every resample (macro AUC may not be: a class can be missing)
        interval = result["intervals"][key]
        assert -1 <= interval["low"] <= interval["high"] <= 1 and interval["n"] == 200, (key, interval)
    assert result["bootstrap"] == {"samples": 200, "seed": 42, "unit": "patient", "paired": True}
    assert result["audit"]["CNN-LSTM"]["accuracy_lungs_hidden"] is not None
    assert result["test_seconds"]["images"] == len(labels)
    assert result["test_seconds"]["CNN-LSTM"] > 0 and result["test_seconds"]["CNN"] > 0
    assert result["training_time"]["CNN"]["wall_seconds"] > 0
    assert result["verdict"] in printed and f"p = {test['p_value']:.3g}" in result["verdict"]

    # both folders show it, each linking the other; the figure is where the links say
    for folder, other in ((lstm, cnn), (cnn, lstm)):
        card = (folder / "README.md").read_text()
        link = os.path.relpath(other, folder)
        assert "## The paper's experiment: CNN-LSTM against the competitive CNN" in card
        assert f"]({link})" in card and "](report/comparison_confusion.png)" in card
        assert result["verdict"] in card
        report_md = (folder / "report" / "report.md").read_text()
        assert f"](../{link})" in report_md and "](comparison_confusion.png)" in report_md
        assert (folder / "report" / "comparison_confusion.png").stat().st_size > 10_000
        assert json.loads((folder / "report" / "metrics.json").read_text())["comparison"]["companion"] == other.name


def test_compare_refuses_different_test_sets(two_runs, tmp_path, load_script, capsys):
    lstm = tmp_path / "lstm"
    shutil.copytree(two_runs["cnn-lstm"], lstm)
    (lstm / "report" / "comparison.json").unlink(missing_ok=True)  # written by the test above
    predictions = lstm / "report" / "predictions.csv"
    rows = predictions.read_text().splitlines()
    predictions.write_text("\n".join([rows[0], *rows[2:], rows[1]]) + "\n")  # same images, another order
    script = load_script("scripts/compare_models.py")
    assert script.main(["--cnn_lstm", str(lstm), "--cnn", str(two_runs["cnn-dense"])]) == 2
    assert "did not score the same test images" in capsys.readouterr().err
    assert not (lstm / "report" / "comparison.json").exists()


@pytest.mark.slow
def test_one_command_trains_both_and_compares(tiny_corpus, tmp_path):
    """scripts/compare_cnn_lstm.sh with the tiny config for both heads: two runs, then the comparison."""
    env = {**os.environ, "OUT": str(tmp_path / "out"), "DATA_DIR": str(tiny_corpus), "PYTHON": sys.executable,
           "LSTM_CONFIG": "train/configs/tiny.json", "CNN_CONFIG": "train/configs/tiny.json"}  # fmt: skip
    proc = subprocess.run(["bash", "scripts/compare_cnn_lstm.sh", "--bootstrap_samples", "20"], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name, head in (("cnn-lstm", "lstm"), ("cnn-dense", "dense")):
        final = tmp_path / "out" / name / "final"
        assert json.loads((final / "config.json").read_text())["head_type"] == head
        assert (final / "report" / "comparison.json").is_file()
    assert "**Verdict.**" in proc.stdout
    again = subprocess.run(["bash", "scripts/compare_cnn_lstm.sh"], cwd=REPO_ROOT, env=env, capture_output=True,
                           text=True, timeout=600)  # fmt: skip
    assert again.returncode == 0 and "exists, not retrained" in again.stdout, again.stderr[-2000:]


def test_verdict_follows_the_direction_of_each_interval():
    from train.training.comparison import verdict

    def result(differences, intervals, p_value):
        test = {"only_first_correct": 15, "only_second_correct": 11, "p_value": p_value}
        return {"models": ["CNN-LSTM", "CNN"], "num_samples": 209, "num_patients": 99, "mcnemar": test,
                "differences": differences, "intervals": {k: {"low": lo, "high": hi, "n": 2000}
                                                           for k, (lo, hi) in intervals.items()}}  # fmt: skip

    cnn_auc = result({"accuracy": 0.019, "macro_f1": 0.024, "macro_auc": -0.03},
                     {"accuracy": (-0.03, 0.07), "macro_f1": (-0.03, 0.08), "macro_auc": (-0.054, -0.005)}, 0.56)
    assert "at most weak evidence in favour of the CNN:" in verdict(cnn_auc)  # the AUC interval favours the CNN
    opposite = result({"accuracy": 0.05, "macro_f1": 0.06, "macro_auc": -0.03},
                      {"accuracy": (0.005, 0.09), "macro_f1": (0.01, 0.1), "macro_auc": (-0.05, -0.01)}, 0.2)
    assert "no consistent difference" in verdict(opposite)
    none = result({"accuracy": 0.01, "macro_f1": 0.0, "macro_auc": 0.0},
                  {"accuracy": (-0.05, 0.07), "macro_f1": (-0.05, 0.05), "macro_auc": (-0.03, 0.03)}, 0.8)
    assert "no detectable difference between the two heads at n = 209 images (99 patients)" in verdict(none)
    both = result({"accuracy": 0.1, "macro_f1": 0.1, "macro_auc": 0.05},
                  {"accuracy": (0.05, 0.15), "macro_f1": (0.05, 0.15), "macro_auc": (0.01, 0.09)}, 0.001)
    assert "a difference in favour of the CNN-LSTM" in verdict(both)
