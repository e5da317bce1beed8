"""Evaluate any checkpoint (folder or Hub id) on a built corpus or on any cxr3-layout folder.

    python scripts/evaluate_checkpoint.py --model checkpoints/cnn-lstm-cxr3 --data_dir ../shared/data/cxr3 \
        --output_dir eval/

Prints ONE JSON object of metrics on stdout (logs go to stderr) and writes the report folder: metrics.json,
report.md and the PNG figures, as at the end of training. Images go through the checkpoint's own image processor
and forward pass, i.e. what a user of the checkpoint gets (the stored calibration temperature included;
"uncalibrated" numbers are recomputed from logits x T). On CPU the forward pass is exact fp32 PyTorch by default
(`--cpu_inference_backend torch`, as in scripts/shortcut_audit.py), not the checkpoint's "auto" (bf16 on CPUs with
native bf16), so metrics and ECE do not depend on the machine; pass another backend to measure that one.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from transformers import AutoImageProcessor, AutoModelForImageClassification, HfArgumentParser

from train.training.dataset_loading import load_split
from train.training.report import write_report

logger = logging.getLogger("evaluate_checkpoint")
SUMMARY_KEYS = ("accuracy", "macro_precision", "macro_sensitivity", "macro_specificity", "macro_f1", "macro_auc")


@dataclass
class EvaluateArguments:
    model: str = field(metadata={"help": "Checkpoint folder or Hub model id (loaded with trust_remote_code)."})
    data_dir: str = field(metadata={"help": "A save_to_disk corpus or any folder in the cxr3 layout."})
    output_dir: str | None = field(default=None, metadata={"help": "Report folder (default: evaluation/<model>)."})
    split: str = field(default="test", metadata={"help": "Split of a built corpus to evaluate."})
    revision: str | None = field(default=None, metadata={"help": "Hub revision of --model."})
    batch_size: int = field(default=32, metadata={"help": "Images per forward pass."})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cpu or cuda."})
    cpu_inference_backend: str = field(
        default="torch",
        metadata={
            "help": "CPU forward pass for the reported metrics. Default torch: exact fp32 PyTorch, the same as "
            "scripts/shortcut_audit.py, whatever the checkpoint stores. Pass the checkpoint's own value (auto, "
            "bf16, onnxruntime, ...) to measure what that backend gives instead."
        },
    )
    bootstrap_samples: int = field(default=1000, metadata={"help": "Bootstrap resamples for the 95%% intervals."})
    ece_bins: int = field(default=15, metadata={"help": "Equal-width confidence bins of the ECE."})
    seed: int = field(default=0, metadata={"help": "Seed of the bootstrap."})


@torch.inference_mode()
def predict(model: torch.nn.Module, processor, dataset: Dataset, batch_size: int, device: torch.device) -> np.ndarray:
    """Logits as the checkpoint reports them (divided by its calibration temperature)."""
    batches = []
    for start in range(0, len(dataset), batch_size):
        images = dataset[start : start + batch_size]["image"]
        pixel_values = processor(images=images, return_tensors="pt")["pixel_values"].to(device)
        batches.append(model(pixel_values=pixel_values).logits.float().cpu().numpy())
        logger.info("evaluated %d / %d images", min(start + batch_size, len(dataset)), len(dataset))
    return np.concatenate(batches).astype(np.float64)


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(EvaluateArguments).parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace(
        "auto", "cpu"))  # fmt: skip
    model = AutoModelForImageClassification.from_pretrained(
        args.model, trust_remote_code=True, revision=args.revision, dtype=torch.float32
    ).to(device)
    model.eval()
    model.config.cpu_inference_backend = args.cpu_inference_backend  # default torch: exact fp32, not bf16
    processor = AutoImageProcessor.from_pretrained(args.model, trust_remote_code=True, revision=args.revision)
    label_names = [model.config.id2label[index] for index in range(model.config.num_labels)]
    data_dir = Path(args.data_dir)
    dataset = load_split(data_dir, args.split, label_names)
    temperature = float(getattr(model.config, "calibration_temperature", 1.0))
    logits = predict(model, processor, dataset, args.batch_size, device) * temperature  # undo T: raw logits
    labels = np.asarray(dataset["label"], dtype=np.int64)
    columns = {name: dataset[name] for name in ("patient_id", "source") if name in dataset.column_names}
    output_dir = Path(args.output_dir or Path("evaluation") / f"{Path(args.model).name}__{data_dir.name}")
    report = write_report(
        output_dir,
        logits,
        labels,
        label_names,
        temperature,
        "checkpoint's stored",
        columns,
        None,
        args.bootstrap_samples,
        args.ece_bins,
        args.seed,
        {"model": args.model, "data_dir": str(data_dir), "split": args.split},
    )
    metrics = report["metrics"]
    summary = {
        "model": args.model,
        "data_dir": str(data_dir),
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
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
