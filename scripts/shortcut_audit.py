"""Shortcut audit of a checkpoint on any split: does it read the lungs, or the collection a film comes from?

    python scripts/shortcut_audit.py --model checkpoints/cnn-lstm-cxr3 --data_dir CORPUS [--split validation]

The audit itself (`train/training/shortcut_audit.py`, also run at the end of every training run on the test split):
the images as they are, with the lung fields hidden and with only the lung fields visible (fields found per image,
`modeling_cnn_lstm/lung_region_cnn_lstm.py`), per-class sensitivity, specificity and AUC in each condition, a
within-class source probe on the penultimate features, the share of Grad-CAM and Integrated Gradients evidence
inside the lung fields, and per-source confusion matrices. Prints ONE JSON object and writes `shortcut_audit.json`,
`shortcut_audit.md` and `shortcut_audit_mask.png` (the three conditions on one real image with its lung fields).
`python scripts/update_card.py --model_dir FOLDER --shortcut_audit shortcut_audit.json` stores it in a checkpoint's
report and card.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from transformers import HfArgumentParser

from cxr_common.atomic import atomic_write_text
from modeling_cnn_lstm.lung_region_cnn_lstm import find_lung_region
from train.training.checkpoint_loading import NotACnnLstmCheckpoint, load_checkpoint
from train.training.dataset_loading import load_split
from train.training.shortcut_audit import CONDITION_TITLES, CONDITIONS, AuditSettings, hide, run_audit

logger = logging.getLogger("shortcut_audit")


@dataclass
class AuditArguments:
    model: str = field(
        metadata={"help": "Checkpoint folder or Hub id (this repository's classes, no remote code; as float32)."}
    )
    data_dir: str = field(metadata={"help": "A save_to_disk corpus or any folder in the cxr3 layout."})
    split: str = field(default="test", metadata={"help": "Split of a built corpus to audit."})
    output_dir: str | None = field(default=None, metadata={"help": "Report folder (default: shortcut_audit/<model>)."})
    batch_size: int = field(default=16, metadata={"help": "Images per forward pass."})
    ig_per_class: int = field(default=4, metadata={"help": "Integrated Gradients on this many images per class."})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cpu or cuda."})
    max_samples: int | None = field(default=None, metadata={"help": "Audit only the first N images (smoke runs)."})


def plot_conditions(processor: Any, image: Any, path: Path) -> None:
    """The three conditions side by side on one real image (first channel, as the model sees it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pixel_values = processor(images=[image], return_tensors="pt")["pixel_values"]
    masks = find_lung_region(pixel_values[0]).mask[None]
    figure, axes = plt.subplots(1, len(CONDITIONS), figsize=(4 * len(CONDITIONS), 4.3))
    for axis, name in zip(axes, CONDITIONS, strict=True):
        axis.imshow(hide(pixel_values, masks, name)[0, 0].numpy(), cmap="gray")
        axis.contour(masks[0].numpy(), levels=[0.5], colors="orange", linewidths=1)
        axis.set_title(CONDITION_TITLES[name])
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    (args,) = HfArgumentParser(AuditArguments).parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    try:
        model, processor, label_names = load_checkpoint(args.model, args.device)
    except NotACnnLstmCheckpoint as error:
        raise SystemExit(f"error: --model {error}") from None
    dataset = load_split(Path(args.data_dir), args.split, label_names)
    if args.max_samples is not None:
        dataset = dataset.select(range(min(args.max_samples, len(dataset))))
    columns = dataset.column_names
    sources = list(dataset["source"]) if "source" in columns else ["unknown"] * len(dataset)
    groups = list(dataset["patient_id"]) if "patient_id" in columns else [str(i) for i in range(len(dataset))]
    result = run_audit(
        model,
        processor,
        dataset["image"],
        np.asarray(dataset["label"], dtype=np.int64),
        sources,
        groups,
        label_names,
        args.split,
        AuditSettings(batch_size=args.batch_size, ig_per_class=args.ig_per_class),
    )
    result = {"model": args.model, "data_dir": str(args.data_dir), **result}
    output_dir = Path(args.output_dir or Path("shortcut_audit") / Path(args.model).name)
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / "shortcut_audit.json", json.dumps(result, indent=2))
    atomic_write_text(output_dir / "shortcut_audit.md", result["markdown"])
    plot_conditions(processor, dataset[0]["image"], output_dir / "shortcut_audit_mask.png")
    print(json.dumps(result))
    print(result["interpretation"], file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
