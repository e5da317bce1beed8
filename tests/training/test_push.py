"""`--push_to_hub` end to end against the local Hub stand-in: the files arrive, and the pushed checkpoint loads
back through `from_pretrained(..., trust_remote_code=True)` with the same logits as the local folder. The run gets its
credentials from `--hub_token` only, and the token is in none of the files it writes (TrainingArguments are pickled
into every checkpoint's training_args.bin).

The pushing and pulling code runs in subprocesses: huggingface_hub reads HF_ENDPOINT at import time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.hub_standin import HubStandIn, hub_env, run_python

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO_ROOT / "train" / "configs" / "tiny.json"
MODEL_ID = "standin-user/cnn-lstm-tiny"
SECRET = "hf_secret-token-for-this-test-only"
METRIC_ID = "standin-user/cxr_metrics"
DATA_ID = "standin-user/tiny-cxr"


def assert_token_nowhere(output_dir: Path) -> None:
    """The checkpoints' training_args.bin hold no token (loaded, and as bytes), nor does any other file of the run."""
    import torch

    saved = sorted(output_dir.rglob("training_args.bin"))
    assert saved, "the tiny run saved no checkpoint"
    for path in saved:
        assert torch.load(path, weights_only=False).hub_token is None, path
    leaking = [str(path) for path in output_dir.rglob("*") if path.is_file() and SECRET.encode() in path.read_bytes()]
    assert leaking == [], f"the hub token was written to {leaking}"


@pytest.mark.slow
@pytest.mark.shared_data
def test_push_round_trip(hub_standin: HubStandIn, tiny_corpus: Path, tmp_path: Path):
    """Dataset from the Hub (--dataset_name) -> train -> model, card, plots and metric module to the Hub -> load."""
    env = hub_env(hub_standin.endpoint, tmp_path / "hf-home")
    run_python(
        f"from datasets import load_from_disk; load_from_disk({str(tiny_corpus)!r}).push_to_hub({DATA_ID!r})", env
    )
    output_dir = tmp_path / "run"
    data = ["--config", str(TINY_CONFIG), "--dataset_name", DATA_ID, "--output_dir", str(output_dir)]
    run_env = {key: value for key, value in env.items() if key != "HF_TOKEN"}  # --hub_token is the only credential
    command = [
        sys.executable,
        "train/run.py",
        *data,
        "--bootstrap_samples",
        "20",
        "--push_to_hub",
        "--hub_model_id",
        MODEL_ID,
        "--push_metric_to_hub",
        METRIC_ID,
        "--hub_token",
        SECRET,
    ]
    proc = subprocess.run(command, env=run_env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    final = output_dir / "final"
    assert_token_nowhere(output_dir)

    local_files = sorted(str(p.relative_to(final)) for p in final.rglob("*") if p.is_file())
    pushed = hub_standin.list_files(MODEL_ID)
    assert set(local_files) <= set(pushed), set(local_files) - set(pushed)
    for name in ("model.safetensors", "README.md", "config.json", "report/confusion_matrix.png"):
        assert hub_standin.read_file(MODEL_ID, name) == (final / name).read_bytes(), name
    assert not [name for name in pushed if "checkpoint-" in name], "intermediate checkpoints must not be pushed"
    space_files = hub_standin.list_files(METRIC_ID, repo_type="space")
    assert {"cxr_metrics.py", "README.md", "app.py"} <= set(space_files)

    code = textwrap.dedent(
        f"""
        import json
        import evaluate, torch
        from transformers import AutoModelForImageClassification

        remote = AutoModelForImageClassification.from_pretrained({MODEL_ID!r}, trust_remote_code=True)
        local = AutoModelForImageClassification.from_pretrained({str(final)!r}, trust_remote_code=True)
        pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            remote_logits = remote(pixel_values=pixels).logits
            local_logits = local(pixel_values=pixels).logits
        metric = evaluate.load({METRIC_ID!r})
        accuracy = metric.compute(predictions=[[0.9, 0.05, 0.05], [0.1, 0.8, 0.1]], references=[0, 2])["accuracy"]
        print(json.dumps({{
            "equal": torch.equal(remote_logits, local_logits),
            "remote_module": type(remote).__module__,
            "temperature": remote.config.calibration_temperature,
            "labels": remote.config.id2label,
            "accuracy": accuracy,
        }}))
        """
    )
    result = json.loads(run_python(code, env, cwd=tmp_path).strip().splitlines()[-1])
    assert result["equal"], "logits through the Hub differ from the local folder"
    assert "transformers_modules" in result["remote_module"], "the model did not load as remote code"
    config = json.loads((final / "config.json").read_text())
    assert result["temperature"] == pytest.approx(config["calibration_temperature"])
    assert result["labels"] == config["id2label"]
    assert result["accuracy"] == pytest.approx(0.5)
    card = (final / "README.md").read_text()
    assert f'datasets: ["{DATA_ID}"]' in card  # the Hub dataset is named in the card's metadata
    assert not hub_standin.unknown_requests, hub_standin.unknown_requests
