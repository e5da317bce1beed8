"""The inference benchmark runs end to end on a tiny checkpoint and the example X-rays and reports comparable
numbers: a row per path and thread count, and what `auto` chose, why, and how fast that is against eager fp32."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from modeling_cnn_lstm.fast_inference_cnn_lstm import cpu_has_native_bf16

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "benchmark_inference.py"


@pytest.mark.slow
def test_benchmark_prints_a_row_per_path_and_thread(tmp_path, make_checkpoint):
    make_checkpoint(tmp_path / "checkpoint")

    def run(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, str(SCRIPT), "--model", str(tmp_path / "checkpoint"), *args]
        return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)

    paths = ["channels_last_fp32", "autocast_bf16", "runner_torch", "runner_onnxruntime", "runner_bf16", "runner_auto"]
    completed = run("--num_images", "3", "--repeats", "2", "--threads", "1", "--paths", *paths, "--emulated_bf16",
                    "--output_json", str(tmp_path / "result.json"))
    assert completed.returncode == 0, completed.stderr[-2000:]
    printed = completed.stdout
    result = json.loads((tmp_path / "result.json").read_text())
    rows = {row["path"]: row for row in result["rows"]}
    assert list(rows) == ["eager_fp32", *paths]  # the baseline first
    for name, row in rows.items():
        assert row["p50_s"] > 0 and row["p95_s"] >= row["p50_s"] and row["build_s"] >= 0
        assert 0 <= row["top1_agreement"] <= 3
        assert f"| {name} | 1 |" in printed
    eager = rows["eager_fp32"]
    assert eager["speedup_vs_eager"] == 1.0 and eager["max_probability_difference"] == 0.0
    for name in ("runner_torch", "runner_onnxruntime", "channels_last_fp32"):  # fp32 paths: the same numbers
        assert rows[name]["top1_agreement"] == 3 and rows[name]["max_probability_difference"] < 1e-5, name
    assert rows["runner_bf16"]["max_probability_difference"] < 0.03
    (auto,) = result["auto"]
    assert auto["threads"] == 1 and auto["backend"] in ("torch", "channels_last", "onnxruntime", "bf16")
    assert auto["trial_p50_s"]["torch"] > 0 and auto["reason"]
    if auto["backend"] != "torch":  # chosen only for beating eager fp32 in its own trial
        assert auto["trial_p50_s"][auto["backend"]] < auto["trial_p50_s"]["torch"]
    assert rows["runner_auto"]["note"] == f"chose {auto['backend']}"
    assert f"auto, 1 thread(s): chose {auto['backend']} (" in printed and auto["reason"] in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "result.json"]  # nothing cached on disk

    if not cpu_has_native_bf16():  # emulated bf16 autocast takes minutes on the paper model: skipped unless asked
        default = run("--num_images", "2", "--repeats", "1", "--threads", "1", "--paths", "autocast_bf16",
                      "--output_json", str(tmp_path / "default.json"))
        assert default.returncode == 0, default.stderr[-2000:]
        skipped = json.loads((tmp_path / "default.json").read_text())
        assert [row["path"] for row in skipped["rows"]] == ["eager_fp32"] and "autocast_bf16" in skipped["skipped"]
        assert "| autocast_bf16 | - |" in default.stdout and "--emulated_bf16" in default.stdout

    refused = run("--paths", "tensorrt")
    assert refused.returncode != 0 and "unknown path" in refused.stderr
