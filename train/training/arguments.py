"""Command-line / JSON arguments of `train/run.py`: three project dataclasses plus `transformers.TrainingArguments`.

`parse_args` reads an optional `--config FILE.json` first and uses its values as the parser's defaults, so that any
`--key value` on the command line overrides the file (keys starting with "_" are comments). Unknown keys fail.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser, TrainingArguments

from modeling_cnn_lstm import CnnLstmConfig
from train.training.hardware import CPU_PRECISIONS

SAVE_DTYPES = ("float32", "float16", "bfloat16")


# Help for the architecture options; every keyword of CnnLstmConfig.__init__ is an option whether or not it is
# listed here (ModelArguments is built from the signature), so a new config field is trainable at once.
ARCHITECTURE_HELP = {
    "backbone": "'paper' (the paper's 12-layer VGG-style trunk) or a timm model name, e.g. resnet18.",
    "backbone_pretrained": "Load the timm backbone's pretrained weights (needs the Hub or its cache).",
    "head_type": "'lstm' (the paper's CNN-LSTM) or 'dense' (its competitive CNN).",
    "use_batch_norm": "Batch norm after every convolution.",
    "block_widths": "JSON list of lists of conv widths, e.g. [[8],[16,16]]; default: the paper's.",
    "image_size": "Input height and width.",
    "num_channels": "Input channels (grayscale X-rays are repeated).",
    "block_dropout": "Dropout after each conv block (paper: 0.25).",
    "head_dropout": "Dropout before the dense layer (not in the paper).",
    "lstm_hidden_size": "LSTM units.",
    "lstm_num_layers": "Stacked LSTM layers.",
    "lstm_bidirectional": "Bidirectional LSTM.",
    "fc_size": "Width of the dense layer before the classifier.",
    "image_mean": "JSON list: per-channel normalisation mean (default ImageNet's, one value per channel).",
    "image_std": "JSON list: per-channel normalisation std (default ImageNet's, one value per channel).",
    "crop_to_lungs": "Crop every image to its lung fields' box (plus 5 percent) before the resize, in training and "
    "(through the saved processor config) at inference: what lies far from the lungs never reaches the model.",
}
NOT_ARCHITECTURE = {"self", "kwargs", "calibration_temperature"}  # fitted after training, never an option


def _architecture_fields() -> list[tuple[str, Any, Any]]:
    """(name, type, field) of every CnnLstmConfig keyword: scalars keep their type and default; anything else
    (lists) is a JSON string whose default None means the config's own default."""
    found = []
    for name, parameter in inspect.signature(CnnLstmConfig.__init__).parameters.items():
        if name in NOT_ARCHITECTURE or parameter.kind is inspect.Parameter.VAR_KEYWORD:
            continue
        default = parameter.default
        kind = type(default) if isinstance(default, (bool, int, float, str)) else None
        help_text = ARCHITECTURE_HELP.get(name, f"CnnLstmConfig.{name} (modeling_cnn_lstm/configuration_cnn_lstm.py).")
        if kind is None:
            found.append((name, str | None, field(default=None, metadata={"help": help_text})))
        else:
            found.append((name, kind, field(default=default, metadata={"help": help_text})))
    return found


ARCHITECTURE_FIELDS = tuple(name for name, _, _ in _architecture_fields())
JSON_FIELDS = tuple(name for name, kind, _ in _architecture_fields() if kind == str | None)


