"""The Trainer side: model construction, `CxrTrainer` (device-side input transform, training accuracy), metrics.

`CxrTrainer` differs from `transformers.Trainer` in three small ways, each for a measured reason:
- `_prepare_inputs` turns the uint8 batch into normalized float ON the device (`DeviceBatchTransform`), with the
  paper's random rotation while the model is in training mode (scripts/benchmark_train.py: the input path, not the GPU,
  limited the Trainer when the collate made floats on the CPU);
- `compute_loss` also counts correct training predictions on the device (no per-step sync), and `log` reports them
  as `train_accuracy` next to the Trainer's `loss`, so the report can draw the paper's training accuracy curve;
- the model's loss is a plain mean, so the Trainer is told not to pass `num_items_in_batch` (gradient accumulation
  then divides by the number of micro-batches, which is right for a mean loss).
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from transformers import EvalPrediction, Trainer, TrainerCallback, TrainerState, TrainingArguments

from modeling_cnn_lstm import CnnLstmConfig, CnnLstmForImageClassification, CnnLstmImageProcessor
from train.training.arguments import ModelArguments
from train.training.input_pipeline import CachedSplit, DeviceBatchTransform, collate_uint8
from train.training.source_adversary import SourceAdversary

logger = logging.getLogger(__name__)
SCALAR_KEYS = ("accuracy", "macro_precision", "macro_sensitivity", "macro_specificity", "macro_f1", "macro_auc")
PER_CLASS_KEYS = ("sensitivity", "specificity", "f1", "auc")


def build_model(model_args: ModelArguments) -> CnnLstmForImageClassification:
    """A fresh model from the options, or a checkpoint whose architecture must agree with any option given."""
    if model_args.model_name_or_path is None:
        return CnnLstmForImageClassification(model_args.build_config())
    model = CnnLstmForImageClassification.from_pretrained(model_args.model_name_or_path, dtype=torch.float32)
    defaults = ModelArguments().architecture()
    given = {key: value for key, value in model_args.architecture().items() if value != defaults.get(key)}
    clashes = {key: (value, getattr(model.config, key)) for key, value in given.items()
               if value != getattr(model.config, key)}  # fmt: skip
    if clashes:
        raise ValueError(f"options differ from the checkpoint's architecture (option, checkpoint): {clashes}")
    model.config.calibration_temperature = 1.0  # calibrate afresh after fine-tuning
    return model


def batch_transform_for(
    config: CnnLstmConfig, rotation_degrees: float, channels_last: bool, outside_lung_swap: float = 0.0
) -> DeviceBatchTransform:
    return DeviceBatchTransform(
        config.image_mean, config.image_std, config.num_channels, rotation_degrees, channels_last, outside_lung_swap
    )


def _metric_name(label: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", label.lower()).strip("_")


def flatten_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The metric module's nested result -> flat scalars for the Trainer's logs (undefined values left out)."""
    flat = {key: result[key] for key in (*SCALAR_KEYS, "ece", "nll") if result.get(key) is not None}
    for name, values in result["per_class"].items():
        for key in PER_CLASS_KEYS:
            if values.get(key) is not None:
                flat[f"{key}_{_metric_name(name)}"] = values[key]
    return {key: float(value) for key, value in flat.items()}


class ComputeMetrics(TrainerCallback):
    """`compute_metrics` for the Trainer, backed by the project's `evaluate` module.

    With `selection_window` N > 1 it also returns `macro_f1_smoothed`: the mean macro-F1 of this evaluation and the
    N - 1 before it, read from the Trainer's log history (which a resumed run restores). It is also one of the
    Trainer's callbacks: `on_train_begin` hands it the Trainer's state, so nothing is attached from outside.
    """

    def __init__(self, metric: Any, label_names: list[str], ece_bins: int, selection_window: int = 1) -> None:
        self.metric, self.label_names, self.ece_bins = metric, label_names, ece_bins
        self.selection_window = selection_window
        self._state: TrainerState | None = None

    def on_train_begin(self, args: Any, state: TrainerState, control: Any, **kwargs: Any) -> None:
        self._state = state

    def previous(self) -> list[float]:
        """Validation macro-F1 of the evaluations so far, oldest first."""
        history = self._state.log_history if self._state is not None else []
        return [entry["eval_macro_f1"] for entry in history if "eval_macro_f1" in entry]

    def __call__(self, prediction: EvalPrediction) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        result = self.metric.compute(
            predictions=np.asarray(logits, dtype=np.float64),
            references=np.asarray(prediction.label_ids, dtype=np.int64),
            label_names=self.label_names,
            input_type="logits",
            ece_bins=self.ece_bins,
        )
        flat = flatten_metrics(result)
        if self.selection_window > 1:
            earlier = list(self.previous())[-(self.selection_window - 1) :]
            values = [*earlier, flat["macro_f1"]]
            flat["macro_f1_smoothed"] = float(sum(values) / len(values))
        return flat


def build_compute_metrics(
    metric: Any, label_names: list[str], ece_bins: int, selection_window: int = 1
) -> ComputeMetrics:
    return ComputeMetrics(metric, label_names, ece_bins, selection_window)


