"""The final folder (exactly a Hub model repo) written atomically, and publishing it and the metric to the Hub.

Folder contents: config.json (labels, `calibration_temperature`), the remote-code files + `auto_map`,
preprocessor_config.json, safetensors (optionally half precision, sharded; config says float32 so it loads as fp32),
README.md (the rendered card), report/ (metrics.json, report.md, PNG figures). `steps.finalize` assembles it with
`cxr_common.atomic.atomic_folder`, so a failed run never leaves a half-written folder.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch

from modeling_cnn_lstm import CnnLstmForImageClassification, CnnLstmImageProcessor
from train.hub_preflight import PushError, command_line, push_with_retries

logger = logging.getLogger(__name__)
METRIC_DIR = Path(__file__).resolve().parents[1] / "metrics" / "cxr_metrics"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def round_to_save_dtype(model: torch.nn.Module, save_dtype: str) -> None:
    """Round the weights in place to what `save_dtype` stores (they stay float32): the model that is scored is then
    exactly the model that ships in a float16/bfloat16 folder."""
    dtype = DTYPES[save_dtype]
    if dtype == torch.float32:
        return
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(dtype).to(tensor.dtype))


def save_model_files(
    model: CnnLstmForImageClassification,
    folder: Path,
    save_dtype: str = "float32",
    max_shard_size: str = "5GB",
) -> None:
    """Model (a CPU copy: the trained one is left as it is) + processor, with remote code and auto_map."""
    export = copy.deepcopy(model).to("cpu").to(memory_format=torch.contiguous_format).eval()
    export = export.to(DTYPES[save_dtype])
    export.save_pretrained(folder, max_shard_size=max_shard_size)
    if save_dtype != "float32":  # weights stored small; the config asks for float32 so from_pretrained upcasts
        config_path = folder / "config.json"
        config = json.loads(config_path.read_text())
        config["dtype"] = "float32"
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    CnnLstmImageProcessor.from_model_config(model.config).save_pretrained(folder)


def publish(
    folder: Path | None,
    *,
    hub_model_id: str | None = None,
    private: bool | None = None,
    metric_id: str | None = None,
    token: str | None = None,
    token_given: bool = False,
    attempts: int = 4,
    base_wait: float = 2.0,
) -> None:
    """Push the saved model folder and/or the metric module, each retried on transient errors. If a push fails,
    raise one PushError that names what failed, that `folder` is intact, and the command that pushes it later
    (scripts/push_model.py; with `token_given` the command asks for --hub_token again, never carrying the token)."""
    failures = []
    token_flag = ("--hub_token", "YOUR_TOKEN") if token_given else ()
    if hub_model_id is not None and folder is not None:
        try:
            push_with_retries(lambda: push_folder(folder, hub_model_id, token, private),
                              f"{folder} to {hub_model_id}", attempts=attempts, base_wait=base_wait)  # fmt: skip
        except PushError as error:
            words = ["--model_dir", str(folder), "--hub_model_id", hub_model_id, *(["--private"] if private else [])]
            command = command_line("python", "scripts/push_model.py", *words, *token_flag)
            failures.append(f"{error}; the model folder {folder} is intact: push it later with `{command}`")
    if metric_id is not None:
        try:
            push_with_retries(lambda: push_metric(metric_id, token), f"the metric module to the Space {metric_id}",
                              attempts=attempts, base_wait=base_wait)  # fmt: skip
        except PushError as error:
            command = command_line("python", "scripts/push_model.py", "--push_metric_to_hub", metric_id, *token_flag)
            failures.append(f"{error}; push it later with `{command}`")
    if failures:
        raise PushError(". ".join(failures) + ".")


def push_folder(folder: Path, repo_id: str, token: str | None = None, private: bool | None = None) -> str:
    """Create the model repo if needed and upload the whole folder in one commit; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="Upload CNN-LSTM checkpoint")
    logger.info("pushed %s to %s", folder, repo_id)
    return str(getattr(info, "commit_url", info))


def push_metric(repo_id: str, token: str | None = None, private: bool | None = None) -> str:
    """Publish the metric module as a Space; the script is named after the repo, as `evaluate.load` expects."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
    script_name = repo_id.split("/")[-1] + ".py"

    def fill(tmp: Path) -> None:
        for path in METRIC_DIR.iterdir():
            if path.is_file() and path.suffix in (".py", ".md", ".txt") and path.name != "__init__.py":
                target = {"cxr_metrics.py": script_name, "metric_space_app.py": "app.py"}.get(path.name, path.name)
                shutil.copyfile(path, tmp / target)
        app = tmp / "app.py"
        if app.exists():
            app.write_text(app.read_text().replace('"cxr_metrics"', json.dumps(repo_id)))

    with tempfile.TemporaryDirectory() as staging:
        fill(Path(staging))
        info = api.upload_folder(
            repo_id=repo_id, repo_type="space", folder_path=staging, commit_message="Upload cxr_metrics"
        )
    logger.info("pushed the metric module to the Space %s", repo_id)
    return str(getattr(info, "commit_url", info))
