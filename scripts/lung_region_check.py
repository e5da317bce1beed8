"""How well the per-image lung fields agree with hand-drawn lung boxes, against the fixed ellipses they replaced.

    python scripts/lung_region_check.py [--data_dir ../shared/data/cxr3] [--grid docs/lung_fields.png]

Reads `tests/data/lung_fields/hand_boxes.csv` (24 development images, boxes drawn by hand: apices to costophrenic
angles, both lungs), finds each image's lung fields (`modeling_cnn_lstm/lung_region_cnn_lstm.py`) and prints, per
image and in summary, the intersection-over-union of the fields' bounding box with the hand box, and of the fixed
two-ellipse region's box (rows 18-78%, columns 13-87%) with the hand box, plus the time per image. `--grid` writes
an overlay of the fields on the images (looked at in review). Prints one JSON line at the end.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from modeling_cnn_lstm.lung_region_cnn_lstm import FIXED_ELLIPSES, ellipse_mask, find_lung_region

HAND_BOXES = Path(__file__).resolve().parents[1] / "tests" / "data" / "lung_fields" / "hand_boxes.csv"


def read_hand_boxes(path: Path = HAND_BOXES) -> list[dict]:
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    rows = list(csv.DictReader(lines))
    for row in rows:
        row["box"] = tuple(float(row[key]) for key in ("top", "left", "bottom", "right"))
    return rows


def iou(first: tuple[float, ...], second: tuple[float, ...]) -> float:
    top, left = max(first[0], second[0]), max(first[1], second[1])
    bottom, right = min(first[2], second[2]), min(first[3], second[3])
    inter = max(0.0, bottom - top) * max(0.0, right - left)

    def area(box: tuple[float, ...]) -> float:
        return (box[2] - box[0]) * (box[3] - box[1])

    return inter / (area(first) + area(second) - inter)


def mask_box(mask: torch.Tensor) -> tuple[float, float, float, float]:
    rows, cols = mask.any(dim=1).nonzero(), mask.any(dim=0).nonzero()
    height, width = mask.shape
    return (float(rows.min()) / height, float(cols.min()) / width,
            float(rows.max() + 1) / height, float(cols.max() + 1) / width)  # fmt: skip


def load_grey(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("L"), dtype=np.float32))


def measure(data_dir: Path) -> dict:
    fixed_box = mask_box(ellipse_mask(224, 224, FIXED_ELLIPSES))
    rows, seconds = [], []
    for row in read_hand_boxes():
        image = load_grey(data_dir / row["file"])
        started = time.perf_counter()
        region = find_lung_region(image)
        seconds.append(time.perf_counter() - started)
        rows.append({
            "file": row["file"], "iou_fields": iou(region.box, row["box"]), "iou_fixed": iou(fixed_box, row["box"]),
            "fallback": any(region.fallback),
        })  # fmt: skip
    fields, fixed = [row["iou_fields"] for row in rows], [row["iou_fixed"] for row in rows]
    return {
        "images": len(rows),
        "iou_fields_median": statistics.median(fields),
        "iou_fields_mean": statistics.fmean(fields),
        "iou_fields_min": min(fields),
        "iou_fixed_median": statistics.median(fixed),
        "iou_fixed_mean": statistics.fmean(fixed),
        "fields_better": sum(a > b for a, b in zip(fields, fixed, strict=True)),
        "fallbacks": sum(row["fallback"] for row in rows),
        "ms_per_image_median": 1000 * statistics.median(seconds),
        "rows": rows,
    }


def draw_grid(data_dir: Path, path: Path, tile: int = 144, columns: int = 8) -> None:
    hand = read_hand_boxes()
    grid = Image.new("RGB", (tile * columns, tile * ((len(hand) + columns - 1) // columns)))
    for index, row in enumerate(hand):
        image = load_grey(data_dir / row["file"])
        mask = find_lung_region(image, tile, tile).mask.numpy()
        rgb = np.asarray(Image.fromarray(image.numpy().astype(np.uint8)).resize((tile, tile)).convert("RGB")).copy()
        padded = np.pad(mask, 1)
        edge = mask & ~(padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
        rgb[edge] = (0, 255, 140)
        picture = Image.fromarray(rgb)
        top, left, bottom, right = (value * tile for value in row["box"])
        ImageDraw.Draw(picture).rectangle((left, top, right, bottom), outline=(255, 200, 0))
        grid.paste(picture, ((index % columns) * tile, (index // columns) * tile))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.convert("P", palette=Image.ADAPTIVE, colors=48).save(path, optimize=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/cxr3")
    parser.add_argument("--grid", type=Path, default=None, help="Write an overlay grid PNG here.")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = measure(args.data_dir)
    for row in result["rows"]:
        print(f"{row['file']:60s} IoU fields {row['iou_fields']:.2f}  fixed ellipses {row['iou_fixed']:.2f}"
              + ("  (fallback)" if row["fallback"] else ""))  # fmt: skip
    print(
        f"{result['images']} images: box IoU with the hand boxes, per-image fields median "
        f"{result['iou_fields_median']:.2f} (mean {result['iou_fields_mean']:.2f}, "
        f"min {result['iou_fields_min']:.2f}); fixed ellipses median "
        f"{result['iou_fixed_median']:.2f} (mean {result['iou_fixed_mean']:.2f}); fields better on "
        f"{result['fields_better']}; {result['ms_per_image_median']:.1f} ms per image (1 thread, 512 px input)"
    )
    if args.grid:
        draw_grid(args.data_dir, args.grid)
    print(json.dumps({key: value for key, value in result.items() if key != "rows"}))
    return result


if __name__ == "__main__":
    main()
