"""Loading the served model: where it is (`--model`, the environment, or the checkpoint under the app's home), and
`load_classifier`, which loads it with the app's own classes and says in a sentence why it cannot (`ModelUnavailable`).
Without a trained checkpoint the app starts and says how to get one.

Where the default checkpoint and the example X-rays are: under the app's home folder, the one that holds
`checkpoints/` and `examples/`. `app.py` passes its own folder; without one the current directory is used, so an
installed (non-editable) copy of this package never looks inside site-packages for them.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modeling_cnn_lstm.image_processing_cnn_lstm import CnnLstmImageProcessor

from .saliency import Explainer, SaliencySettings

logger = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = Path("checkpoints") / "cnn-lstm-cxr3"  # the trained model, relative to the app's home
EXAMPLES_SUBDIR = Path("examples")
ENV_MODEL, ENV_REVISION, ENV_DEVICE = "CNN_LSTM_MODEL", "CNN_LSTM_REVISION", "CNN_LSTM_DEVICE"
# The paper's competitive CNN (dense head), shown beside the CNN-LSTM when asked: a folder or Hub id, "off" for none.
COMPANION_SUBDIR, ENV_COMPANION = Path("checkpoints") / "cnn-dense-cxr3", "CNN_LSTM_COMPANION"
TRAIN_COMMAND = (  # the CPU recipe (about 2 hours on 2 cores); train/configs/paper.json is the GPU one
    "python train/run.py --config train/configs/paper_cpu.json --data_dir ../shared/data/cxr3 "
    "--output_dir runs/cnn-lstm-cxr3-cpu --final_model_dir checkpoints/cnn-lstm-cxr3"
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelUnavailable(RuntimeError):
    """No usable model; the message tells the user what to do."""


def no_model_message(reason: str) -> str:
    return (
        f"**No trained model is installed.** {reason}\n\n"
        f"Train one: `{TRAIN_COMMAND}` (writes `checkpoints/cnn-lstm-cxr3`, the folder this app serves by default), "
        f"or point the app to a checkpoint: `python app.py --model PATH_OR_HUB_ID`, or set `{ENV_MODEL}` "
        f"(and `{ENV_REVISION}` for a Hub revision)."
    )


def app_home(home: str | Path | None = None) -> Path:
    """The folder holding `checkpoints/` and `examples/`: `home` when given (app.py passes its own folder), else the
    current directory."""
    return Path(home).resolve() if home is not None else Path.cwd()


def default_checkpoint(home: str | Path | None = None) -> Path:
    return app_home(home) / CHECKPOINT_SUBDIR


def resolve_source(
    model: str | None = None, revision: str | None = None, home: str | Path | None = None
) -> tuple[str, str | None]:
    """`--model` beats the environment, which beats the checkpoint folder under the app's home."""
    source = model or os.environ.get(ENV_MODEL) or str(default_checkpoint(home))
    return source, revision or os.environ.get(ENV_REVISION) or None


def resolve_companion(home: str | Path | None = None) -> str | None:
    """The competitive CNN to offer beside the served model: $CNN_LSTM_COMPANION (a folder or Hub id; "off": none),
    else checkpoints/cnn-dense-cxr3 under the app's home when it is there. Loaded only when a user asks for it."""
    chosen = os.environ.get(ENV_COMPANION)
    if chosen:
        return None if chosen.lower() in ("off", "none", "0") else chosen
    folder = app_home(home) / COMPANION_SUBDIR
    return str(folder) if (folder / "config.json").is_file() else None


@dataclass
class LoadedClassifier:
    model: torch.nn.Module
    processor: CnnLstmImageProcessor
    explainer: Explainer
    labels: list[str]
    source: str  # shown to users: the path or Hub id, and the revision
    black: torch.Tensor  # the processor's output for a black image: the IG baseline
    runner: Any = None  # CnnLstmFastInference for Occlusion once `choose_fast_path` ran; until then eager fp32
    path: str = ""  # what was loaded: a folder or Hub id ...
    revision: str | None = None  # ... at this revision

    @property
    def temperature(self) -> float:
        return float(self.model.config.calibration_temperature)


