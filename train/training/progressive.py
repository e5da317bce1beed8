"""Progressive resizing: train first at a small input size, then carry the trunk and the LSTM over to the full size.

On a 2-core CPU a 224 px step costs ~3.4x a 128 px step (README, "Training on a CPU"). Convolutions, batch norm and
the LSTM do not depend on the input size, so they carry over; the dense layer after the flatten does not (its input
is steps x LSTM units: 16 x 512 at 128 px, 49 x 512 at 224 px), so the full-size stage starts it afresh.

The low-resolution stage is a Trainer run of its own in `<output_dir>/stage-<size>px/` (checkpoints every epoch,
resumable like the main stage; its log lines go to the same `training_log.txt`); when it ends, its weights are
written to `stage-<size>px/done/`, and a later invocation of the same command loads them instead of training again.
The stage is selected by nothing: its last weights carry over (checkpoint choice happens at full size on validation).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments, set_seed

from cxr_common.atomic import atomic_folder
from modeling_cnn_lstm import CnnLstmForImageClassification
from train.training.context import RunContext
from train.training.dataset_loading import to_cached_split
from train.training.steps import fit

logger = logging.getLogger(__name__)
DONE = "done"
HISTORY = "log_history.json"


def stage_dir(output_dir: str | Path, image_size: int) -> Path:
    return Path(output_dir) / f"stage-{image_size}px"


def low_res_args(args: TrainingArguments, output_dir: Path, epochs: float) -> TrainingArguments:
    """The main run's arguments for the low-resolution stage: its own folder and epochs, no checkpoint choice."""
    return dataclasses.replace(
        args, output_dir=str(output_dir), num_train_epochs=epochs, max_steps=-1, load_best_model_at_end=False
    )


def transfer_weights(source: torch.nn.Module, target: torch.nn.Module) -> list[str]:
    """Copy every tensor whose name and shape agree; returns the names the target keeps as initialised."""
    source_state = source.state_dict()
    target_state = target.state_dict()
    kept = [name for name, tensor in target_state.items()
            if name not in source_state or source_state[name].shape != tensor.shape]  # fmt: skip
    target.load_state_dict({name: source_state[name] for name in target_state if name not in kept}, strict=False)
    return kept


def train_low_res(
    ctx: RunContext, model: CnnLstmForImageClassification
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train a copy of `model` at `--low_res_image_size` (or load the finished stage); copy its weights into `model`.

    Returns the stage's statistics and its Trainer log history (for the training curves).
    """
    size, epochs = ctx.model_args.low_res_image_size, ctx.model_args.low_res_epochs
    folder = stage_dir(ctx.training_args.output_dir, size)
    config = copy.deepcopy(model.config)
    config.image_size = size
    done = folder / DONE
    if (done / "config.json").is_file():
        logger.info("low-resolution stage already finished: loading %s", done)
        low = CnnLstmForImageClassification.from_pretrained(done, dtype=torch.float32)
        stats = dict(low.config.to_dict().get("low_res_stats") or {})
        history = json.loads((done / HISTORY).read_text())
    else:
        set_seed(ctx.training_args.seed)
        low = CnnLstmForImageClassification(config)
        if ctx.model_args.channels_last:
            low = low.to(memory_format=torch.channels_last)
        splits = {
            name: to_cached_split(
                ctx.sources[name],
                size,
                config.num_channels,
                ctx.data_args.label_column,
                ctx.data_args.image_column,
                ctx.cache_dir,
                ctx.data_args.preprocessing_num_workers,
                config.crop_to_lungs,
            )
            for name in ("train", "validation")
        }
        args = low_res_args(ctx.training_args, folder, epochs)
        full_epoch_ratio = (ctx.model_args.image_size / size) ** 2  # conv cost grows with the pixel count

        def later_seconds(epoch_seconds: float) -> float:
            return ctx.training_args.num_train_epochs * epoch_seconds * full_epoch_ratio

        trainer, stats = fit(
            ctx, low, args, splits["train"], splits["validation"], f"{size}px", later_seconds, early_stopping=False
        )
        low = trainer.accelerator.unwrap_model(trainer.model)
        stats = {key: value for key, value in stats.items() if isinstance(value, int | float)}
        history = trainer.state.log_history
        if trainer.is_world_process_zero():
            low.config.low_res_stats = stats
            with atomic_folder(done) as staging:
                low.save_pretrained(staging)
                (staging / HISTORY).write_text(json.dumps(history, indent=1))
        trainer.accelerator.wait_for_everyone()
    kept = transfer_weights(low, model)
    logger.info("carried the %dpx stage over to %dpx; initialised afresh: %s", size, model.config.image_size, kept)
    return {"image_size": size, "epochs": epochs, "reinitialised": kept, **stats}, history
