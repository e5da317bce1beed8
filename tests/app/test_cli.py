"""`python -m cxr_app predict`: a real subprocess on example X-rays and a bad file, against the app's answers."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("CNN_LSTM_MODEL", None)
    return subprocess.run([sys.executable, "-m", "cxr_app", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, make_checkpoint) -> Path:
    folder = tmp_path_factory.mktemp("cli") / "checkpoint"
    make_checkpoint(folder)
    return folder


def test_predicts_files_and_folders_and_reports_bad_files_in_their_row(tmp_path, checkpoint, example_xrays):
    from cxr_app.demo import CxrDemo

    bad = tmp_path / "notes.png"
    bad.write_text("this is not an X-ray")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(example_xrays["normal"][0].read_bytes())
    out = tmp_path / "out.csv"
    done = run_cli("predict", str(example_xrays["covid19"][0]), str(bad), str(folder), "--model", str(checkpoint),
                   "--csv", str(out), "--no_progress", cwd=tmp_path)
    assert done.returncode == 1, done.stderr  # one file could not be read
    assert "Traceback" not in done.stderr and "not for diagnosis" in done.stderr
    rows = list(csv.DictReader(out.open()))
    assert [Path(row["file"]).name for row in rows] == [example_xrays["covid19"][0].name, "notes.png", "a.jpg"]
    assert rows[1]["predicted"] == "" and rows[1]["warnings"].startswith("not read: The file contains text")
    app = CxrDemo.from_source(str(checkpoint))
    for row, path in ((rows[0], example_xrays["covid19"][0]), (rows[2], folder / "a.jpg")):
        expected = app.classify(str(path))
        assert row["predicted"] == expected.label
        for label, probability in expected.scores.items():
            assert float(row[f"p_{label}"]) == pytest.approx(probability, abs=1e-4)
        assert float(row["lung_evidence"]) == pytest.approx(expected.evidence.share, abs=0.005)
    assert rows[1]["lung_evidence"] == ""
    assert "| file | predicted |" in done.stdout  # the table on stdout as well


def test_csv_to_stdout_and_usage_errors(tmp_path, checkpoint, example_xrays):
    done = run_cli("predict", str(example_xrays["pneumonia"][0]), "--model", str(checkpoint), "--csv", "-",
                   "--no_progress", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (row,) = list(csv.DictReader(done.stdout.splitlines()))
    assert sum(float(row[key]) for key in row if key.startswith("p_")) == pytest.approx(1.0, abs=1e-3)
    missing = run_cli("predict", str(tmp_path / "nowhere.png"), "--model", str(checkpoint), cwd=tmp_path)
    assert missing.returncode == 2 and "no such file" in missing.stderr and "Traceback" not in missing.stderr
    no_model = run_cli("predict", str(example_xrays["pneumonia"][0]), cwd=tmp_path)  # no ./checkpoints here
    assert no_model.returncode == 2 and "No trained model is installed" in no_model.stderr
    bad_csv = run_cli("predict", str(example_xrays["pneumonia"][0]), "--model", str(checkpoint),
                      "--csv", str(tmp_path / "no" / "dir.csv"), cwd=tmp_path)
    assert bad_csv.returncode == 2 and "does not exist" in bad_csv.stderr
