"""The CPU training recipe: precision choice, progressive resizing, smoothed selection, the per-epoch log, and a run
that is killed (SIGKILL) twice and resumed by giving the same command again (scripts/train_cpu.sh)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import EvalPrediction

from modeling_cnn_lstm import CnnLstmConfig, CnnLstmForImageClassification
from modeling_cnn_lstm.fast_inference_cnn_lstm import cpu_flags, cpu_has_native_bf16
from train.training.arguments import ModelArguments
from train.training.hardware import choose_cpu_precision
from train.training.progressive import transfer_weights

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO_ROOT / "train" / "configs" / "tiny.json"

# 3 epochs at 16 px, then 4 at 32 px (6 steps each): long enough to be killed in either stage
PROGRESSIVE = (
    "--low_res_image_size", "16", "--low_res_epochs", "3", "--num_train_epochs", "4", "--max_steps", "-1",
    "--eval_strategy", "epoch", "--save_strategy", "epoch", "--logging_strategy", "epoch",
    "--max_train_samples", "48", "--max_eval_samples", "16", "--bootstrap_samples", "0",
    "--selection_window", "2", "--metric_for_best_model", "macro_f1_smoothed",
)  # fmt: skip
LOG_LINE = re.compile(
    r"^\S+ \S+ (16|32)px epoch (\d+)/(\d+) \| train loss [\d.]+ \| val macro-F1 [\d.]+( \(selection [\d.]+\))? \| "
    r"[\d.]+ img/s \| elapsed \d+:\d\d:\d\d \| ETA \d+:\d\d:\d\d$"
)


def write_cpuinfo(tmp_path: Path, flags: str) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    return path


@pytest.mark.parametrize(
    ("flags", "native"),
    [
        ("fpu sse2 avx2 avx512f avx512_vnni", False),  # AVX-512 Xeon: oneDNN says bf16 "supported", but emulates it
        ("fpu avx2 avx512f avx512_bf16", True),
        ("fpu avx2 avx512f amx_tile amx_bf16", True),
        ("fpu sse2 avx2 fma", False),  # AMD EPYC without AVX-512
    ],
)
def test_cpu_precision_auto_follows_the_cpu_flags(tmp_path: Path, flags: str, native: bool):
    parsed = cpu_flags(write_cpuinfo(tmp_path, flags))
    assert parsed == frozenset(flags.split())
    assert cpu_has_native_bf16(parsed) is native
    use_bf16, reason = choose_cpu_precision("auto", parsed)
    assert use_bf16 is native
    assert ("native bf16" in reason) if native else ("emulated" in reason)


def test_cpu_precision_forced_unknown_and_invalid(tmp_path: Path):
    assert choose_cpu_precision("bf16", frozenset()) == (True, "--cpu_precision bf16")
    assert choose_cpu_precision("fp32", frozenset({"avx512_bf16"})) == (False, "--cpu_precision fp32")
    assert cpu_flags(tmp_path / "missing") == frozenset()
    assert choose_cpu_precision("auto", frozenset())[0] is False  # unknown CPU: never risk emulated bf16
    with pytest.raises(ValueError, match="cpu_precision"):
        choose_cpu_precision("fp16")
    with pytest.raises(ValueError, match="cpu_precision"):
        ModelArguments(cpu_precision="half")


def test_this_machine_never_trusts_onednn_for_bf16():
    """The choice comes from the flags, whatever oneDNN says about emulated support."""
    use_bf16, _ = choose_cpu_precision("auto")
    assert use_bf16 == any(flag in cpu_flags() for flag in ("avx512_bf16", "amx_bf16"))


def test_low_res_arguments_are_checked():
    with pytest.raises(ValueError, match="low_res_image_size"):
        ModelArguments(low_res_epochs=2)  # no size
    with pytest.raises(ValueError, match="low_res_image_size"):
        ModelArguments(low_res_epochs=2, low_res_image_size=224, image_size=224)
    with pytest.raises(ValueError, match="low_res_epochs"):
        ModelArguments(low_res_epochs=-1)
    assert ModelArguments(low_res_image_size=128, low_res_epochs=0).low_res_epochs == 0  # 0 switches it off


def test_transfer_keeps_trunk_and_lstm_and_reinitialises_the_dense_layer():
    small = CnnLstmConfig(
        block_widths=[[8], [16, 16]], image_size=16, lstm_hidden_size=12, fc_size=10, use_batch_norm=True
    )
    torch.manual_seed(0)
    low = CnnLstmForImageClassification(small)
    full = CnnLstmForImageClassification(CnnLstmConfig(**{**small.to_diff_dict(), "image_size": 32}))
    before = {name: tensor.clone() for name, tensor in full.state_dict().items()}
    kept = transfer_weights(low, full)
    assert kept == ["head.fc.weight"]  # 4x4 steps x 12 units at 16 px, 8x8 x 12 at 32 px
    for name, tensor in full.state_dict().items():
        expected = before[name] if name in kept else low.state_dict()[name]
        assert torch.equal(tensor, expected), name
    assert any("lstm" in name for name in full.state_dict()) and any("running_mean" in n for n in full.state_dict())


def test_smoothed_selection_metric_is_the_mean_of_the_last_evaluations():
    import evaluate
    from transformers import TrainerState

    from train.training.hub_folder import METRIC_DIR
    from train.training.trainer import build_compute_metrics

    metric = evaluate.load(str(METRIC_DIR), keep_in_memory=True)
    labels = np.array([0, 1, 2, 0, 1, 2])
    logits = np.eye(3)[[0, 1, 2, 0, 2, 2]] * 4.0
    compute = build_compute_metrics(metric, ["COVID-19", "Normal", "Pneumonia"], 15, selection_window=3)
    first = compute(EvalPrediction(predictions=logits, label_ids=labels))
    assert first["macro_f1_smoothed"] == pytest.approx(first["macro_f1"])  # no history yet
    state = TrainerState(log_history=[{"eval_macro_f1": value} for value in (0.1, 0.2, 0.3)] + [{"loss": 1.0}])
    compute.on_train_begin(None, state, None)  # as the Trainer hands its state to its callbacks
    result = compute(EvalPrediction(predictions=logits, label_ids=labels))
    assert result["macro_f1_smoothed"] == pytest.approx((0.2 + 0.3 + result["macro_f1"]) / 3)
    plain = build_compute_metrics(metric, ["COVID-19", "Normal", "Pneumonia"], 15)
    assert "macro_f1_smoothed" not in plain(EvalPrediction(predictions=logits, label_ids=labels))


@pytest.mark.shared_data
def test_forced_bf16_is_used_and_recorded(tiny_corpus: Path, tmp_path: Path, run_main, tiny_args):
    """--cpu_precision bf16 overrides --bf16 false: the run trains under bf16 autocast and the card says why."""
    flags = ["--cpu_precision", "bf16", "--bf16", "false", "--bootstrap_samples", "0", "--max_steps", "2"]
    final = run_main(tiny_args(tiny_corpus, tmp_path / "bf16", *flags, "--eval_steps", "2", "--save_steps", "2"))
    summary = json.loads((final / "report" / "metrics.json").read_text())["run"]["training_summary"]
    assert "Precision bf16 autocast on the CPU (--cpu_precision bf16)" in summary
    assert json.loads((final / "config.json").read_text())["dtype"] == "float32"  # trained in autocast, saved fp32


def train_cpu_sh(output_dir: Path, data_dir: Path, wait: bool) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        OUTPUT_DIR=str(output_dir),
        CONFIG=str(TINY_CONFIG),
        DATA_DIR=str(data_dir),
        PYTHON=sys.executable,
        WAIT="1" if wait else "0",
    )
    command = ["bash", "scripts/train_cpu.sh", *PROGRESSIVE]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)


def kill_when(output_dir: Path, ready: Callable[[], bool], timeout: float = 600) -> None:
    """SIGKILL the background run as soon as `ready()` (a checkpoint on disk); it must still have been running."""
    pid = int((output_dir / "train.pid").read_text())
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, (output_dir / "run.log").read_text()[-3000:]
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    while Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid):
        time.sleep(0.01)
    assert not (output_dir / "final").exists(), "the run ended before it could be killed"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return "zombie"


def checkpoints(folder: Path) -> list[Path]:
    return [path for path in folder.glob("checkpoint-*") if (path / "trainer_state.json").is_file()]


@pytest.mark.slow
@pytest.mark.shared_data
def test_killed_run_resumes_with_the_same_command_to_the_same_weights(tiny_corpus: Path, tmp_path: Path):
    killed = tmp_path / "killed"
    started = train_cpu_sh(killed, tiny_corpus, wait=False)
    assert started.returncode == 0 and "training in the background" in started.stdout, started.stderr
    assert "already running" in train_cpu_sh(killed, tiny_corpus, wait=False).stdout  # never two runs in one folder
    kill_when(killed, lambda: bool(checkpoints(killed / "stage-16px")))  # killed in the 16 px stage

    assert "training in the background" in train_cpu_sh(killed, tiny_corpus, wait=False).stdout  # same command
    kill_when(killed, lambda: bool(checkpoints(killed)))  # killed again, now in the 32 px stage
    assert (killed / "stage-16px" / "done" / "config.json").is_file()

    finished = train_cpu_sh(killed, tiny_corpus, wait=True)  # the same command, in the foreground this time
    assert finished.returncode == 0, (killed / "run.log").read_text()[-3000:]
    straight = tmp_path / "straight"
    assert train_cpu_sh(straight, tiny_corpus, wait=True).returncode == 0

    resumed_weights = load_file(killed / "final" / "model.safetensors")
    straight_weights = load_file(straight / "final" / "model.safetensors")
    for name, tensor in straight_weights.items():
        assert torch.allclose(tensor, resumed_weights[name], atol=1e-6), f"resume changed {name}"
    for folder in (killed, straight):
        metrics = json.loads((folder / "final" / "report" / "metrics.json").read_text())
        assert "Progressive resizing: first 3 epochs at 16 px" in metrics["run"]["training_summary"]
        assert metrics["run"]["stats"]["low_res_stage"]["reinitialised"] == ["head.fc.weight"]
    assert (json.loads((killed / "final" / "report" / "metrics.json").read_text())["metrics"]
            == json.loads((straight / "final" / "report" / "metrics.json").read_text())["metrics"])  # fmt: skip

    lines = (killed / "training_log.txt").read_text().splitlines()
    epoch_lines = [line for line in lines if " | " in line]
    epochs = [LOG_LINE.match(line) for line in epoch_lines]
    assert all(epochs), [line for line in epoch_lines if not LOG_LINE.match(line)]
    assert sum(" resumed at epoch " in line for line in lines) == 2, lines
    # every epoch of both stages was logged at least once (some twice: the epoch after a kill is redone)
    assert {("16", str(e)) for e in range(1, 4)} <= {(m.group(1), m.group(2)) for m in epochs}
    assert {("32", str(e)) for e in range(1, 5)} <= {(m.group(1), m.group(2)) for m in epochs}
    straight_lines = [line for line in (straight / "training_log.txt").read_text().splitlines() if " | " in line]
    assert len(straight_lines) == 7 and all(LOG_LINE.match(line) for line in straight_lines)


def test_progressive_resizing_is_refused_with_cross_validation(tmp_path: Path, run_main, tiny_args):
    argv = tiny_args(tmp_path / "unused", tmp_path / "out", "--cross_validation", "3", "--low_res_image_size", "16",
                     "--low_res_epochs", "1")  # fmt: skip
    with pytest.raises(ValueError, match="not supported with --cross_validation"):
        run_main(argv)
    assert not (tmp_path / "out").exists()  # refused before anything was written
