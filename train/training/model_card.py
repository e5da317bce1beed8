"""The model card: the facts about a run (`run_info`) and `model_card.md` (a template with `{{ name }}` fields)
rendered with them and the test report into the final folder's README.md.

Every field must be filled: a missing value or a field left in the output is an error, so a card with a
placeholder can never be written (or pushed).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig, TrainingArguments

from cxr_common.atomic import atomic_write_text
from modeling_cnn_lstm import CnnLstmForImageClassification
from train.training.context import RunContext
from train.training.hardware import hardware
from train.training.report import (
    calibration_table,
    comparison_section,
    cv_table,
    intervals_table,
    per_class_table,
    per_source_table,
    percent,
    previous_model_section,
    shortcut_audit_section,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TEMPLATE = REPO_ROOT / "model_card.md"
FIELD = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
PLOT_TITLES = {
    "confusion_matrix": "Confusion matrix (paper Fig. 6)",
    "accuracy_curves": "Training and validation accuracy per epoch (paper Fig. 7)",
    "loss_curves": "Training and validation loss per epoch (paper Fig. 8)",
    "per_class_metrics": "Per-class metrics (paper Figs. 9 and 10)",
    "roc_curves": "One-vs-rest ROC curves (paper Fig. 11)",
    "reliability_diagram": "Reliability diagram before and after temperature scaling",
}


def _plain(value: Any) -> str:
    """Enum members (OptimizerNames.RMSPROP) as their plain value ("rmsprop")."""
    return str(getattr(value, "value", value))


def describe_network(config: PretrainedConfig) -> tuple[str, str]:
    """The network's name and a one-paragraph description of its layers."""
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
    return network, architecture


def _batch_line(ctx: RunContext, args: TrainingArguments) -> str:
    """Batch size, epochs, checkpoint choice and early stopping, in one sentence."""
    batch = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
    if not args.load_best_model_at_end:
        selection = "; the last checkpoint kept (no validation data)"
    else:
        selection = f"; checkpoint chosen on validation `{args.metric_for_best_model}`"
        if "smoothed" in str(args.metric_for_best_model):
            selection += (
                f" (mean validation macro-F1 of the last {ctx.eval_args.selection_window} evaluations, the chosen "
                "checkpoint being the last of them)"
            )
    patience = ctx.eval_args.early_stopping_patience
    return (
        f"- Batch size {batch} ({args.per_device_train_batch_size} per device x {args.world_size} device(s) x "
        f"{args.gradient_accumulation_steps} accumulation), up to {args.num_train_epochs:g} epochs"
        + (f" / {args.max_steps} steps" if args.max_steps > 0 else "")
        + selection
        + (
            f"; early stopping after {patience} evaluations without improvement"
            if patience and args.load_best_model_at_end
            else "; no early stopping"
        )
        + "."
    )


def _progressive_line(low_res: dict[str, Any], image_size: int) -> str:
    return (
        f"- Progressive resizing: first {low_res['epochs']:g} epochs at {low_res['image_size']} px "
        f"({low_res.get('wall_seconds', 0.0):.0f} s, same optimizer settings, its own schedule, no checkpoint "
        f"choice), then the trunk, batch norm and LSTM carried over to {image_size} px with "
        f"{', '.join(low_res['reinitialised']) or 'nothing'} initialised afresh (its input size depends on the "
        f"image size); the epochs above are the {image_size} px ones."
    )


