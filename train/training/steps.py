"""The steps every trained model goes through: a seeded fresh model, a Trainer run, and the final folder.

Shared by the single run (experiment.py), the cross-validation folds and final model (cv.py) and the
progressive-resizing stage (progressive.py); living here, they let experiment.py call cv.py without cv.py
reaching back into experiment.py.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import EarlyStoppingCallback, TrainingArguments, set_seed
from transformers.trainer_utils import IntervalStrategy, SaveStrategy, get_last_checkpoint

from cxr_common.atomic import atomic_folder
from modeling_cnn_lstm import CnnLstmForImageClassification, CnnLstmImageProcessor
from train.training.context import RunContext
from train.training.epoch_log import LOG_NAME, EpochLogCallback
from train.training.hub_folder import publish, save_model_files
from train.training.input_pipeline import CachedSplit
from train.training.model_card import write_model_card
from train.training.report import write_report
from train.training.shortcut_audit import AuditSettings, evidence_shares, evidence_threshold, run_audit
from train.training.source_adversary import SourceAdversary
from train.training.trainer import CxrTrainer, batch_transform_for, build_compute_metrics, build_model, make_trainer

logger = logging.getLogger(__name__)


def resolve_resume(training_args: TrainingArguments, output_dir: str | None = None) -> str | None:
    """`--resume_from_checkpoint true|last` -> the newest checkpoint in output_dir (None if there is none yet)."""
    value = training_args.resume_from_checkpoint
    if value in (None, "", "false", "False"):
        return None
    if str(value).lower() in ("true", "last"):
        folder = output_dir or training_args.output_dir
        last = get_last_checkpoint(folder) if Path(folder).is_dir() else None
        if last is None:
            logger.info("no checkpoint in %s to resume from: starting fresh", folder)
        return last
    return str(value)


def prepare_model(ctx: RunContext) -> CnnLstmForImageClassification:
    """A seeded fresh model (or the checkpoint to fine-tune), in the memory format the run asked for."""
    set_seed(ctx.training_args.seed)
    model = build_model(ctx.model_args)
    if ctx.model_args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if ctx.model_args.cudnn_benchmark and torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
    return model


def fit(
    ctx: RunContext,
    model: CnnLstmForImageClassification,
    args: TrainingArguments,
    train_split: CachedSplit,
    eval_split: CachedSplit | None,
    stage: str | None = None,
    later_seconds: Callable[[float], float] | None = None,
    early_stopping: bool = True,
) -> tuple[CxrTrainer, dict[str, Any]]:
    """Train with the Trainer (resuming if asked); with an eval split, the best checkpoint is loaded at the end.

    `eval_split` chooses the checkpoint and drives early stopping, so numbers measured on it afterwards are
    optimistic: score on data that was neither trained on nor passed here (cv.py selects on a separate inner fold).
    Each evaluation also writes a line to `<run output_dir>/training_log.txt` (epoch_log.py).
    """
    callbacks = []
    if eval_split is not None and ctx.eval_args.early_stopping_patience and early_stopping:
        callbacks.append(EarlyStoppingCallback(ctx.eval_args.early_stopping_patience))
    stage = stage or f"{model.config.image_size}px"
    log_path = Path(ctx.training_args.output_dir) / LOG_NAME
    selection = args.metric_for_best_model if args.load_best_model_at_end else None
    callbacks.append(EpochLogCallback(log_path, stage, len(train_split), selection, later_seconds))
    transform = batch_transform_for(
        model.config, ctx.data_args.rotation_degrees, ctx.model_args.channels_last, ctx.data_args.outside_lung_swap
    )
    compute_metrics = build_compute_metrics(
        ctx.metric, ctx.label_names, ctx.eval_args.ece_bins, ctx.eval_args.selection_window
    )
    callbacks.append(compute_metrics)  # it reads the Trainer's log history through on_train_begin
    adversary_weight = ctx.model_args.source_adversary_weight
    source_names = sorted(set(train_split.columns.get("source", []))) if adversary_weight > 0 else None
    train_split = train_split.with_training_extras(ctx.data_args.outside_lung_swap > 0, source_names)
    adversary = SourceAdversary(model.config, len(source_names), adversary_weight) if source_names else None
    trainer = make_trainer(model, args, train_split, eval_split, transform, compute_metrics, callbacks, adversary)
    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=resolve_resume(args, args.output_dir))
    stats = dict(output.metrics)
    stats["wall_seconds"] = time.perf_counter() - started
    return trainer, stats


def no_eval_args(args: TrainingArguments, output_dir: str | Path) -> TrainingArguments:
    """A copy that trains without evaluation (no validation data): no best-checkpoint choice, epoch saves."""
    save = SaveStrategy.EPOCH if args.save_strategy == SaveStrategy.BEST else args.save_strategy
    return dataclasses.replace(args, output_dir=str(output_dir), eval_strategy=IntervalStrategy.NO, do_eval=False,
                               load_best_model_at_end=False, save_strategy=save)  # fmt: skip


def final_audit(ctx: RunContext, model: CnnLstmForImageClassification) -> tuple[dict[str, Any], dict[str, Any]]:
    """The shortcut audit of the final weights (as they ship, calibrated) on the test split, and the app's
    lung-evidence warning threshold from the validation split (fp32, eval mode)."""
    test = ctx.splits["test"]
    images = ctx.sources["test"][ctx.data_args.image_column]
    columns = test.columns
    sources = columns.get("source") or ["unknown"] * len(test)
    groups = columns.get("patient_id") or [str(index) for index in range(len(test))]
    processor = CnnLstmImageProcessor.from_model_config(model.config)
    was_training = model.training
    try:
        audit = run_audit(
            model.eval(), processor, images, test.labels, sources, groups, ctx.label_names,
            ctx.data_args.test_split, AuditSettings(ig_per_class=ctx.eval_args.audit_ig_per_class),
        )  # fmt: skip
        validation = evidence_shares(model, processor, ctx.sources["validation"][ctx.data_args.image_column])
        return audit, evidence_threshold(validation.tolist(), ctx.data_args.validation_split)
    finally:
        model.train(was_training)


def finalize(
    ctx: RunContext,
    model: CnnLstmForImageClassification,
    temperature: float,
    fitted_on: str,
    test_logits: np.ndarray,
    histories: dict[str, list[dict[str, Any]]],
    info: dict[str, Any],
    cv: dict[str, Any] | None = None,
) -> Path:
    """Report on test + card + model files into the final folder (atomically); push if asked. Main process only."""
    model.config.calibration_temperature = float(temperature)
    destination = Path(ctx.eval_args.final_model_dir)
    test = ctx.splits["test"]
    audit = final_audit(ctx, model) if ctx.eval_args.shortcut_audit else None
    with atomic_folder(destination) as folder:
        save_model_files(model, folder, ctx.model_args.save_dtype, ctx.model_args.max_shard_size)
        extra = {"run": {k: info[k] for k in ("world_size", "stats", "training_summary")}, "cross_validation": cv}
        if audit is not None:
            extra["shortcut_audit"], extra["lung_evidence"] = audit
        extra["card_info"] = info  # lets scripts/update_card.py re-render the card with later results (CV, audit)
        report = write_report(
            folder / "report",
            test_logits,
            test.labels,
            ctx.label_names,
            temperature=temperature,
            calibration_fitted_on=fitted_on,
            columns=test.columns,
            histories=histories,
            bootstrap_samples=ctx.eval_args.bootstrap_samples,
            ece_bins=ctx.eval_args.ece_bins,
            seed=ctx.training_args.seed,
            extra=extra,
        )
        write_model_card(folder / "README.md", report, info, ctx.eval_args.model_card_template)
    logger.info("final model folder written to %s", destination)
    if ctx.push_to_hub or ctx.eval_args.push_metric_to_hub:  # a failure raises PushError naming the retry command
        publish(
            destination,
            hub_model_id=ctx.training_args.hub_model_id if ctx.push_to_hub else None,
            private=ctx.training_args.hub_private_repo,
            metric_id=ctx.eval_args.push_metric_to_hub,
            token=ctx.hub_token,
            token_given=ctx.hub_token is not None,
            attempts=ctx.eval_args.push_attempts,
        )
    return destination
