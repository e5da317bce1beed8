"""A finished checkpoint loaded the way its users get it, for the evaluation scripts (`scripts/evaluate_checkpoint.py`,
`scripts/shortcut_audit.py`): remote code, float32 weights, eval mode, its own image processor.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification, PreTrainedModel


def resolve_device(device: str) -> torch.device:
    """`auto` -> cuda where available, else cpu; any other name as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_checkpoint(
    model_id: str, device: str = "auto", revision: str | None = None
) -> tuple[PreTrainedModel, Any, list[str]]:
    """(model on `device` in eval mode, its image processor, its label names in index order) of a folder or Hub id."""
    model = AutoModelForImageClassification.from_pretrained(
        model_id, trust_remote_code=True, revision=revision, dtype=torch.float32
    )
    model = model.to(resolve_device(device)).eval()
    processor = AutoImageProcessor.from_pretrained(model_id, trust_remote_code=True, revision=revision)
    label_names = [model.config.id2label[index] for index in range(model.config.num_labels)]
    return model, processor, label_names
