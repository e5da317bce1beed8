"""Evaluate any checkpoint (folder or Hub id) on a built corpus or on any cxr3-layout folder.

    python scripts/evaluate_checkpoint.py --model checkpoints/cnn-lstm-cxr3 --data_dir ../shared/data/cxr3
        # -> evaluation/cnn-lstm-cxr3__cxr3/ (--output_dir to choose; --overwrite to replace an existing report)

Prints ONE JSON object of metrics on stdout (logs go to stderr, including where the report went) and writes the
report folder: metrics.json, report.md, predictions.csv and the PNG figures, as at the end of training. The folder
is written atomically, and an existing non-empty one is refused before any image is read unless --overwrite.
Images go through the checkpoint's own image processor and forward pass, i.e. what a user of the checkpoint gets
(the stored calibration temperature included; "uncalibrated" numbers are recomputed from logits x T). This
repository's classes load it: code stored beside the weights is never run (a non-CNN-LSTM config is refused).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from transformers import HfArgumentParser

from cxr_common.atomic import DestinationExists, atomic_folder, check_destination
from train.training.checkpoint_loading import NotACnnLstmCheckpoint, load_checkpoint
from train.training.dataset_loading import load_split
from train.training.report import write_report

logger = logging.getLogger("evaluate_checkpoint")
DEFAULT_OUTPUT = "evaluation"  # ignored by git (.gitignore)
SUMMARY_KEYS = ("accuracy", "macro_precision", "macro_sensitivity", "macro_specificity", "macro_f1", "macro_auc")


@dataclass
class EvaluateArguments:
    model: str = field(
        metadata={"help": "Checkpoint folder or Hub model id (loaded with this repository's classes, no remote code)."}
    )
    data_dir: str = field(metadata={"help": "A save_to_disk corpus or any folder in the cxr3 layout."})
    output_dir: str | None = field(
        default=None,
        metadata={
            "help": f"Report folder (default: {DEFAULT_OUTPUT}/<model folder>__<data folder>, relative to the "
            "current directory)."
        },
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace --output_dir if it exists and is not empty."})
    split: str = field(default="test", metadata={"help": "Split of a built corpus to evaluate."})
    revision: str | None = field(default=None, metadata={"help": "Hub revision of --model."})
    batch_size: int = field(default=32, metadata={"help": "Images per forward pass."})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cpu or cuda."})
    bootstrap_samples: int = field(default=1000, metadata={"help": "Bootstrap resamples for the 95%% intervals."})
    ece_bins: int = field(default=15, metadata={"help": "Equal-width confidence bins of the ECE."})
    seed: int = field(default=0, metadata={"help": "Seed of the bootstrap."})


@torch.inference_mode()
def predict(model: torch.nn.Module, processor: Any, dataset: Dataset, batch_size: int) -> np.ndarray:
    """Logits as the checkpoint reports them (divided by its calibration temperature)."""
    device = next(model.parameters()).device
    batches = []
    for start in range(0, len(dataset), batch_size):
        images = dataset[start : start + batch_size]["image"]
        pixel_values = processor(images=images, return_tensors="pt")["pixel_values"].to(device)
        batches.append(model(pixel_values=pixel_values).logits.float().cpu().numpy())
        logger.info("evaluated %d / %d images", min(start + batch_size, len(dataset)), len(dataset))
    return np.concatenate(batches).astype(np.float64)


def output_dir_of(args: EvaluateArguments) -> Path:
    """--output_dir, else evaluation/<model folder>__<data folder> (one report per checkpoint and data set)."""
    if args.output_dir:
        return Path(args.output_dir)
    return Path(DEFAULT_OUTPUT) / f"{Path(args.model).name}__{Path(args.data_dir).name}"


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(EvaluateArguments).parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    output_dir = output_dir_of(args)
    try:
        check_destination(output_dir, args.overwrite)  # before minutes of inference, not after
    except DestinationExists as error:
        raise SystemExit(f"error: --output_dir {error}") from None
    try:
        model, processor, label_names = load_checkpoint(args.model, args.device, args.revision)
    except NotACnnLstmCheckpoint as error:
        raise SystemExit(f"error: --model {error}") from None
    data_dir = Path(args.data_dir)
    dataset = load_split(data_dir, args.split, label_names)
    temperature = float(getattr(model.config, "calibration_temperature", 1.0))
    logits = predict(model, processor, dataset, args.batch_size) * temperature  # undo T: raw logits
    labels = np.asarray(dataset["label"], dtype=np.int64)
    columns = {name: dataset[name] for name in ("patient_id", "source") if name in dataset.column_names}
    with atomic_folder(output_dir, overwrite=args.overwrite) as folder:
        report = write_report(
            folder,
            logits,
            labels,
            label_names,
            temperature=temperature,
            calibration_fitted_on="checkpoint's stored",
            columns=columns,
            bootstrap_samples=args.bootstrap_samples,
            ece_bins=args.ece_bins,
            seed=args.seed,
            extra={"model": args.model, "data_dir": str(data_dir), "split": args.split},
        )
    logger.info("report written to %s", output_dir.resolve())
    summary = summarize(report, args, temperature, output_dir)
    print(json.dumps(summary))
    return summary


def summarize(report: dict, args: EvaluateArguments, temperature: float, output_dir: Path) -> dict:
    """The one JSON object printed on stdout: headline metrics, intervals, per source, and where the report is."""
    metrics = report["metrics"]
    return {
        "model": args.model,
        "data_dir": str(args.data_dir),
        "num_samples": report["num_samples"],
        **{key: metrics[key] for key in SUMMARY_KEYS},
        "ece": report["calibration"]["ece_after"],
        "ece_uncalibrated": report["calibration"]["ece_before"],
        "temperature": temperature,
        "per_class": metrics["per_class"],
        "confusion_matrix": metrics["confusion_matrix"],
        "intervals": report["bootstrap"]["intervals"],
        "per_source": {name: values["accuracy"] for name, values in report["per_source"].items()},
        "report_dir": str(output_dir),
    }


if __name__ == "__main__":
    main()
