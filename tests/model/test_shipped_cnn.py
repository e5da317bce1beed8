"""The paper's competitive CNN in `checkpoints/cnn-dense-cxr3/` (issue 20), and what both shipped folders share: the
model code they carry is the package's, byte for byte (the Hub runs the folder's copy, the repository the package)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

REPO_ROOT = Path(__file__).resolve().parents[2]
CHECKPOINTS = REPO_ROOT / "checkpoints"
CNN = CHECKPOINTS / "cnn-dense-cxr3"
PAPER_CNN_PARAMETERS = 15_730_499  # flatten 7x7x512 -> dense 64 -> 3 on the 12-layer trunk (README "The model")
# The shipped recipe has batch norm after each convolution (the authors' code; train/configs/paper.json): each of the
# 3,968 conv channels trades its bias for a BN scale and shift, one parameter more per channel.
BATCH_NORM_EXTRA = 64 * 2 + 128 * 2 + 256 * 2 + 512 * 3 + 512 * 3

LOAD = """
import json, sys
import torch
from transformers import AutoModelForImageClassification
assert "modeling_cnn_lstm" not in sys.modules
model = AutoModelForImageClassification.from_pretrained(sys.argv[1], trust_remote_code=True)
print(json.dumps({"parameters": sum(p.numel() for p in model.parameters()), "module": type(model).__module__,
                  "dtype": str(next(model.parameters()).dtype), "head": model.config.head_type}))
"""


@pytest.mark.parametrize("folder", sorted(path for path in CHECKPOINTS.iterdir() if path.is_dir()),
                         ids=lambda path: path.name)  # fmt: skip
def test_checkpoint_code_is_the_packages(folder: Path):
    copies = sorted(folder.glob("*.py"))
    assert {path.name for path in copies} >= {"configuration_cnn_lstm.py", "modeling_cnn_lstm.py",
                                              "image_processing_cnn_lstm.py", "lung_region_cnn_lstm.py"}  # fmt: skip
    for copy in copies:
        package = REPO_ROOT / "modeling_cnn_lstm" / copy.name
        assert copy.read_bytes() == package.read_bytes(), f"{copy} differs from {package}: copy the package's file"


@pytest.mark.slow
def test_cnn_loads_in_a_fresh_process_with_the_papers_size(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", LOAD, str(CNN)], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = PAPER_CNN_PARAMETERS + BATCH_NORM_EXTRA  # 15,734,467
    assert loaded == {**loaded, "parameters": expected, "dtype": "torch.float32", "head": "dense"}
    assert "transformers_modules" in loaded["module"]


def test_the_same_network_without_batch_norm_has_the_papers_count():
    from modeling_cnn_lstm import CnnLstmConfig, CnnLstmForImageClassification

    config = json.loads((CNN / "config.json").read_text())
    assert config["use_batch_norm"] is True
    plain = CnnLstmForImageClassification(CnnLstmConfig(head_type="dense", use_batch_norm=False))
    assert sum(parameter.numel() for parameter in plain.parameters()) == PAPER_CNN_PARAMETERS


def test_cnn_folder_ships_like_the_cnn_lstm():
    config = json.loads((CNN / "config.json").read_text())
    assert config["head_type"] == "dense" and config["fc_size"] == 64 and config["dtype"] == "float32"
    assert config["crop_to_lungs"] is True  # the same recipe as the CNN-LSTM (train/configs/lungs_cpu_cnn.json)
    for shard in sorted(CNN.glob("model*.safetensors")):
        assert shard.stat().st_size <= 15 * 1000**2 + 64 * 1024, shard
        with safe_open(shard, "pt") as handle:
            assert {str(handle.get_slice(name).get_dtype()) for name in handle.keys()} <= {"F16", "I64"}  # noqa: SIM118
    report = json.loads((CNN / "report" / "metrics.json").read_text())
    assert report["num_samples"] == 209 and report["shortcut_audit"]["gate"]["passed"]
    comparison = json.loads((CNN / "report" / "comparison.json").read_text())
    assert comparison == json.loads((CHECKPOINTS / "cnn-lstm-cxr3" / "report" / "comparison.json").read_text())
    assert comparison["metrics"]["CNN"]["accuracy"] == pytest.approx(report["metrics"]["accuracy"], abs=1e-6)
    for folder, other in ((CNN, "cnn-lstm-cxr3"), (CHECKPOINTS / "cnn-lstm-cxr3", "cnn-dense-cxr3")):
        card = (folder / "README.md").read_text()
        assert f"](../{other})" in card and comparison["verdict"] in card and "{{" not in card
