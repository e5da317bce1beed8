"""`RunContext`: the parsed arguments of one `train/run.py` invocation plus what `experiment.prepare` derived.

Its own module because every stage takes it (experiment, cross-validation, progressive resizing, the card facts)
and none of them should have to import another stage to name its type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainingArguments

from train.training.arguments import DataArguments, EvaluationArguments, ModelArguments
from train.training.input_pipeline import CachedSplit


@dataclass
class RunContext:
    """Parsed arguments plus what `prepare` derived from them."""

    model_args: ModelArguments
    data_args: DataArguments
    eval_args: EvaluationArguments
    training_args: TrainingArguments
    label_names: list[str]
    splits: dict[str, CachedSplit]
    metric: Any
    data_info: dict[str, Any]
    push_to_hub: bool = False  # taken from TrainingArguments: the Trainer itself never pushes checkpoints
    sources: dict[str, Any] = field(default_factory=dict)  # the selected datasets.Dataset per split (other sizes)
    cache_dir: Path | None = None
    precision_reason: str = ""
    hub_token: str | None = field(default=None, repr=False)  # --hub_token, kept out of TrainingArguments (pickled)