class CxrTrainer(Trainer):
    """`Trainer` with the device-side uint8 input transform and an on-device training-accuracy counter."""

    def __init__(
        self,
        *args: Any,
        batch_transform: DeviceBatchTransform,
        adversary: SourceAdversary | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("data_collator", collate_uint8)
        super().__init__(*args, **kwargs)
        self.batch_transform = batch_transform
        self.adversary = adversary.to(self.args.device) if adversary is not None else None
        self.model_accepts_loss_kwargs = False
        self._train_correct: torch.Tensor | None = None
        self._train_seen = 0

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        inputs = super()._prepare_inputs(inputs)
        lung_mask = inputs.pop("lung_mask", None)
        pixel_values = inputs.get("pixel_values")
        if isinstance(pixel_values, torch.Tensor) and pixel_values.dtype == torch.uint8:
            inputs["pixel_values"] = self.batch_transform(pixel_values, self.model.training, lung_mask)
        return inputs

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer plus the source adversary's parameters (training only, never saved in the model)."""
        first = self.optimizer is None
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        if first and self.adversary is not None:
            optimizer.add_param_group({"params": list(self.adversary.parameters()), "weight_decay": 0.0})
        return optimizer

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        labels = inputs.get("labels")
        source_ids = inputs.pop("source_ids", None)
        adversary = self.adversary if model.training and source_ids is not None else None
        with adversary.watch(model) if adversary is not None else contextlib.nullcontext():
            loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
        if adversary is not None:
            progress = self.state.global_step / max(1, self.state.max_steps)
            loss = loss + adversary.loss(labels, source_ids, progress)
        if model.training and labels is not None:
            logits = outputs["logits"] if isinstance(outputs, dict) else outputs[1]
            correct = (logits.detach().argmax(dim=-1) == labels).sum()  # stays on the device: no sync
            self._train_correct = correct if self._train_correct is None else self._train_correct + correct
            self._train_seen += labels.numel()  # known on the host: no host-to-device copy per step
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds `train_accuracy` (since the previous training log, all processes) to the Trainer's loss logs."""
        if "loss" in logs and self._train_correct is not None:
            seen = torch.tensor(float(self._train_seen), device=self._train_correct.device)  # once per log only
            counts = torch.stack([self._train_correct.float(), seen])
            if self.args.world_size > 1:
                counts = self.accelerator.reduce(counts, reduction="sum")
            correct, seen = counts.tolist()
            logs["train_accuracy"] = correct / seen if seen else math.nan
            self._train_correct, self._train_seen = None, 0
        super().log(logs, start_time)


def make_trainer(
    model: CnnLstmForImageClassification,
    args: TrainingArguments,
    train_split: CachedSplit | None,
    eval_split: CachedSplit | None,
    batch_transform: DeviceBatchTransform,
    compute_metrics: Callable | None = None,
    callbacks: list | None = None,
    adversary: SourceAdversary | None = None,
) -> CxrTrainer:
    """A `CxrTrainer` over cached splits; the processor travels with the checkpoints (`processing_class`)."""
    return CxrTrainer(
        model=model,
        args=args,
        train_dataset=train_split.torch_dataset() if train_split is not None else None,
        eval_dataset=eval_split.torch_dataset() if eval_split is not None else None,
        processing_class=CnnLstmImageProcessor.from_model_config(model.config),
        compute_metrics=compute_metrics,
        callbacks=callbacks,
        batch_transform=batch_transform,
        adversary=adversary,
    )


def predict_logits(trainer: CxrTrainer, split: CachedSplit) -> np.ndarray:
    """Logits (n, c) for a split in its original order (the config's temperature applied, normally 1 here), from
    the exact fp32 graph whatever the training precision: the report and the temperature then describe the model as
    it ships and runs (a bf16-autocast prediction differs by up to a few hundredths in probability). Not through
    `Trainer.predict`, whose model forward accelerate wraps in autocast; in DDP every process scores the whole split.
    """
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    device = next(model.parameters()).device
    dataset = split.torch_dataset()
    batch_size = trainer.args.per_device_eval_batch_size
    was_training, chunks = model.training, []
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(dataset), batch_size):
                batch = collate_uint8(dataset.__getitems__(list(range(start, min(start + batch_size, len(dataset))))))
                pixel_values = trainer.batch_transform(batch["pixel_values"].to(device), train=False)
                chunks.append(model(pixel_values=pixel_values).logits.float().cpu().numpy())
    finally:
        model.train(was_training)
    if not chunks:
        return np.zeros((0, model.config.num_labels))
    return np.concatenate(chunks).astype(np.float64)


def best_epoch(log_history: list[dict[str, Any]], metric: str, greater_is_better: bool) -> float | None:
    """The epoch of the best evaluation in a Trainer log history (None when nothing was evaluated)."""
    key = metric if metric.startswith("eval_") else f"eval_{metric}"
    evaluations = [entry for entry in log_history if key in entry]
    if not evaluations:
        return None
    chosen = (max if greater_is_better else min)(evaluations, key=lambda entry: entry[key])
    return float(chosen["epoch"])
