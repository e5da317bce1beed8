"""scripts/paper_experiments.sh as a CPU dry run on real X-rays, and scripts/unpack_results.sh on what it packed."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED = "results/checkpoints/cnn-lstm-cxr3"


@pytest.mark.slow
@pytest.mark.shared_data
def test_dry_run_packs_parts_that_unpack_into_a_loadable_checkpoint(mini_cxr3: Path, tmp_path: Path):
    env = dict(os.environ, DRY_RUN="1", DATA_DIR=str(mini_cxr3), WORK_DIR=str(tmp_path / "work"),
               OUT=str(tmp_path / "out"), NUM_FOLDS="3", HF_HOME=str(tmp_path / "hf"))  # fmt: skip
    proc = subprocess.run(
        ["bash", "scripts/paper_experiments.sh"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    parts = sorted((tmp_path / "out").glob("results.tar.part-*"))
    assert parts and all(part.stat().st_size <= 15 * 1024 * 1024 for part in parts)
    assert len(list((tmp_path / "out").iterdir())) <= 8  # what the device tool brings back
    timings = json.loads((tmp_path / "out" / "timings.json").read_text())["steps"]
    for name in ("corpus", "cnn_lstm_final", "shortcut_audit", "cnn_lstm_cv", "benchmark_train", "cnn_final",
                 "cnn_lstm_leaky", "total"):  # fmt: skip
        assert timings[name]["status"] == "ok", (name, proc.stdout[-3000:])
    assert timings["cnn_lstm_final"]["images_per_second"] > 0

    dest = tmp_path / "dest"
    dest.mkdir()
    kept = tmp_path / "results.tar.gz"
    command = ["bash", "scripts/unpack_results.sh", str(tmp_path / "out"), str(dest)]
    unpack_env = dict(os.environ, KEEP_TAR=str(kept))
    unpack = subprocess.run(command, cwd=REPO_ROOT, env=unpack_env, capture_output=True, text=True, timeout=120)
    assert unpack.returncode == 0, unpack.stderr
    with tarfile.open(kept) as tar:
        names = set(tar.getnames())
    for member in ("config.json", "README.md", "preprocessor_config.json", "report/metrics.json"):
        assert f"{SHIPPED}/{member}" in names
    assert any(name.startswith(f"{SHIPPED}/") and name.endswith(".safetensors") for name in names)
    assert "results/timings.json" in names and "results/shortcut_audit/shortcut_audit.json" in names
    # only the shipped model carries weights
    assert not [name for name in names if name.endswith(".safetensors") and not name.startswith(SHIPPED)]

    checkpoint = dest / "checkpoints" / "cnn-lstm-cxr3"
    card = (checkpoint / "README.md").read_text()
    assert "{{" not in card and "### Shortcut audit" in card and "| lungs hidden |" in card
    assert "leaky image-level split" in card and "3-fold cross-validation" in card
    assert (dest / "results" / "timings.json").is_file() and (dest / "results" / "benchmark_train.json").is_file()
    assert not (dest / "results" / "checkpoints").exists()

    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(checkpoint, trust_remote_code=True)
    assert {parameter.dtype for parameter in model.parameters()} == {torch.float32}
    header = json.loads((checkpoint / "config.json").read_text())
    assert header["dtype"] == "float32"
    from safetensors import safe_open

    shard = next(checkpoint.glob("*.safetensors"))
    with safe_open(shard, "pt") as handle:
        assert handle.get_tensor(next(iter(handle.keys()))).dtype in (torch.float16, torch.int64)
