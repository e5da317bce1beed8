"""Where training and evaluation data come from, and the checks that run before any training step.

Three sources, one result (a `datasets.DatasetDict` with `image`, `label` (ClassLabel), `patient_id`, `source`, ...):
- a `save_to_disk` folder written by the corpus builder (`train/corpus/build.py`, `scripts/build_corpus.py`);
- a raw source folder (cxr3 or another layout the builder knows), built on the fly into `<output_dir>/corpus`
  with the builder, so splits are patient-disjoint and folds exist exactly as for a pre-built corpus;
- a Hub dataset (`--dataset_name`).
For evaluation only, `read_cxr3_folder` reads any cxr3-layout folder as one split, every image kept (a held-out
set must not be deduplicated or re-split).
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value, load_dataset, load_from_disk

from train.corpus.build import build_corpus
from train.training.input_pipeline import CachedSplit, cache_images

logger = logging.getLogger(__name__)

# Folder / metadata label spellings -> canonical class index (README "Data").
_LABEL_ALIASES = {"covid19": 0, "covid-19": 0, "covid": 0, "normal": 1, "pneumonia": 2}
REPORT_COLUMNS = ("patient_id", "source", "fold", "sha256")


class DataError(ValueError):
    """A dataset problem the user must fix; raised before any training step, with what to do about it."""


def is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file()


def is_cxr3_folder(path: Path) -> bool:
    return (path / "metadata.csv").is_file() and (path / "images").is_dir()


def read_cxr3_folder(folder: str | Path, label_names: Sequence[str]) -> Dataset:
    """Every image of a cxr3-layout folder (metadata.csv + images/<label>/...) as one `Dataset`."""
    folder = Path(folder)
    if not is_cxr3_folder(folder):
        raise DataError(f"{folder} is not a cxr3-layout folder (expected metadata.csv and images/)")
    canonical = {name.lower(): index for index, name in enumerate(label_names)}
    rows: dict[str, list[Any]] = {name: [] for name in ("image", "label", "patient_id", "source", "file", "view")}
    with open(folder / "metadata.csv", newline="", encoding="utf-8") as handle:
        for line_number, row in enumerate(csv.DictReader(handle), start=2):
            raw = (row.get("label") or "").strip().lower()
            label = canonical.get(raw, _LABEL_ALIASES.get(raw))
            if label is None:
                raise DataError(f"{folder / 'metadata.csv'} line {line_number}: unknown label {row.get('label')!r}")
            path = folder / row["file"]
            if not path.is_file():
                raise DataError(f"{folder / 'metadata.csv'} line {line_number}: missing image {row['file']}")
            rows["image"].append(str(path))
            rows["label"].append(label)
            rows["patient_id"].append(row.get("patient_group") or row["file"])
            rows["source"].append(row.get("source") or "unknown")
            rows["file"].append(row["file"])
            rows["view"].append(row.get("view") or "")
    if not rows["image"]:
        raise DataError(f"{folder / 'metadata.csv'} lists no images")
    features = Features(
        {
            "image": Image(),
            "label": ClassLabel(names=list(label_names)),
            "patient_id": Value("string"),
            "source": Value("string"),
            "file": Value("string"),
            "view": Value("string"),
        }
    )
    return Dataset.from_dict(rows, features=features)


def build_corpus_from_folder(source: Path, destination: Path, options: dict[str, Any]) -> Path:
    """Run the corpus builder on a raw folder once; later runs (resume, other models) reuse the built folder."""
    if is_saved_dataset(destination):
        logger.info("reusing the corpus already built at %s", destination)
        return destination
    logger.info("building the corpus from %s into %s", source, destination)
    return Path(build_corpus([source], destination, **options))


def load_dataset_dict(
    data_dir: str | None,
    dataset_name: str | None,
    work_dir: str | Path,
    dataset_config_name: str | None = None,
    dataset_revision: str | None = None,
    corpus_options: str | dict[str, Any] | None = None,
) -> DatasetDict:
    """The DatasetDict to train on, from whichever source was given (exactly one of data_dir / dataset_name)."""
    if bool(data_dir) == bool(dataset_name):
        raise DataError("give exactly one of --data_dir (a built corpus or a raw folder) and --dataset_name")
    if dataset_name:
        return load_dataset(dataset_name, dataset_config_name, revision=dataset_revision)
    path = Path(data_dir)
    if not path.is_dir():
        raise DataError(f"--data_dir {path} does not exist")
    if not is_saved_dataset(path):
        options = json.loads(corpus_options) if isinstance(corpus_options, str) else dict(corpus_options or {})
        path = build_corpus_from_folder(path, Path(work_dir) / "corpus", options)
    empty = _empty_saved_splits(path)
    if empty:  # datasets cannot even load a saved split without data files: say what is wrong instead
        raise DataError(f"split {empty[0]!r} is empty: every split needs at least one image ({path})")
    dataset = load_from_disk(str(path))
    if not isinstance(dataset, DatasetDict):
        raise DataError(f"{path} holds a single Dataset; training needs a DatasetDict with train/validation/test")
    return dataset


def _empty_saved_splits(path: Path) -> list[str]:
    """Splits of a save_to_disk DatasetDict that were saved without any rows."""
    index = path / "dataset_dict.json"
    if not index.is_file():
        return []
    empty = []
    for split in json.loads(index.read_text()).get("splits", []):
        state = path / split / "state.json"
        if state.is_file() and not json.loads(state.read_text()).get("_data_files"):
            empty.append(split)
    return empty


def label_names_of(dataset: Dataset | DatasetDict, label_column: str = "label") -> list[str] | None:
    features = next(iter(dataset.values())).features if isinstance(dataset, DatasetDict) else dataset.features
    feature = features.get(label_column)
    return list(feature.names) if isinstance(feature, ClassLabel) else None


def check_dataset(
    dataset: DatasetDict,
    label_names: Sequence[str],
    splits: Sequence[str],
    label_column: str = "label",
    image_column: str = "image",
) -> None:
    """Fail clearly (before training) on missing/empty splits, missing columns, or label names that differ."""
    missing = [split for split in splits if split not in dataset]
    if missing:
        raise DataError(
            f"dataset has no split(s) {missing}; it has {sorted(dataset)}. Rebuild it with the corpus builder"
        )
    for split in splits:
        if len(dataset[split]) == 0:
            raise DataError(f"split {split!r} is empty: every split needs at least one image")
        columns = dataset[split].column_names
        for column in (image_column, label_column):
            if column not in columns:
                raise DataError(f"split {split!r} has no {column!r} column (columns: {columns})")
        names = label_names_of(dataset[split], label_column)
        if names is None:
            raise DataError(
                f"split {split!r}: column {label_column!r} must be a ClassLabel with names {list(label_names)}, "
                f"got {dataset[split].features[label_column]}"
            )
        if names != list(label_names):
            raise DataError(
                f"split {split!r}: label names {names} do not match the model's {list(label_names)} "
                "(same names in the same order are required: the output index is the class)"
            )


def check_folds(dataset: Dataset, num_folds: int, fold_column: str = "fold") -> None:
    """Patient-grouped CV needs the builder's fold column with every fold 0..k-1 present."""
    if fold_column not in dataset.column_names:
        raise DataError(f"--cross_validation needs a {fold_column!r} column (built by the corpus builder)")
    folds = set(dataset[fold_column])
    if folds != set(range(num_folds)):
        raise DataError(
            f"--cross_validation {num_folds} but the dataset's folds are {sorted(folds)}; "
            f"rebuild the corpus with {num_folds} folds or pass --cross_validation {len(folds)}"
        )