@dataclass
class _TrainingOptions:
    """What training adds to the architecture: where to start from, the training-only head, speed and saving."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "Start from this checkpoint (fine-tune)."})
    source_adversary_weight: float = field(
        default=0.0,
        metadata={
            "help": "Training only: weight of a gradient-reversal head that predicts each image's source from the "
            "penultimate features and the class (0: off). The saved model keeps the paper's head."
        },
    )
    channels_last: bool = field(default=False, metadata={"help": "channels_last weights and inputs (GPU speed)."})
    cudnn_benchmark: bool = field(
        default=False, metadata={"help": "Let cuDNN pick the fastest conv algorithms (fixed input size; CUDA only)."}
    )
    low_res_image_size: int | None = field(
        default=None,
        metadata={
            "help": "Progressive resizing: train --low_res_epochs epochs at this input size first, then carry the "
            "trunk and LSTM over to --image_size (the dense layer after the flatten starts afresh)."
        },
    )
    low_res_epochs: float = field(
        default=0.0, metadata={"help": "Epochs at --low_res_image_size (0: no low-resolution stage)."}
    )
    cpu_precision: str = field(
        default="auto",
        metadata={
            "help": f"On a CPU: one of {CPU_PRECISIONS}; auto = bf16 autocast only where the CPU flags show native "
            "bf16 (avx512_bf16/amx_bf16), else fp32 (emulated bf16 is slower). Overrides --bf16 on a CPU."
        },
    )
    save_dtype: str = field(
        default="float32", metadata={"help": f"dtype of the saved safetensors, one of {SAVE_DTYPES}; loads as fp32."}
    )
    max_shard_size: str = field(default="5GB", metadata={"help": "safetensors shard size of the final folder."})

    def __post_init__(self) -> None:
        if self.save_dtype not in SAVE_DTYPES:
            raise ValueError(f"--save_dtype must be one of {SAVE_DTYPES}, got {self.save_dtype!r}")
        if self.cpu_precision not in CPU_PRECISIONS:
            raise ValueError(f"--cpu_precision must be one of {CPU_PRECISIONS}, got {self.cpu_precision!r}")
        if self.low_res_epochs < 0:
            raise ValueError(f"--low_res_epochs must be >= 0 (0: no low-resolution stage), got {self.low_res_epochs}")
        size = self.low_res_image_size
        if self.low_res_epochs > 0 and (size is None or not 0 < size < self.image_size):
            raise ValueError(
                f"--low_res_epochs {self.low_res_epochs:g} needs --low_res_image_size between 0 and "
                f"--image_size {self.image_size}, got {size}"
            )
        if self.source_adversary_weight < 0:
            raise ValueError(f"--source_adversary_weight must be >= 0, got {self.source_adversary_weight}")
        for name in JSON_FIELDS:  # a JSON config may give the list itself
            if isinstance(getattr(self, name), list):
                setattr(self, name, json.dumps(getattr(self, name)))

    def architecture(self) -> dict[str, Any]:
        """CnnLstmConfig keyword arguments given by these options (a JSON option left at None: the config's own
        default)."""
        settings = {}
        for name in ARCHITECTURE_FIELDS:
            value = getattr(self, name)
            if name in JSON_FIELDS:
                if value is None:
                    continue
                value = json.loads(value)
            settings[name] = value
        return settings

    def build_config(self, **extra: Any) -> CnnLstmConfig:
        return CnnLstmConfig(**{**self.architecture(), **extra})


ModelArguments = dataclasses.make_dataclass(
    "ModelArguments",
    _architecture_fields(),
    bases=(_TrainingOptions,),
    namespace={"__doc__": "The network (every CnnLstmConfig keyword, or a checkpoint to start from) and how the "
               "final folder is saved.", "__module__": __name__},
)  # fmt: skip


@dataclass
class DataArguments:
    """Where the images come from, the columns to use, the input cache and the augmentation."""

    data_dir: str | None = field(
        default=None, metadata={"help": "A save_to_disk corpus, or a raw folder (cxr3 layout ...) built on the fly."}
    )
    dataset_name: str | None = field(default=None, metadata={"help": "A Hub dataset id instead of --data_dir."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    dataset_revision: str | None = field(default=None, metadata={"help": "Hub dataset revision."})
    corpus_options: str | None = field(
        default=None, metadata={"help": "JSON dict of build_corpus options when --data_dir is a raw folder."}
    )
    train_split: str = field(default="train", metadata={"help": "Training split name."})
    validation_split: str = field(default="validation", metadata={"help": "Validation split (checkpoint choice)."})
    test_split: str = field(default="test", metadata={"help": "Test split (the report)."})
    image_column: str = field(default="image", metadata={"help": "Image column."})
    label_column: str = field(default="label", metadata={"help": "ClassLabel column."})
    fold_column: str = field(default="fold", metadata={"help": "Patient-grouped fold index column (CV)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Seeded subset of train (smoke runs)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Seeded subset of validation and test."})
    rotation_degrees: float = field(default=15.0, metadata={"help": "Random rotation range (paper: 15 degrees)."})
    outside_lung_swap: float = field(
        default=0.0,
        metadata={
            "help": "Training augmentation against shortcuts: with this probability per image, everything outside "
            "its lung fields is replaced by another training image's pixels (0: off)."
        },
    )
    exclude_sources: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated `source` values left out of the training and validation splits (the "
            "leave-source-out check: score the model afterwards on those collections, which it never saw)."
        },
    )
    hide_lungs: bool = field(
        default=False,
        metadata={
            "help": "Diagnostic (Maguolo & Nanni 2021): fill the lung fields of EVERY split with each image's mean "
            "before training and evaluation. What such a model still scores is the shortcut the corpus itself offers."
        },
    )
    image_cache_dir: str | None = field(
        default=None, metadata={"help": "Where decoded uint8 images are cached (default $HF_HOME/...)."}
    )
    no_image_cache: bool = field(default=False, metadata={"help": "Decode every run; do not write the disk cache."})
    preprocessing_num_workers: int = field(default=4, metadata={"help": "Threads decoding images for the cache."})

    def __post_init__(self) -> None:
        if not 0.0 <= self.outside_lung_swap <= 1.0:
            raise ValueError(f"--outside_lung_swap must be a probability in [0, 1], got {self.outside_lung_swap}")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be >= 1 (an empty split cannot be trained or evaluated), got {value}")


@dataclass
class EvaluationArguments:
    """Protocol (cross-validation), calibration, the report, the final folder and the metric's Hub id."""

    cross_validation: int = field(
        default=0,
        metadata={
            "help": "k >= 3: patient-grouped k-fold CV on the fold column; fold f is scored by a model trained on "
            "k - 2 folds and selected (checkpoint, early stopping, temperature) on fold (f + 1) mod k."
        },
    )
    no_final: bool = field(default=False, metadata={"help": "With CV: skip the final model on all non-test data."})
    calibrate: bool = field(default=True, metadata={"help": "Fit temperature scaling on validation logits."})
    shortcut_audit: bool = field(
        default=True,
        metadata={
            "help": "Audit the final model on the test split (lungs hidden / only the lungs, source probe, evidence "
            "inside the lungs, per-source confusion; train/training/shortcut_audit.py) into its report and card."
        },
    )
    audit_ig_per_class: int = field(
        default=4, metadata={"help": "Images per class that the audit explains with Integrated Gradients (0: none)."}
    )
    early_stopping_patience: int | None = field(
        default=None, metadata={"help": "Stop after this many evaluations without improvement (recorded)."}
    )
    selection_window: int = field(
        default=1,
        metadata={
            "help": "Also report eval `macro_f1_smoothed`, the mean validation macro-F1 of the last N evaluations "
            "(use it as --metric_for_best_model: one lucky epoch on a small validation split then cannot win)."
        },
    )
    bootstrap_samples: int = field(default=1000, metadata={"help": "Bootstrap resamples for the 95%% intervals."})
    ece_bins: int = field(default=15, metadata={"help": "Equal-width confidence bins of the ECE."})
    final_model_dir: str | None = field(
        default=None, metadata={"help": "The Hub-ready model folder (default: <output_dir>/final)."}
    )
    model_card_template: str | None = field(
        default=None, metadata={"help": "Model card template (default: model_card.md of this repository)."}
    )
    push_metric_to_hub: str | None = field(
        default=None, metadata={"help": "Also publish train/metrics/cxr_metrics as this Hub Space id."}
    )
    skip_push_check: bool = field(
        default=False,
        metadata={
            "help": "Do not check before training that --push_to_hub / --push_metric_to_hub can succeed (offline "
            "mode, endpoint, token, repo id, write access: train/hub_preflight.py). For a Hub reachable only later."
        },
    )
    push_attempts: int = field(
        default=4, metadata={"help": "Tries per push; transient errors (network, 408/429/5xx) wait 2, 4, 8 s."}
    )

    def __post_init__(self) -> None:
        if self.cross_validation in (1, 2) or self.cross_validation < 0:
            raise ValueError(
                f"--cross_validation must be 0 (off) or k >= 3 (training, selection and scored folds), "
                f"got {self.cross_validation}"
            )
        if self.bootstrap_samples < 0:
            raise ValueError("--bootstrap_samples must be >= 0")
        if self.selection_window < 1:
            raise ValueError(f"--selection_window must be >= 1, got {self.selection_window}")
        if self.push_attempts < 1:
            raise ValueError(f"--push_attempts must be >= 1, got {self.push_attempts}")


