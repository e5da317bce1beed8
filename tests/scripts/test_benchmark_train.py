"""scripts/benchmark_train.py runs on CPU with the tiny config and prints both throughputs and their ratio."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO_ROOT / "train" / "configs" / "tiny.json"


def run_benchmark(*extra: str) -> tuple[str, dict]:
    command = [
        sys.executable,
        "scripts/benchmark_train.py",
        "--model_config",
        str(TINY_CONFIG),
        "--batch_size",
        "8",
        "--num_images",
        "48",
        "--device",
        "cpu",
        *extra,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout, json.loads(proc.stdout.strip().splitlines()[-1])


def check_output(stdout: str, summary: dict) -> None:
    plain = float(re.search(r"plain PyTorch loop:\s+([\d.]+) images/s", stdout).group(1))
    trainer = float(re.search(r"transformers\.Trainer:\s+([\d.]+) images/s", stdout).group(1))
    ratio = float(re.search(r"ratio Trainer / plain:\s+([\d.]+)", stdout).group(1))
    assert plain > 0 and trainer > 0
    assert ratio == pytest.approx(trainer / plain, rel=0.01)
    assert summary["plain_images_per_second"] == pytest.approx(plain, rel=0.01)
    assert summary["trainer_images_per_second"] == pytest.approx(trainer, rel=0.01)
    assert summary["ratio"] == pytest.approx(summary["trainer_images_per_second"] / summary["plain_images_per_second"])
    assert summary["parameters"] == 12915 and summary["batch_size"] == 8


def test_benchmark_fp32_on_cpu(tmp_path):
    stdout, summary = run_benchmark("--steps", "4", "--warmup_steps", "2", "--output_json", str(tmp_path / "b.json"))
    check_output(stdout, summary)
    assert json.loads((tmp_path / "b.json").read_text()) == summary
    assert (summary["bf16"], summary["channels_last"], summary["torch_compile"]) == (False, False, False)


@pytest.mark.slow
def test_benchmark_gpu_options_on_cpu():
    """bf16 autocast, channels_last, torch.compile and a DataLoader worker, both paths, on the CPU."""
    stdout, summary = run_benchmark(
        "--steps", "4", "--warmup_steps", "2", "--bf16", "--channels_last", "--torch_compile", "--num_workers", "1"
    )
    check_output(stdout, summary)
    assert (summary["bf16"], summary["channels_last"], summary["torch_compile"]) == (True, True, True)


def test_cpu_matrix_reports_each_setting_against_eager_fp32():
    stdout, summary = run_benchmark(
        "--cpu_matrix", "--steps", "2", "--warmup_steps", "1", "--settings", "channels_last,bf16", "--threads", "1"
    )
    rows = {row["setting"]: row for row in summary["rows"]}
    assert list(rows) == ["fp32", "channels_last", "bf16"]  # the fp32 baseline is always measured first
    assert rows["fp32"]["ratio_vs_fp32"] == 1.0 and rows["bf16"]["bf16"] and not rows["bf16"]["channels_last"]
    for name, row in rows.items():
        assert row["images_per_second"] > 0 and row["threads"] == 1
        assert row["ratio_vs_fp32"] == pytest.approx(row["images_per_second"] / rows["fp32"]["images_per_second"])
        printed = re.search(rf"threads 1  {name}\s+([\d.]+) images/s  ([\d.]+)x", stdout)
        assert printed and float(printed.group(1)) == pytest.approx(row["images_per_second"], abs=0.01)
    auto = re.search(r"precision auto -> (bf16|fp32) \((.+)\)", stdout)
    assert auto and auto.group(1) == summary["cpu_precision_auto"] and auto.group(2) == summary["cpu_precision_reason"]


def test_cpu_matrix_rejects_unknown_settings():
    command = [sys.executable, "scripts/benchmark_train.py", "--model_config", str(TINY_CONFIG), "--cpu_matrix",
               "--device", "cpu", "--settings", "fp32,fp16"]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "unknown setting 'fp16'" in proc.stderr
