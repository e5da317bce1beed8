"""The unchanged `train/run.py` under `torchrun --nproc_per_node 2`: two CPU processes, gloo, tiny config."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import load_from_disk

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.shared_data
def test_torchrun_two_cpu_processes(tiny_corpus: Path, tmp_path: Path, tiny_args):
    output_dir = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # rendezvous on a free local port
        "--nproc_per_node",
        "2",
        "train/run.py",
        *tiny_args(tiny_corpus, output_dir, "--ddp_backend", "gloo", "--bootstrap_samples", "20"),
    ]
    # own session: on a timeout the whole group (torchrun and its workers) is killed, no orphans left behind
    proc = subprocess.Popen(
        command,
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        pytest.fail(f"torchrun timed out:\n{stderr[-6000:]}")
    assert proc.returncode == 0, stderr[-6000:]
    report = json.loads((output_dir / "final" / "report" / "metrics.json").read_text())
    assert report["run"]["world_size"] == 2
    # every test image evaluated exactly once although the two ranks each saw half of them
    test_size = load_from_disk(str(tiny_corpus))["test"].num_rows
    assert report["num_samples"] == sum(map(sum, report["metrics"]["confusion_matrix"])) == test_size
    state = json.loads((output_dir / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert any("train_accuracy" in entry for entry in state["log_history"])
    assert not list(output_dir.glob(".final.*"))