def training_summary(
    ctx: RunContext, stats: dict[str, Any], protocol: str, args: TrainingArguments, image_size: int
) -> str:
    """The card's list of training facts: protocol, optimizer, batch and selection, augmentation, precision, time."""
    precision = ctx.precision_reason or ("bf16 autocast" if args.bf16 else "fp16 autocast" if args.fp16 else "fp32")
    lines = [
        f"- Protocol: {protocol}.",
        f"- Optimizer: `{_plain(args.optim)}` ({args.optim_args or 'defaults'}), learning rate "
        f"{args.learning_rate:g}, `{_plain(args.lr_scheduler_type)}` schedule, weight decay {args.weight_decay:g}, "
        f"gradient clipping {args.max_grad_norm if args.max_grad_norm else 'off'}.",
        _batch_line(ctx, args),
        f"- Augmentation: random rotation within +-{ctx.data_args.rotation_degrees:g} degrees (the paper's)"
        + (f"; with probability {ctx.data_args.outside_lung_swap:g} per image, everything outside its lung fields "
           "taken from another training film (so the surroundings stop predicting the label)."
           if ctx.data_args.outside_lung_swap > 0 else "."),  # fmt: skip
        f"- Precision {precision}; channels_last {ctx.model_args.channels_last}; torch.compile {args.torch_compile}; "
        f"seed {args.seed}.",
        f"- Hardware: {hardware()}; training time {stats.get('wall_seconds', 0.0):.1f} s; "
        f"{stats.get('train_samples_per_second', 0.0):.1f} training images/s (Trainer's count, incl. evaluation).",
    ]
    if ctx.model_args.crop_to_lungs:
        lines.append(
            "- Input: each image cropped to its lung fields' bounding box plus 5% (found per image, "
            "`lung_region_cnn_lstm.py`) before the resize, in training and, through `preprocessor_config.json`, "
            "at inference: labels, markers and borders far from the lungs never reach the model."
        )
    if ctx.model_args.source_adversary_weight > 0:
        lines.append(
            "- Source-adversarial training: a gradient-reversal head (weight "
            f"{ctx.model_args.source_adversary_weight:g}, ramped up) tried to name each image's collection from the "
            "penultimate features and the class; it is not part of the saved model (the paper's head and parameter "
            "count are unchanged)."
        )
    if ctx.data_args.hide_lungs:
        lines.append("- Diagnostic run: the lung fields of every split were hidden (filled with the image mean).")
    if stats.get("low_res_stage"):
        lines.insert(3, _progressive_line(stats["low_res_stage"], image_size))
    return "\n".join(lines)


def _data_summary(data_info: dict[str, Any]) -> str:
    counts = "; ".join(
        f"{name} {sum(c.values())} (" + ", ".join(f"{label} {count}" for label, count in c.items()) + ")"
        for name, c in data_info["class_counts"].items()
    )
    sources = ", ".join(f"{name} ({count})" for name, count in sorted(data_info["sources"].items()))
    return (
        f"Corpus `{data_info['location']}`, patient-disjoint splits. Images per split (per class): {counts}. "
        f"Sources: {sources or 'not recorded'}."
    )


def run_info(
    ctx: RunContext,
    model: CnnLstmForImageClassification,
    stats: dict[str, Any],
    protocol: str,
    args: TrainingArguments | None = None,
) -> dict[str, Any]:
    """Facts for the card and metrics.json: network, data, procedure, timing, hardware."""
    args, config = args or ctx.training_args, model.config
    network, architecture = describe_network(config)
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
        "data_summary": _data_summary(ctx.data_info),
        "training_summary": training_summary(ctx, stats, protocol, args, config.image_size),
        "world_size": args.world_size,
        "stats": stats,
    }


class CardError(ValueError):
    """The template and the values do not fit together."""


def render_model_card(template: str, context: dict[str, Any]) -> str:
    """Fill every `{{ name }}`; fail on unknown names and on any field left over."""
    missing = sorted({name for name in FIELD.findall(template) if name not in context})
    if missing:
        raise CardError(f"model card fields without a value: {missing}")
    rendered = FIELD.sub(lambda match: str(context[match.group(1)]), template)
    if FIELD.search(rendered) or "{{" in rendered or "}}" in rendered:
        raise CardError("model card still holds a placeholder after rendering")
    return rendered


def _yaml_number(value: float | None) -> str:
    return "null" if value is None else f"{value:.4f}"


