"""One training run end to end: data -> checks -> cache -> Trainer -> calibration -> report -> final folder -> Hub.

`train/run.py` parses the arguments and calls `run`; the steps each model goes through (`steps.py`) are shared with
cross-validation (`cv.py`) and the progressive-resizing stage (`progressive.py`).
Everything that can fail because of the data fails in `prepare`, before the first training step.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import evaluate
import torch
from datasets import DatasetDict, concatenate_datasets
from transformers import TrainingArguments

from modeling_cnn_lstm import CnnLstmConfig
from train.hub_preflight import check_push_access
from train.training.arguments import DataArguments, EvaluationArguments, ModelArguments
from train.training.calibration import fit_temperature
from train.training.context import RunContext
from train.training.cv import cross_validate
from train.training.dataset_loading import (
    check_dataset,
    check_folds,
    load_dataset_dict,
    select_samples,
    to_cached_split,
)
from train.training.hardware import choose_cpu_precision
from train.training.hub_folder import METRIC_DIR, round_to_save_dtype
from train.training.input_pipeline import CachedSplit, default_cache_dir, hide_lungs_uint8
from train.training.model_card import run_info
from train.training.progressive import train_low_res
from train.training.steps import finalize, fit, prepare_model
from train.training.trainer import predict_logits

logger = logging.getLogger(__name__)


def prepare(
    model_args: ModelArguments,
    data_args: DataArguments,
    eval_args: EvaluationArguments,
    training_args: TrainingArguments,
    *,
    push_to_hub: bool = False,
    hub_token: str | None = None,
    precision_reason: str = "",
) -> RunContext:
    """Load, check and cache the data; load the metric; return the run's complete context. No training step
    happens before this returns."""
    if training_args.dataloader_drop_last:
        raise ValueError("--dataloader_drop_last would also drop validation/test images in the Trainer; not supported")
    if model_args.model_name_or_path:
        config = CnnLstmConfig.from_pretrained(model_args.model_name_or_path)
    else:
        config = model_args.build_config()
    label_names = [config.id2label[index] for index in range(config.num_labels)]
    splits = [data_args.train_split, data_args.validation_split, data_args.test_split]
    with training_args.main_process_first(desc="dataset"):
        dataset = load_dataset_dict(
            data_args.data_dir,
            data_args.dataset_name,
            training_args.output_dir,
            data_args.dataset_config_name,
            data_args.dataset_revision,
            data_args.corpus_options,
        )
    if data_args.exclude_sources:
        dataset = exclude_sources(dataset, splits[:2], data_args.exclude_sources)
    check_dataset(dataset, label_names, splits, data_args.label_column, data_args.image_column)
    if eval_args.cross_validation:
        pooled = concatenate_datasets([dataset[splits[0]], dataset[splits[1]]])
        check_folds(pooled, eval_args.cross_validation, data_args.fold_column)
    seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed
    limits = {splits[0]: data_args.max_train_samples, splits[1]: data_args.max_eval_samples}
    limits[splits[2]] = data_args.max_eval_samples
    cache_dir = None if data_args.no_image_cache else (data_args.image_cache_dir or default_cache_dir())
    cached, sources = {}, {}
    with training_args.main_process_first(desc="image cache"):
        for name, split in zip(("train", "validation", "test"), splits, strict=True):
            subset = sources[name] = select_samples(dataset[split], limits[split], seed)
            cached[name] = to_cached_split(
                subset,
                config.image_size,
                config.num_channels,
                data_args.label_column,
                data_args.image_column,
                cache_dir,
                data_args.preprocessing_num_workers,
                config.crop_to_lungs,
            )
        metric = evaluate.load(str(METRIC_DIR), keep_in_memory=True)
    if data_args.hide_lungs:  # the data-level shortcut check: no split shows its lungs
        cached = {name: dataclasses.replace(split, pixels=hide_lungs_uint8(split.pixels))
                  for name, split in cached.items()}  # fmt: skip
    data_info = describe_data(cached, label_names, data_args)
    return RunContext(
        model_args, data_args, eval_args, training_args, label_names, cached, metric, data_info,
        push_to_hub=push_to_hub, sources=sources, cache_dir=cache_dir, precision_reason=precision_reason,
        hub_token=hub_token,
    )  # fmt: skip


def exclude_sources(dataset: Any, splits: list[str], sources: str) -> Any:
    """The dataset with the named sources left out of `splits` (training and validation); logged per split."""
    names = {name.strip() for name in sources.split(",") if name.strip()}
    if "source" not in dataset[splits[0]].column_names:
        raise ValueError("--exclude_sources needs a 'source' column in the corpus")
    known = set().union(*(set(dataset[split]["source"]) for split in dataset))
    if names - known:
        raise ValueError(f"--exclude_sources: unknown source(s) {sorted(names - known)}; corpus: {sorted(known)}")
    dataset = DatasetDict(dict(dataset))
    for split in dict.fromkeys(splits):
        before = len(dataset[split])
        dataset[split] = dataset[split].filter(lambda source: source not in names, input_columns="source")
        logger.info("--exclude_sources: %s keeps %d of %d images", split, len(dataset[split]), before)
    return dataset


def choose_precision(model_args: ModelArguments, training_args: TrainingArguments) -> tuple[bool, str]:
    """(bf16 autocast?, why). On a CPU `--cpu_precision` decides (auto: bf16 only where the CPU has native bf16);
    elsewhere `--bf16` does. Logged; the caller makes the TrainingArguments that say so."""
    if training_args.device.type != "cpu":
        choice = "bf16 autocast" if training_args.bf16 else "fp16 autocast" if training_args.fp16 else "fp32"
        return training_args.bf16, choice
    use_bf16, reason = choose_cpu_precision(model_args.cpu_precision)
    if use_bf16 != training_args.bf16:
        logger.info("--cpu_precision %s overrides --bf16 %s", model_args.cpu_precision, training_args.bf16)
    choice = f"{'bf16 autocast' if use_bf16 else 'fp32'} on the CPU ({reason})"
    logger.info("precision: %s", choice)
    return use_bf16, choice


def describe_data(splits: dict[str, CachedSplit], label_names: list[str], data_args: DataArguments) -> dict[str, Any]:
    counts = {
        name: {label_names[index]: int(count) for index, count in sorted(Counter(split.labels.tolist()).items())}
        for name, split in splits.items()
    }
    sources = Counter(source for split in splits.values() for source in split.columns.get("source", []))
    location = data_args.dataset_name or Path(data_args.data_dir).name
    return {"location": location, "class_counts": counts, "sources": dict(sources)}


def single_run(ctx: RunContext) -> Path | None:
    """Train on train (first at low resolution if asked), choose the checkpoint on validation, calibrate on
    validation, report on test."""
    model = prepare_model(ctx)
    low_res, histories = None, {}
    if ctx.model_args.low_res_epochs > 0:
        low_res, histories[f"{ctx.model_args.low_res_image_size} px stage"] = train_low_res(ctx, model)
    trainer, stats = fit(ctx, model, ctx.training_args, ctx.splits["train"], ctx.splits["validation"])
    if low_res is not None:
        stats["low_res_stage"] = low_res
        stats["wall_seconds"] += low_res.get("wall_seconds", 0.0)
    round_to_save_dtype(trainer.model, ctx.model_args.save_dtype)  # score exactly the weights that ship
    validation_logits = predict_logits(trainer, ctx.splits["validation"])
    test_logits = predict_logits(trainer, ctx.splits["test"])
    temperature, fitted_on = 1.0, "none (calibration off)"
    if ctx.eval_args.calibrate:
        temperature, fitted_on = fit_temperature(validation_logits, ctx.splits["validation"].labels), "validation"
    if not trainer.is_world_process_zero():
        return None
    model = trainer.accelerator.unwrap_model(trainer.model)
    info = run_info(ctx, model, stats, "single patient-disjoint train/validation/test split")
    offset = low_res["epochs"] if low_res else 0  # one epoch axis across the stages in the training curves
    history = [dict(entry, epoch=entry["epoch"] + offset) if "epoch" in entry else entry
               for entry in trainer.state.log_history]  # fmt: skip
    histories[f"{model.config.image_size} px stage" if histories else "training"] = history
    return finalize(ctx, model, temperature, fitted_on, test_logits, histories, info)


def run(
    model_args: ModelArguments,
    data_args: DataArguments,
    eval_args: EvaluationArguments,
    training_args: TrainingArguments,
) -> Path | None:
    if data_args.hide_lungs and (model_args.low_res_epochs > 0 or model_args.crop_to_lungs):
        raise ValueError("--hide_lungs (a diagnostic) cannot be combined with --low_res_epochs or --crop_to_lungs")
    if eval_args.cross_validation and model_args.low_res_epochs > 0:
        raise ValueError("--low_res_epochs (progressive resizing) is not supported with --cross_validation")
    if eval_args.final_model_dir is None:
        eval_args = dataclasses.replace(eval_args, final_model_dir=str(Path(training_args.output_dir) / "final"))
    hub_token, push_to_hub = training_args.hub_token, bool(training_args.push_to_hub)
    if not eval_args.skip_push_check:  # before any data is read: a push that cannot succeed stops the run now
        check_pushes(training_args, eval_args, hub_token)
    use_bf16, precision_reason = choose_precision(model_args, training_args)
    # The arguments the Trainer gets, made once: without the token (the Trainer pickles them into every
    # checkpoint's training_args.bin, which may be shared or pushed; the pushes get it from the context), without
    # push_to_hub (the Trainer itself never pushes checkpoints), with the precision chosen above.
    training_args = dataclasses.replace(training_args, hub_token=None, push_to_hub=False, bf16=use_bf16)
    ctx = prepare(model_args, data_args, eval_args, training_args, push_to_hub=push_to_hub, hub_token=hub_token,
                  precision_reason=precision_reason)  # fmt: skip
    final = cross_validate(ctx) if eval_args.cross_validation else single_run(ctx)
    shutdown_distributed()
    return final


def check_pushes(training_args: TrainingArguments, eval_args: EvaluationArguments, token: str | None) -> None:
    """The preflight of every push the run will make (train/hub_preflight.py); raises PushError with one sentence."""
    if training_args.push_to_hub:
        check_push_access(training_args.hub_model_id, token=token, flag="--push_to_hub")
    if eval_args.push_metric_to_hub:
        check_push_access(eval_args.push_metric_to_hub, repo_type="space", token=token, flag="--push_metric_to_hub")


def shutdown_distributed() -> None:
    """Under torchrun/accelerate: wait until the main process has written (and pushed) the final folder, then
    tear the process group down in order; a rank that exits early can otherwise abort in gloo's destructor."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