def load_split(data_dir: Path, split: str, label_names: list[str]) -> Dataset:
    """All images of a cxr3-layout folder, or one split of a built corpus, label names checked."""
    if is_cxr3_folder(data_dir) and not is_saved_dataset(data_dir):
        return read_cxr3_folder(data_dir, label_names)
    if not is_saved_dataset(data_dir):
        raise DataError(f"{data_dir} is neither a built corpus (save_to_disk) nor a cxr3-layout folder")
    loaded = load_from_disk(str(data_dir))
    dataset = loaded if isinstance(loaded, DatasetDict) else DatasetDict({split: loaded})
    check_dataset(dataset, label_names, [split])
    return dataset[split]


def select_samples(dataset: Dataset, max_samples: int | None, seed: int) -> Dataset:
    """A seeded random subset (smoke runs); the whole split when max_samples is None."""
    if max_samples is None or max_samples >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(max_samples))


def to_cached_split(
    dataset: Dataset,
    image_size: int,
    num_channels: int,
    label_column: str = "label",
    image_column: str = "image",
    cache_dir: str | Path | None = None,
    num_workers: int = 4,
    crop_to_lungs: bool = False,
) -> CachedSplit:
    """A Dataset -> uint8 images in memory + labels + the columns the report and CV need."""
    pixels = cache_images(dataset, image_size, num_channels, image_column, cache_dir, num_workers, crop_to_lungs)
    columns = {name: list(dataset[name]) for name in REPORT_COLUMNS if name in dataset.column_names}
    return CachedSplit(pixels, np.asarray(dataset[label_column], dtype=np.int64), columns)