def _yaml_scalar(text: str) -> str:
    """A YAML-safe single-line scalar (JSON strings are valid YAML)."""
    return json.dumps(str(text))


def card_context(report: dict[str, Any], info: dict[str, Any], report_folder: str = "report") -> dict[str, str]:
    """Template values from a report (`train.training.report.write_report`) and facts about the run (`info`)."""
    metrics = report["metrics"]
    plots = "\n\n".join(
        f"**{PLOT_TITLES.get(name, name)}**\n\n![{name}]({report_folder}/{file})"
        for name, file in report["plots"].items()
    )
    datasets = info.get("datasets") or []
    context = {
        "model_name": _yaml_scalar(info["model_name"])[1:-1],
        "model_id": info["model_id"],
        "network_name": info["network_name"],
        "architecture_summary": info["architecture_summary"],
        "num_parameters": f"{info['num_parameters']:,}",
        "image_size": info["image_size"],
        "num_channels": info["num_channels"],
        "label_list": ", ".join(f"`{name}`" for name in report["label_names"]),
        "datasets_yaml": json.dumps([str(name) for name in datasets]),  # a YAML flow list
        "dataset_label": _yaml_scalar(info["dataset_label"]),
        "dataset_type": _yaml_scalar(info["dataset_type"]),
        "test_split": _yaml_scalar(info["test_split"]),
        "accuracy_value": _yaml_number(metrics["accuracy"]),
        "macro_f1_value": _yaml_number(metrics["macro_f1"]),
        "macro_sensitivity_value": _yaml_number(metrics["macro_sensitivity"]),
        "macro_auc_value": _yaml_number(metrics["macro_auc"]),
        "accuracy_percent": percent(metrics["accuracy"]),
        "macro_auc_percent": percent(metrics["macro_auc"]),
        "macro_specificity_percent": percent(metrics["macro_specificity"]),
        "macro_sensitivity_percent": percent(metrics["macro_sensitivity"]),
        "macro_f1_percent": percent(metrics["macro_f1"]),
        "data_summary": info["data_summary"],
        "training_summary": info["training_summary"],
        "test_images": report["num_samples"],
        "per_class_table": per_class_table(metrics),
        "intervals_table": intervals_table(report),
        "cv_table": cv_table(report.get("cross_validation")),
        "calibration_table": calibration_table(report),
        "per_source_table": per_source_table(report),
        "plots_markdown": plots,
        "calibration_fitted_on": report["calibration"]["fitted_on"],
        "shortcut_audit_section": shortcut_audit_section(report.get("shortcut_audit")),
        "previous_model_section": previous_model_section(report.get("previous_model")),
        "comparison_section": comparison_section(report.get("comparison")) or NO_COMPARISON,
        "leaky_protocol_row": leaky_protocol_row(report.get("leaky_protocol")),
    }
    return {key: str(value) for key, value in context.items()}


NO_COMPARISON = (
    "Not run for this checkpoint. `scripts/compare_cnn_lstm.sh` trains the paper's competitive CNN (the same trunk "
    "with a dense head) with the same recipe and compares the two on the same test images."
)


def leaky_protocol_row(metrics: dict[str, Any] | None) -> str:
    """A comparison-table row: the same network trained and tested on the paper's leaky image-level split."""
    label = "Same network, the paper's leaky image-level split (`--protocol paper`)"
    if not metrics:
        return f"| {label} | not run | not run | not run | not run | not run |"
    keys = ("accuracy", "macro_auc", "macro_specificity", "macro_sensitivity", "macro_f1")
    return f"| {label} | " + " | ".join(percent(metrics.get(key)) for key in keys) + " |"


def write_model_card(
    destination: Path, report: dict[str, Any], info: dict[str, Any], template: str | Path | None = None
) -> Path:
    """Render and write the card atomically (temporary file in the same folder, then os.replace)."""
    text = Path(template or DEFAULT_TEMPLATE).read_text(encoding="utf-8")
    return atomic_write_text(destination, render_model_card(text, card_context(report, info)))
