"""Shortcut audit: does the model look at the lungs? Test images as they are, with the lung fields masked, and with
only the lung fields visible.

    python scripts/shortcut_audit.py --model checkpoints/cnn-lstm-cxr3 --data_dir CORPUS --output_dir audit/

The mask is FIXED (the same for every image, no segmentation): two ellipses over the typical lung positions of a
frontal (PA/AP) chest film, drawn on the model's input frame AFTER the processor's resize (224 x 224 for the paper
network; the geometry is given as fractions of the frame, so it scales with `image_size`):

- left-of-image ellipse centred at (x, y) = (0.30, 0.48) of the width and height, right-of-image at (0.70, 0.48);
- semi-axes 0.17 of the width (horizontal) and 0.30 of the height (vertical), i.e. rows 18%-78%, columns 13%-87%.

Masked pixels are filled with the image's own mean intensity (per image and channel, taken over the whole resized
frame before masking, in the normalized space the model sees), not black: black would look like air and add an
artificial edge of its own. Conditions: `original`, `lungs_masked` (ellipses filled), `lungs_only` (everything outside
the ellipses filled). Prints ONE JSON object (accuracy, macro-F1, per-class sensitivity per condition) and writes
`shortcut_audit.json`, `shortcut_audit.md` and `shortcut_audit_mask.png` (the mask on a real test image).

Reading: a model that uses the lungs should fall towards chance (33%) with the lungs masked and keep much of its
accuracy with only the lungs visible. High accuracy with the lungs masked means it classifies from what lies outside
them (text, markers, borders, collimation, body habitus, source-specific processing): shortcut learning.
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

from train.atomic import atomic_write_text
from train.metrics.cxr_metrics.cxr_metrics import compute_classification_metrics
from train.training.checkpoint_loading import NotACnnLstmCheckpoint, load_checkpoint
from train.training.dataset_loading import load_split

logger = logging.getLogger("shortcut_audit")

# (centre x, centre y, semi-axis x, semi-axis y) as fractions of the frame width / height; see the module docstring.
LUNG_ELLIPSES = ((0.30, 0.48, 0.17, 0.30), (0.70, 0.48, 0.17, 0.30))
CONDITIONS = ("original", "lungs_masked", "lungs_only")
MASK_DESCRIPTION = (
    "Fixed mask, no segmentation: two ellipses on the model's resized input frame, centred at (0.30, 0.48) and "
    "(0.70, 0.48) of width/height with semi-axes 0.17 x 0.30 (rows 18-78%, columns 13-87%); masked pixels are filled "
    "with each image's own mean intensity (per channel, whole frame, before masking)."
)
CHANCE_MARGIN = 0.15  # accuracy this far above chance with the lungs masked counts as shortcut use


@dataclass
class AuditArguments:
    model: str = field(
        metadata={"help": "Checkpoint folder or Hub id (this repository's classes, no remote code; as float32)."}
    )
    data_dir: str = field(metadata={"help": "A save_to_disk corpus or any folder in the cxr3 layout."})
    split: str = field(default="test", metadata={"help": "Split of a built corpus to audit."})
    output_dir: str | None = field(default=None, metadata={"help": "Report folder (default: shortcut_audit/<model>)."})
    batch_size: int = field(default=32, metadata={"help": "Images per forward pass."})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cpu or cuda."})
    max_samples: int | None = field(default=None, metadata={"help": "Audit only the first N images (smoke runs)."})


def lung_mask(height: int, width: int) -> torch.Tensor:
    """Boolean (height, width) mask, True inside the two lung ellipses, evaluated at pixel centres."""
    rows = (torch.arange(height, dtype=torch.float64) + 0.5) / height
    cols = (torch.arange(width, dtype=torch.float64) + 0.5) / width
    y, x = torch.meshgrid(rows, cols, indexing="ij")
    mask = torch.zeros(height, width, dtype=torch.bool)
    for cx, cy, ax, ay in LUNG_ELLIPSES:
        mask |= ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0
    return mask


def apply_condition(pixel_values: torch.Tensor, condition: str) -> torch.Tensor:
    """(N, C, H, W) -> a copy with the condition's region replaced by each image's per-channel mean."""
    if condition == "original":
        return pixel_values.clone()
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; expected one of {CONDITIONS}")
    inside = lung_mask(pixel_values.shape[-2], pixel_values.shape[-1]).to(pixel_values.device)
    hidden = inside if condition == "lungs_masked" else ~inside  # (H, W): the pixels to fill
    fill = pixel_values.mean(dim=(-2, -1), keepdim=True).expand_as(pixel_values)  # (N, C, H, W)
    return torch.where(hidden, fill, pixel_values)


@torch.inference_mode()
def audit_logits(model: torch.nn.Module, processor: Any, dataset: Dataset, batch_size: int) -> dict[str, np.ndarray]:
    """Logits per condition; the three conditions see the same processed batch."""
    device = next(model.parameters()).device
    outputs: dict[str, list[np.ndarray]] = {name: [] for name in CONDITIONS}
    for start in range(0, len(dataset), batch_size):
        images = dataset[start : start + batch_size]["image"]
        pixel_values = processor(images=images, return_tensors="pt")["pixel_values"].to(device)
        for name in CONDITIONS:
            logits = model(pixel_values=apply_condition(pixel_values, name)).logits
            outputs[name].append(logits.float().cpu().numpy())
        logger.info("audited %d / %d images", min(start + batch_size, len(dataset)), len(dataset))
    return {name: np.concatenate(chunks).astype(np.float64) for name, chunks in outputs.items()}


def summarize(logits: dict[str, np.ndarray], labels: np.ndarray, label_names: list[str]) -> dict[str, Any]:
    conditions = {}
    for name, values in logits.items():
        metrics = compute_classification_metrics(values, labels, label_names, input_type="logits")
        conditions[name] = {
            "accuracy": metrics["accuracy"],
            "macro_f1": metrics["macro_f1"],
            "sensitivity": {label: metrics["per_class"][label]["sensitivity"] for label in label_names},
        }
    return conditions


CLASS_KEPT = 0.7  # a class still found this often with the lungs masked (and at most 15 points below as-is) ...


def class_shortcuts(conditions: dict[str, Any]) -> list[tuple[str, float, float]]:
    """(class, sensitivity as is, sensitivity lungs masked) for each class that stays found without the lungs."""
    original = conditions["original"].get("sensitivity") or {}
    masked = conditions["lungs_masked"].get("sensitivity") or {}
    return [
        (name, original[name], masked[name])
        for name in original
        if original[name] is not None
        and masked.get(name) is not None
        and masked[name] >= CLASS_KEPT
        and original[name] - masked[name] <= CHANCE_MARGIN
    ]


def interpret(conditions: dict[str, Any], num_classes: int) -> str:
    chance = 1.0 / num_classes
    original, masked, only = (conditions[name]["accuracy"] for name in CONDITIONS)
    facts = (
        f"Accuracy {100 * original:.1f}% as is, {100 * masked:.1f}% with the lung fields masked, "
        f"{100 * only:.1f}% with only the lung fields visible (chance {100 * chance:.0f}%)."
    )
    kept = class_shortcuts(conditions)
    if original < chance + CHANCE_MARGIN:
        return f"{facts} The model itself is near chance on these images: the audit cannot tell what it relies on."
    if masked >= chance + CHANCE_MARGIN and masked >= 0.8 * original:
        verdict = (
            "Accuracy stays high with the lungs masked: the model classifies largely from outside the lung fields "
            "(text, markers, borders, body habitus, source-specific processing) - shortcut learning."
        )
    elif masked >= chance + CHANCE_MARGIN:
        verdict = (
            "Accuracy with the lungs masked stays well above chance: part of the signal the model uses lies outside "
            "the lung fields (a shortcut), although masking the lungs does cost accuracy."
        )
    else:
        verdict = "Masking the lungs brings accuracy near chance" + (
            "." if kept else ": the model depends on the lung fields."
        )
    if kept:  # overall accuracy can hide one class that needs no lungs at all
        listed = ", ".join(f"{name} {100 * original_value:.0f}% -> {100 * masked_value:.0f}%"
                           for name, original_value, masked_value in kept)  # fmt: skip
        verdict += (
            f" Per class, though, sensitivity barely falls with the lungs masked ({listed}): that class is recognised "
            "without the lung fields, from what lies around them (or is the model's default when they are hidden) - "
            "a class-level shortcut; compare the per-source metrics."
        )
    if only < chance + CHANCE_MARGIN:
        verdict += " With only the lungs visible it is also near chance (the fill itself is out of distribution)."
    return f"{facts} {verdict}"


def render_markdown(result: dict[str, Any]) -> str:
    names = result["label_names"]
    lines = [
        f"Shortcut audit of `{result['model']}` on {result['num_samples']} `{result['split']}` images.",
        "",
        result["mask"],
        "",
        "| Condition | Accuracy | Macro F1 | " + " | ".join(f"Sensitivity {name}" for name in names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for condition, values in result["conditions"].items():
        cells = " | ".join(f"{100 * values['sensitivity'][name]:.1f}" for name in names)
        lines.append(f"| {condition} | {100 * values['accuracy']:.1f} | {100 * values['macro_f1']:.1f} | {cells} |")
    lines += ["", result["interpretation"]]
    return "\n".join(lines) + "\n"


def plot_mask(processor: Any, image: Any, path: Path) -> None:
    """The three conditions side by side on one real image (first channel, de-normalized for display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pixel_values = processor(images=[image], return_tensors="pt")["pixel_values"]
    figure, axes = plt.subplots(1, len(CONDITIONS), figsize=(4 * len(CONDITIONS), 4.3))
    for axis, name in zip(axes, CONDITIONS, strict=True):
        axis.imshow(apply_condition(pixel_values, name)[0, 0].numpy(), cmap="gray")
        axis.set_title(name)
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
    labels = np.asarray(dataset["label"], dtype=np.int64)
    conditions = summarize(audit_logits(model, processor, dataset, args.batch_size), labels, label_names)
    output_dir = Path(args.output_dir or Path("shortcut_audit") / Path(args.model).name)
    output_dir.mkdir(parents=True, exist_ok=True)
    result = {
        "model": args.model,
        "data_dir": str(args.data_dir),
        "split": args.split,
        "num_samples": len(labels),
        "label_names": label_names,
        "mask": MASK_DESCRIPTION,
        "conditions": conditions,
        "interpretation": interpret(conditions, len(label_names)),
    }
    atomic_write_text(output_dir / "shortcut_audit.json", json.dumps(result, indent=2))
    atomic_write_text(output_dir / "shortcut_audit.md", render_markdown(result))
    plot_mask(processor, dataset[0]["image"], output_dir / "shortcut_audit_mask.png")
    print(json.dumps(result))
    print(result["interpretation"], file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
