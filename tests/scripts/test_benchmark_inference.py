"""The inference benchmark runs end to end on the paper model and reports comparable numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "benchmark_inference.py"


@pytest.mark.slow
def test_benchmark_prints_a_row_per_path_and_thread(cxr3_dir, tmp_path):
    env = {**os.environ, "CNN_LSTM_ONNX_CACHE": str(tmp_path / "onnx")}

    def run(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, str(SCRIPT), "--data_dir", str(cxr3_dir), *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)

    completed = run("--num_images", "3", "--repeats", "2", "--threads", "1", "--paths", "model_bf16",
                    "model_onnxruntime", "--output_json", str(tmp_path / "result.json"))
    assert completed.returncode == 0, completed.stderr[-2000:]
    printed = completed.stdout
    result = json.loads((tmp_path / "result.json").read_text())
    assert [row["path"] for row in result["rows"]] == ["eager_fp32", "model_bf16", "model_onnxruntime"]
    for row in result["rows"]:
        assert row["p50_s"] > 0 and row["p95_s"] >= row["p50_s"]
        assert 0 <= row["top1_agreement"] <= 3
        assert f"| {row['path']} | 1 |" in printed
    eager, _, onnx = result["rows"]
    assert eager["speedup_vs_eager"] == 1.0 and eager["max_probability_difference"] == 0.0
    assert onnx["top1_agreement"] == 3 and onnx["max_probability_difference"] < 1e-5  # exact fp32 graph

    refused = run("--paths", "tensorrt")
    assert refused.returncode != 0 and "unknown path" in refused.stderr
