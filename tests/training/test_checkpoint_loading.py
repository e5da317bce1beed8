"""train/training/checkpoint_loading.py and the scripts on it load a user-given checkpoint with this repository's
classes: the code stored beside the weights never runs, and a checkpoint of another model is refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modeling_cnn_lstm import CnnLstmForImageClassification, CnnLstmImageProcessor
from train.training.checkpoint_loading import NotACnnLstmCheckpoint, load_checkpoint


@pytest.fixture
def booby_trapped(tmp_path: Path, make_checkpoint) -> tuple[Path, Path]:
    """A tiny checkpoint whose stored modeling code would leave a marker file if it were ever imported."""
    folder = tmp_path / "checkpoint"
    make_checkpoint(folder)
    marker = tmp_path / "remote-code-ran"
    for name in ("modeling_cnn_lstm.py", "configuration_cnn_lstm.py", "image_processing_cnn_lstm.py"):
        code = (folder / name).read_text()
        (folder / name).write_text(f"open({str(marker)!r}, 'w').close()\n" + code)
    return folder, marker


def test_loads_with_the_local_classes_and_runs_no_stored_code(booby_trapped):
    folder, marker = booby_trapped
    model, processor, labels = load_checkpoint(str(folder), "cpu")
    assert type(model) is CnnLstmForImageClassification and type(processor) is CnnLstmImageProcessor
    assert not model.training and next(model.parameters()).dtype.is_floating_point
    assert labels == ["COVID-19", "Normal", "Pneumonia"]
    assert not marker.exists(), "the checkpoint's own code was executed"


def test_other_models_are_refused_by_name(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit", "auto_map": {"AutoConfig": "x.Y"}}))
    with pytest.raises(NotACnnLstmCheckpoint, match="is a 'vit' model, not a CNN-LSTM"):
        load_checkpoint(str(tmp_path), "cpu")


@pytest.mark.parametrize(
    ("script", "argv"),
    [
        ("scripts/evaluate_checkpoint.py", ["--data_dir", "unused"]),
        ("scripts/shortcut_audit.py", ["--data_dir", "unused"]),
        ("scripts/benchmark_inference.py", []),
    ],
)
def test_scripts_say_what_is_wrong(tmp_path, monkeypatch, load_script, script, argv):
    model = tmp_path / "not-ours"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "resnet"}))
    monkeypatch.chdir(tmp_path)  # the scripts' default output folders land here
    with pytest.raises(SystemExit, match=r"error: --model .* is a 'resnet' model, not a CNN-LSTM"):
        load_script(script).main(["--model", str(model), *argv])
