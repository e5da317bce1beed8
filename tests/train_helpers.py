"""Shared pieces of the training tests: a small cxr3-layout folder of real X-rays and a DatasetDict built from it.

The DatasetDict is built here (patient-grouped, with the corpus builder's features and `fold` column) so that most
training tests do not depend on the builder's internals; one end-to-end test runs the builder itself.
Use from a test module: `from train_helpers import mini_cxr3_fixture, tiny_corpus_fixture  # noqa: F401`.
"""

from __future__ import annotations

import csv
import hashlib
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO_ROOT / "train" / "configs" / "tiny.json"
LABEL_NAMES = ["COVID-19", "Normal", "Pneumonia"]
FOLDER_LABELS = {"covid19": 0, "normal": 1, "pneumonia": 2}


def make_mini_cxr3(source: Path, destination: Path, per_label: int = 24) -> Path:
    """Copy `per_label` real images per label (sources taken in turn, whole patient groups) in the cxr3 layout."""
    with open(source / "metadata.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    by_label_source: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        by_label_source[(row["label"], row["source"])].append(row)
    chosen = []
    for label in FOLDER_LABELS:
        pools = [
            sorted(group, key=lambda r: r["file"]) for key, group in sorted(by_label_source.items()) if key[0] == label
        ]
        taken = 0
        while taken < per_label and any(pools):
            for pool in pools:
                if pool and taken < per_label:
                    chosen.append(pool.pop(0))
                    taken += 1
    for row in chosen:
        target = destination / row["file"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / row["file"], target)
    with open(destination / "metadata.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(chosen)
    return destination


def make_dataset_dict(folder: Path, label_names: list[str] | None = None, num_folds: int = 2) -> Any:
    """Patient-grouped train (folds 1..k-1) / validation (fold 0) / test DatasetDict with the builder's features."""
    from datasets import ClassLabel, Dataset, DatasetDict

    from train.corpus.build import corpus_features

    with open(folder / "metadata.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    patients: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        patients[row["patient_group"]].append(row)
    # round-robin over patients sorted by label: every split and fold gets every class
    ordered = sorted(patients, key=lambda p: (FOLDER_LABELS[patients[p][0]["label"]], p))
    assignment = {patient: index % (num_folds + 1) - 1 for index, patient in enumerate(ordered)}  # -1 = test
    features = corpus_features()
    if label_names is not None:  # a corpus whose label names differ from the model's, for the mismatch checks
        features["label"] = ClassLabel(names=label_names)
    splits: dict[str, dict[str, list]] = {name: defaultdict(list) for name in ("train", "validation", "test")}
    for row in rows:
        fold = assignment[row["patient_group"]]
        split = "test" if fold < 0 else "validation" if fold == 0 else "train"
        data = (folder / row["file"]).read_bytes()
        values = {
            "image": str(folder / row["file"]),
            "label": FOLDER_LABELS[row["label"]],
            "patient_id": row["patient_group"],
            "source": row["source"],
            "original_finding": row["original_finding"],
            "view": row["view"],
            "sha256": hashlib.sha256(data).hexdigest(),
            "fold": fold,
        }
        for key, value in values.items():
            splits[split][key].append(value)
    return DatasetDict({name: Dataset.from_dict(dict(columns), features=features) for name, columns in splits.items()})


def tiny_args(data_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    """CLI arguments of a tiny CPU run (train/configs/tiny.json)."""
    return ["--config", str(TINY_CONFIG), "--data_dir", str(data_dir), "--output_dir", str(output_dir), *extra]


def run_main(argv: list[str]) -> Path | None:
    """`python train/run.py ARGV` in this process (the modules are imported once for all tests)."""
    from train.run import main

    return main(argv)


@pytest.fixture(scope="session", name="mini_cxr3")
def mini_cxr3_fixture(cxr3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """72 real X-rays (24 per class, sources in turn) in the cxr3 layout."""
    return make_mini_cxr3(cxr3_dir, tmp_path_factory.mktemp("mini-cxr3"), per_label=24)


@pytest.fixture(scope="session", name="tiny_corpus")
def tiny_corpus_fixture(mini_cxr3: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`mini_cxr3` as a save_to_disk DatasetDict with two patient-grouped folds."""
    destination = tmp_path_factory.mktemp("tiny-corpus") / "corpus"
    make_dataset_dict(mini_cxr3).save_to_disk(str(destination))
    return destination
