"""One training run end to end: data -> checks -> cache -> Trainer -> calibration -> report -> final folder -> Hub.

`train/run.py` parses the arguments and calls `run`; `cv.py` reuses `prepare`, `fit` and `finalize` per fold.
Everything that can fail because of the data fails in `prepare`, before the first training step.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import evaluate
import numpy as np
import torch
from transformers import EarlyStoppingCallback, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from modeling_cnn_lstm import CnnLstmConfig, CnnLstmForImageClassification
from train.training.arguments import DataArguments, EvaluationArguments, ModelArguments
from train.training.calibration import fit_temperature
from train.training.dataset_loading import (
    check_dataset,
    check_folds,
    load_dataset_dict,
    select_samples,
    to_cached_split,
)
from train.training.epoch_log import LOG_NAME, EpochLogCallback
from train.training.hardware import choose_cpu_precision, hardware
from train.training.hub_folder import (
    METRIC_DIR,
    atomic_folder,
    push_folder,
    push_metric,
    round_to_save_dtype,
    save_model_files,
)
from train.training.input_pipeline import CachedSplit, default_cache_dir
from train.training.model_card import write_model_card
from train.training.progressive import train_low_res
from train.training.report import write_report
from train.training.trainer import (
    CxrTrainer,
    batch_transform_for,
    build_compute_metrics,
    build_model,
    make_trainer,
    predict_logits,
)

logger = logging.getLogger(__name__)


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


def prepare(
    model_args: ModelArguments,
    data_args: DataArguments,
    eval_args: EvaluationArguments,
    training_args: TrainingArguments,
) -> RunContext:
    """Load, check and cache the data; load the metric. No training step happens before this returns."""
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
    check_dataset(dataset, label_names, splits, data_args.label_column, data_args.image_column)
    if eval_args.cross_validation:
        from datasets import concatenate_datasets

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
            )
        metric = evaluate.load(str(METRIC_DIR), keep_in_memory=True)
    data_info = describe_data(cached, label_names, data_args)
    push = bool(training_args.push_to_hub)
    training_args.push_to_hub = False
    ctx = RunContext(model_args, data_args, eval_args, training_args, label_names, cached, metric, data_info, push)
    ctx.sources, ctx.cache_dir = sources, cache_dir
    ctx.precision_reason = choose_precision(model_args, training_args)
    return ctx


def choose_precision(model_args: ModelArguments, training_args: TrainingArguments) -> str:
    """On a CPU, `--cpu_precision` (auto: bf16 only where the CPU has native bf16) decides bf16 autocast; logged."""
    if training_args.device.type != "cpu":
        return "bf16 autocast" if training_args.bf16 else "fp16 autocast" if training_args.fp16 else "fp32"
    use_bf16, reason = choose_cpu_precision(model_args.cpu_precision)
    if use_bf16 != training_args.bf16:
        logger.info("--cpu_precision %s overrides --bf16 %s", model_args.cpu_precision, training_args.bf16)
    training_args.bf16 = use_bf16
    training_args.mixed_precision = "bf16" if use_bf16 else "no"
    choice = f"{'bf16 autocast' if use_bf16 else 'fp32'} on the CPU ({reason})"
    logger.info("precision: %s", choice)
    return choice


def describe_data(splits: dict[str, CachedSplit], label_names: list[str], data_args: DataArguments) -> dict[str, Any]:
    counts = {
        name: {label_names[index]: int(count) for index, count in sorted(Counter(split.labels.tolist()).items())}
        for name, split in splits.items()
    }
    sources = Counter(source for split in splits.values() for source in split.columns.get("source", []))
    location = data_args.dataset_name or Path(data_args.data_dir).name
    return {"location": location, "class_counts": counts, "sources": dict(sources)}


def prepare_model(ctx: RunContext) -> tuple[CnnLstmForImageClassification, str]:
    """A seeded fresh model; returns it and its CPU inference backend (restored on the saved folder)."""
    set_seed(ctx.training_args.seed)
    model = build_model(ctx.model_args)
    backend = model.config.cpu_inference_backend
    model.config.cpu_inference_backend = "torch"  # no ONNX/bf16 export on each CPU evaluation while weights change
    if ctx.model_args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if ctx.model_args.cudnn_benchmark and torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
    return model, backend


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
    transform = batch_transform_for(model.config, ctx.data_args.rotation_degrees, ctx.model_args.channels_last)
    compute_metrics = build_compute_metrics(
        ctx.metric, ctx.label_names, ctx.eval_args.ece_bins, ctx.eval_args.selection_window
    )
    trainer = make_trainer(model, args, train_split, eval_split, transform, compute_metrics, callbacks)
    compute_metrics.previous = lambda: [entry["eval_macro_f1"] for entry in trainer.state.log_history
                                        if "eval_macro_f1" in entry]  # fmt: skip
    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=resolve_resume(args, args.output_dir))
    stats = dict(output.metrics)
    stats["wall_seconds"] = time.perf_counter() - started
    return trainer, stats


def no_eval_args(args: TrainingArguments, output_dir: str | Path) -> TrainingArguments:
    """A copy that trains without evaluation (no validation data): no best-checkpoint choice, epoch saves."""
    from transformers.trainer_utils import IntervalStrategy, SaveStrategy

    args = copy.copy(args)
    args.output_dir = str(output_dir)
    args.eval_strategy = IntervalStrategy.NO
    args.do_eval = False
    args.load_best_model_at_end = False
    if args.save_strategy == SaveStrategy.BEST:
        args.save_strategy = SaveStrategy.EPOCH
    return args


def _plain(value: Any) -> str:
    """Enum members (OptimizerNames.RMSPROP) as their plain value ("rmsprop")."""
    return str(getattr(value, "value", value))


def run_info(
    ctx: RunContext,
    model: CnnLstmForImageClassification,
    stats: dict[str, Any],
    protocol: str,
    args: TrainingArguments | None = None,
) -> dict[str, Any]:
    """Facts for the card and metrics.json: network, data, procedure, timing, hardware."""
    args, config = args or ctx.training_args, model.config
    network = "CNN-LSTM" if config.head_type == "lstm" else "competitive CNN (dense head)"
    head = (
        f"an LSTM ({config.lstm_hidden_size} units) reads the {config.feature_map_size}x{config.feature_map_size} "
        f"feature map as a sequence, then a {config.fc_size}-unit dense layer and the classifier"
        if config.head_type == "lstm"
        else f"the feature map is flattened into a {config.fc_size}-unit dense layer and the classifier"
    )
    convs = sum(len(block) for block in config.block_widths)
    architecture = (
        f"A VGG-style trunk of {convs} 3x3 convolutions in {len(config.block_widths)} blocks (widths "
        f"{config.block_widths}; batch norm {'on' if config.use_batch_norm else 'off'}; dropout "
        f"{config.block_dropout} per block); {head}."
    )
    batch = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
    precision = ctx.precision_reason or ("bf16 autocast" if args.bf16 else "fp16 autocast" if args.fp16 else "fp32")
    counts = "; ".join(
        f"{name} {sum(c.values())} (" + ", ".join(f"{label} {count}" for label, count in c.items()) + ")"
        for name, c in ctx.data_info["class_counts"].items()
    )
    sources = ", ".join(f"{name} ({count})" for name, count in sorted(ctx.data_info["sources"].items()))
    lines = [
        f"- Protocol: {protocol}.",
        f"- Optimizer: `{_plain(args.optim)}` ({args.optim_args or 'defaults'}), learning rate "
        f"{args.learning_rate:g}, `{_plain(args.lr_scheduler_type)}` schedule, weight decay {args.weight_decay:g}, "
        f"gradient clipping {args.max_grad_norm if args.max_grad_norm else 'off'}.",
        f"- Batch size {batch} ({args.per_device_train_batch_size} per device x {args.world_size} device(s) x "
        f"{args.gradient_accumulation_steps} accumulation), up to {args.num_train_epochs:g} epochs"
        + (f" / {args.max_steps} steps" if args.max_steps > 0 else "")
        + (
            f"; checkpoint chosen on validation `{args.metric_for_best_model}`"
            + (
                f" (mean validation macro-F1 of the last {ctx.eval_args.selection_window} evaluations, the chosen "
                "checkpoint being the last of them)"
                if "smoothed" in str(args.metric_for_best_model)
                else ""
            )
            if args.load_best_model_at_end
            else "; the last checkpoint kept (no validation data)"
        )
        + (
            f"; early stopping after {ctx.eval_args.early_stopping_patience} evaluations without improvement"
            if ctx.eval_args.early_stopping_patience and args.load_best_model_at_end
            else "; no early stopping"
        )
        + ".",
        f"- Augmentation: random rotation within +-{ctx.data_args.rotation_degrees:g} degrees (the paper's).",
        f"- Precision {precision}; channels_last {ctx.model_args.channels_last}; torch.compile {args.torch_compile}; "
        f"seed {args.seed}.",
        f"- Hardware: {hardware()}; training time {stats.get('wall_seconds', 0.0):.1f} s; "
        f"{stats.get('train_samples_per_second', 0.0):.1f} training images/s (Trainer's count, incl. evaluation).",
    ]
    low_res = stats.get("low_res_stage")
    if low_res:
        lines.insert(
            3,
            f"- Progressive resizing: first {low_res['epochs']:g} epochs at {low_res['image_size']} px "
            f"({low_res.get('wall_seconds', 0.0):.0f} s, same optimizer settings, its own schedule, no checkpoint "
            f"choice), then the trunk, batch norm and LSTM carried over to {config.image_size} px with "
            f"{', '.join(low_res['reinitialised']) or 'nothing'} initialised afresh (its input size depends on the "
            f"image size); the epochs above are the {config.image_size} px ones.",
        )
    return {
        "model_name": Path(args.hub_model_id or ctx.eval_args.final_model_dir or "cnn-lstm-cxr").name,
        "model_id": args.hub_model_id or str(ctx.eval_args.final_model_dir),
        "network_name": network,
        "architecture_summary": architecture,
        "num_parameters": sum(parameter.numel() for parameter in model.parameters()),
        "image_size": config.image_size,
        "num_channels": config.num_channels,
        "datasets": [ctx.data_args.dataset_name] if ctx.data_args.dataset_name else [],
        "dataset_label": ctx.data_info["location"],
        "dataset_type": ctx.data_args.dataset_name or "local-corpus",
        "test_split": ctx.data_args.test_split,
        "data_summary": f"Corpus `{ctx.data_info['location']}`, patient-disjoint splits. Images per split (per "
        f"class): {counts}. Sources: {sources or 'not recorded'}.",
        "training_summary": "\n".join(lines),
        "world_size": args.world_size,
        "stats": stats,
    }


def finalize(
    ctx: RunContext,
    model: CnnLstmForImageClassification,
    backend: str,
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

    def fill(folder: Path) -> None:
        save_model_files(model, folder, ctx.model_args.save_dtype, ctx.model_args.max_shard_size, backend)
        extra = {"run": {k: info[k] for k in ("world_size", "stats", "training_summary")}, "cross_validation": cv}
        extra["card_info"] = info  # lets scripts/update_card.py re-render the card with later results (CV, audit)
        report = write_report(
            folder / "report",
            test_logits,
            test.labels,
            ctx.label_names,
            temperature,
            fitted_on,
            test.columns,
            histories,
            ctx.eval_args.bootstrap_samples,
            ctx.eval_args.ece_bins,
            ctx.training_args.seed,
            extra,
        )
        write_model_card(folder / "README.md", report, info, ctx.eval_args.model_card_template)

    atomic_folder(destination, fill)
    logger.info("final model folder written to %s", destination)
    if ctx.push_to_hub:
        args = ctx.training_args
        push_folder(destination, args.hub_model_id, args.hub_token, args.hub_private_repo)
    if ctx.eval_args.push_metric_to_hub:
        push_metric(ctx.eval_args.push_metric_to_hub, ctx.training_args.hub_token)
    return destination


def single_run(ctx: RunContext) -> Path | None:
    """Train on train (first at low resolution if asked), choose the checkpoint on validation, calibrate on
    validation, report on test."""
    model, backend = prepare_model(ctx)
    low_res, histories = None, {}
    if ctx.model_args.low_res_epochs > 0:
        low_res, histories[f"{ctx.model_args.low_res_image_size} px stage"] = train_low_res(ctx, model, fit)
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
    return finalize(ctx, model, backend, temperature, fitted_on, test_logits, histories, info)


def run(
    model_args: ModelArguments,
    data_args: DataArguments,
    eval_args: EvaluationArguments,
    training_args: TrainingArguments,
) -> Path | None:
    if training_args.push_to_hub and not training_args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id")
    if eval_args.cross_validation and model_args.low_res_epochs > 0:
        raise ValueError("--low_res_epochs (progressive resizing) is not supported with --cross_validation")
    if eval_args.final_model_dir is None:
        eval_args.final_model_dir = str(Path(training_args.output_dir) / "final")
    ctx = prepare(model_args, data_args, eval_args, training_args)
    if eval_args.cross_validation:
        from train.training.cv import cross_validate

        final = cross_validate(ctx)
    else:
        final = single_run(ctx)
    shutdown_distributed()
    return final


def shutdown_distributed() -> None:
    """Under torchrun/accelerate: wait until the main process has written (and pushed) the final folder, then
    tear the process group down in order; a rank that exits early can otherwise abort in gloo's destructor."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