ARGUMENT_CLASSES = (ModelArguments, DataArguments, EvaluationArguments, TrainingArguments)


def _json_defaults(config_path: Path) -> dict[str, Any]:
    values = json.loads(config_path.read_text())
    if not isinstance(values, dict):
        raise ValueError(f"{config_path} must hold a JSON object")
    known = {f.name for cls in ARGUMENT_CLASSES for f in fields(cls) if f.init}
    values = {key: value for key, value in values.items() if not key.startswith("_")}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{config_path}: unknown keys {unknown}")
    # list-valued options that the CLI takes as JSON text
    return {key: json.dumps(value) if key == "block_widths" and not isinstance(value, str) else value
            for key, value in values.items()}  # fmt: skip


def parse_args(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataArguments, EvaluationArguments, TrainingArguments]:
    """`--config FILE.json` (optional) supplies defaults; everything else on the command line overrides them."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path, default=None)
    known, rest = pre.parse_known_args(argv)
    parser = HfArgumentParser(ARGUMENT_CLASSES)
    parser.add_argument("--config", type=Path, default=None, help="JSON file of defaults (CLI flags override it).")
    if known.config is not None:
        parser.set_defaults(**_json_defaults(known.config))
    outputs = parser.parse_args_into_dataclasses(args=rest, return_remaining_strings=True)
    if outputs[-1]:
        parser.error(f"unrecognized arguments: {' '.join(outputs[-1])}")
    return tuple(outputs[: len(ARGUMENT_CLASSES)])  # type: ignore[return-value]  (the --config namespace dropped)