def load_classifier(source: str, revision: str | None = None, settings: SaliencySettings | None = None):
    """A local checkpoint folder or Hub id -> `LoadedClassifier`; `ModelUnavailable` with a user message otherwise.
    Our own classes load it (never remote code): the app runs only the code it ships with."""
    from transformers import AutoConfig

    from modeling_cnn_lstm.modeling_cnn_lstm import CnnLstmForImageClassification

    path = Path(source).expanduser()
    if path.parts[-2:] == CHECKPOINT_SUBDIR.parts and not path.is_dir():
        raise ModelUnavailable(no_model_message("The default folder `checkpoints/cnn-lstm-cxr3` is not there yet."))
    if path.exists() and not (path / "config.json").is_file():
        raise ModelUnavailable(no_model_message(f"`{source}` has no config.json: it is not a checkpoint folder."))
    if not path.exists() and not _HUB_ID.match(source):
        raise ModelUnavailable(no_model_message(f"`{source}` is neither a folder nor a Hub id (owner/name)."))
    at = f" at revision {revision}" if revision else ""
    try:
        config = AutoConfig.from_pretrained(source, revision=revision)
        if config.model_type != "cnn_lstm":
            raise ModelUnavailable(no_model_message(f"`{source}` is a {config.model_type} model, not a CNN-LSTM."))
        model = CnnLstmForImageClassification.from_pretrained(source, revision=revision)
    except ModelUnavailable:
        raise
    except Exception as error:  # noqa: BLE001 - offline, missing repo, damaged weights: say which, keep running
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelUnavailable(no_model_message(f"Loading `{source}`{at} failed: {first_line}")) from None
    try:
        processor = CnnLstmImageProcessor.from_pretrained(source, revision=revision)
    except Exception:  # noqa: BLE001 - a folder without preprocessor_config.json: the config has what is needed
        processor = CnnLstmImageProcessor.from_model_config(model.config)
    if (processor.size["height"], processor.size["width"]) != (model.config.image_size,) * 2:
        raise ModelUnavailable(
            no_model_message(
                f"`{source}`{at} is inconsistent: its processor resizes to {processor.size['height']}x"
                f"{processor.size['width']} but the model takes {model.config.image_size}x{model.config.image_size}."
            )
        )
    device = os.environ.get(ENV_DEVICE) or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = model.to(device).eval()
        explainer = Explainer(model, settings)
        black = processor(np.zeros((8, 8, 1), np.float32), return_tensors="pt")["pixel_values"][:, :, :1, :1]
        size = processor.size
        black = black.expand(1, -1, size["height"], size["width"]).contiguous()
        with torch.inference_mode():  # warm-up: first-call allocations before users come
            model(pixel_values=black.to(device))
    except Exception as error:  # noqa: BLE001 - a bad device setting or a broken checkpoint: say so, keep running
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        reason = f"Preparing `{source}`{at} on {device} failed: {first_line}"
        raise ModelUnavailable(no_model_message(reason)) from None
    labels = [model.config.id2label[index] for index in range(model.config.num_labels)]
    logger.info("serving %s%s on %s", source, at, device)
    release_freed_memory()  # the float16 shards' temporary copies
    shown = f"{source}{at}"
    return LoadedClassifier(model, processor, explainer, labels, shown, black, path=source, revision=revision)


def choose_fast_path(classifier: LoadedClassifier) -> str:
    """Give Occlusion's 49 gradient-free forwards the fastest CPU path that matches eager fp32. The candidates are
    timed in a separate process (cxr_app/fast_path_trial.py: its memory goes back when it exits), then only the
    winner is built here. Seconds of CPU: the app runs this in its low-priority worker after start-up
    (`CxrDemo.start_fast_path`), never on the start-up path; until it is done, and if the trial fails, Occlusion
    runs in eager fp32 like everything else. Predictions and gradient maps always keep the eager fp32 graph (a
    prediction needs its Grad-CAM). Returns the backend now used."""
    if next(classifier.model.parameters()).device.type != "cpu":
        return "not on a CPU: eager"
    command = [sys.executable, "-m", "cxr_app.fast_path_trial", classifier.path,
               *([classifier.revision] if classifier.revision else []), "--threads", str(torch.get_num_threads())]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}  # the files are local or in the cache: the app loaded them
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment,
                               cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    if completed.returncode != 0:
        tail = (completed.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the fast-path trial failed ({completed.returncode}): {tail}")
    decision = json.loads(completed.stdout.strip().splitlines()[-1])
    runner = classifier.model.fast_cpu_inference(decision["backend"])  # the winner only, checked against eager fp32
    runner.timings, runner.reason = decision["timings"], f"{decision['reason']} (trial in a separate process)"
    classifier.runner = runner
    classifier.explainer.no_grad_logits = runner  # one attribute write: Occlusion switches atomically
    release_freed_memory()
    logger.info("Occlusion now runs on %s: %s", runner.backend, runner.reason)
    return runner.backend


def release_freed_memory() -> None:
    """Hand freed heap pages back to the system (glibc keeps them otherwise, and the RSS would stay at its peak)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
