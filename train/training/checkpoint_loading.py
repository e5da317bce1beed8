"""A finished checkpoint loaded for the evaluation and benchmark scripts (`scripts/evaluate_checkpoint.py`,
`scripts/shortcut_audit.py`, `scripts/benchmark_inference.py`): float32 weights, eval mode, its own image processor.

This repository's classes load it, never the code stored beside the weights: a folder or Hub id given on the command
line is data, and `trust_remote_code=True` would run whatever Python its author put there. The classes are the same
as those a Hub folder carries (the model package is uploaded with every checkpoint), so the numbers are the same.
"""

from __future__ import annotations

import torch

from modeling_cnn_lstm import CnnLstmConfig, CnnLstmForImageClassification, CnnLstmImageProcessor


class NotACnnLstmCheckpoint(ValueError):
    """The folder or Hub id holds another kind of model; this repository's classes cannot load it."""


def resolve_device(device: str) -> torch.device:
    """`auto` -> cuda where available, else cpu; any other name as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_model_type(model_id: str, revision: str | None = None) -> None:
    """Read config.json only (no code runs) and refuse anything but a CNN-LSTM with a clear message."""
    config, _ = CnnLstmConfig.get_config_dict(model_id, revision=revision)  # the JSON as a dict, no class lookup
    model_type = config.get("model_type")
    if model_type != CnnLstmConfig.model_type:
        raise NotACnnLstmCheckpoint(
            f"{model_id} is a {model_type!r} model, not a CNN-LSTM ({CnnLstmConfig.model_type!r}); these scripts "
            "load only checkpoints of this repository's model, with its own code"
        )


def load_model_and_processor(
    model_id: str, revision: str | None = None
) -> tuple[CnnLstmForImageClassification, CnnLstmImageProcessor]:
    """(model in eval mode on the CPU as float32, its image processor) with this repository's classes; a folder without
    preprocessor_config.json gets the processor the model's config describes."""
    check_model_type(model_id, revision)
    model = CnnLstmForImageClassification.from_pretrained(model_id, revision=revision, dtype=torch.float32).eval()
    try:
        processor = CnnLstmImageProcessor.from_pretrained(model_id, revision=revision)
    except OSError:  # no preprocessor_config.json
        processor = CnnLstmImageProcessor.from_model_config(model.config)
    return model, processor


def load_checkpoint(
    model_id: str, device: str = "auto", revision: str | None = None
) -> tuple[CnnLstmForImageClassification, CnnLstmImageProcessor, list[str]]:
    """(model on `device` in eval mode, its image processor, its label names in index order) of a folder or Hub id."""
    model, processor = load_model_and_processor(model_id, revision)
    model = model.to(resolve_device(device)).eval()
    label_names = [model.config.id2label[index] for index in range(model.config.num_labels)]
    return model, processor, label_names
