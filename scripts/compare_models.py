"""The paper's experiment, evaluated: the CNN-LSTM against the competitive CNN on the same test images.

    python scripts/compare_models.py --cnn_lstm checkpoints/cnn-lstm-cxr3 --cnn checkpoints/cnn-dense-cxr3 \
        --data_dir .data/cxr3-corpus

Both folders were written by `train/run.py` with the same corpus, split and recipe; each report's
`predictions.csv` holds its calibrated test predictions, scored once at the end of its run, so nothing is
re-scored here (the image hashes must match row by row). Written (train/training/comparison.py):
- `<each folder>/report/comparison.json`, `comparison.md` and `comparison_confusion.png` (the paper's Fig. 6 layout);
- the report key `comparison` of both folders, so their cards, `report/report.md` and the app's report tab show it,
  each linking the other (re-rendered as `scripts/update_card.py` does).
With `--data_dir` (a built corpus), the test split is also run through both models here, one after the other in
this process (preprocessing included, batch 32), for the test-time row of the paper's Table 5.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from cxr_common.atomic import atomic_write_text
from train.training.comparison import compare, load_predictions, markdown, plot_confusions

FIGURE = "comparison_confusion.png"


@dataclass
class CompareArguments:
    cnn_lstm: str = field(default="checkpoints/cnn-lstm-cxr3", metadata={"help": "The CNN-LSTM's final folder."})
    cnn: str = field(default="checkpoints/cnn-dense-cxr3", metadata={"help": "The competitive CNN's final folder."})
    data_dir: str | None = field(
        default=None, metadata={"help": "The built corpus both were trained on: times both models on its test split."}
    )
    bootstrap_samples: int = field(default=2000, metadata={"help": "Paired patient-bootstrap resamples."})
    seed: int = field(default=42, metadata={"help": "Seed of the bootstrap."})
    batch_size: int = field(default=32, metadata={"help": "Batch size of the timed test pass."})


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def time_test_split(folders: dict[str, Path], data_dir: Path, batch_size: int) -> dict:
    """Seconds to classify the test split (image processor + fp32 forward) with each model, on this CPU."""
    import torch
    from datasets import load_from_disk
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    test = load_from_disk(str(data_dir))["test"]
    images = [image.convert("RGB") for image in test["image"]]
    seconds = {}
    for name, folder in folders.items():
        model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
        processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
        with torch.inference_mode():
            model(**processor(images[:2], return_tensors="pt"))  # warm-up
            start = time.perf_counter()
            for index in range(0, len(images), batch_size):
                model(**processor(images[index : index + batch_size], return_tensors="pt"))
            seconds[name] = time.perf_counter() - start
        del model
    return {**seconds, "images": len(images), "hardware": f"{cpu_name()}, {torch.get_num_threads()} threads, fp32"}


def store(folder: Path, other: Path, other_name: str, result: dict, text: str) -> None:
    """comparison.json/.md/.png in folder/report, the report key `comparison`, then card and report.md again."""
    from train.training.model_card import DEFAULT_TEMPLATE, card_context, render_model_card
    from train.training.report import comparison_section, render_report_markdown

    report_dir = folder / "report"
    plot_confusions(result, report_dir / FIGURE)
    link = os.path.relpath(other.resolve(), folder.resolve())
    metrics_path = report_dir / "metrics.json"
    report = json.loads(metrics_path.read_text())
    report["comparison"] = {"markdown": text, "figure": FIGURE, "companion": other.name, "companion_link": link,
                            "companion_label": other_name}  # fmt: skip
    atomic_write_text(report_dir / "comparison.json", json.dumps(result, indent=2))
    atomic_write_text(report_dir / "comparison.md", comparison_section(report["comparison"], True) + "\n")
    card = render_model_card(DEFAULT_TEMPLATE.read_text(encoding="utf-8"), card_context(report, report["card_info"]))
    report_text = render_report_markdown(report)
    atomic_write_text(metrics_path, json.dumps(report, indent=2))
    atomic_write_text(report_dir / "report.md", report_text)
    atomic_write_text(folder / "README.md", card)


def main(argv: list[str] | None = None) -> int:
    (args,) = HfArgumentParser(CompareArguments).parse_args_into_dataclasses(args=argv)
    folders = {"CNN-LSTM": Path(args.cnn_lstm), "CNN": Path(args.cnn)}
    for folder in folders.values():
        if not (folder / "report" / "metrics.json").is_file():
            print(f"error: {folder} has no report/metrics.json (train it with train/run.py first)", file=sys.stderr)
            return 2
    try:
        lstm, cnn = (load_predictions(folder, name) for name, folder in folders.items())
        test_seconds = time_test_split(folders, Path(args.data_dir), args.batch_size) if args.data_dir else None
        result = compare(lstm, cnn, args.bootstrap_samples, args.seed, test_seconds)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    text = markdown(result, FIGURE)
    store(folders["CNN-LSTM"], folders["CNN"], "the competitive CNN", result, text)
    store(folders["CNN"], folders["CNN-LSTM"], "the CNN-LSTM", result, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
