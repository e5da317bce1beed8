"""Build the three-class `datasets` corpus: patient-disjoint splits, CV folds, deduplication, atomic output.

Pipeline: layout adapters (`corpus_adapters`) -> decode + fingerprints (`corpus_images`) -> exact duplicates
removed -> patient ids and near-duplicates merged into patient groups -> groups assigned to test + k folds ->
leakage re-checked from the final rows (`corpus_report`) -> DatasetDict + report written into a temporary sibling
folder and renamed into place only when complete.
"""

import logging
import os
import secrets
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from PIL import Image

from .images import (
    PHASH_THRESHOLD,
    ImageProblem,
    decode_images_per_second,
    encode_resized,
    load_image,
    resize_longer_side,
)
from .report import (
    SPLITS,
    CorpusRow,
    class_source_table,
    dataset_card,
    fold_tables,
    image_stats,
    leakage_checks,
    licences,
    split_tables,
    write_reports,
)
from .sources import LABEL_NAMES, LAYOUTS, AdapterResult, CorpusError, CorpusRecord, read_source
from .split import PatientGroups, assign_groups, deduplicate, group_and_split

if TYPE_CHECKING:
    from datasets import DatasetDict, Features

__all__ = [
    "LABEL_NAMES",
    "CorpusError",
    "CorpusOptions",
    "assign_groups",
    "build_corpus",
    "corpus_features",
    "push_corpus_to_hub",
]

logger = logging.getLogger(__name__)
BENCHMARK_SIDE = 256  # pre-resize side used for the decode comparison when the corpus itself is not pre-resized


@dataclass
class CorpusOptions:
    """How to split, deduplicate and store; the CLI parses these with HfArgumentParser."""

    layout: Literal["auto", "cxr3", "ieee8023", "covid19-radiography", "chest-xray-pneumonia"] = field(
        default="auto", metadata={"help": "Layout of every --source_dir; auto detects it per folder."}
    )
    protocol: Literal["patient", "paper"] = field(
        default="patient",
        metadata={"help": "patient: patient-disjoint splits. paper: the paper's leaky image-level 80/20 split."},
    )
    test_fraction: float = field(
        default=0.2, metadata={"help": "Share of images (by patient group) held out as test."}
    )
    num_folds: int = field(default=5, metadata={"help": "Cross-validation folds over train + validation."})
    validation_fold: int = field(default=0, metadata={"help": "Which fold forms the validation split."})
    seed: int = field(default=42, metadata={"help": "Seed of the split; the same input and seed give the same split."})
    phash_threshold: int = field(
        default=PHASH_THRESHOLD,
        metadata={"help": "Near-duplicate Hamming threshold on the 256-bit pHash; -1 turns merging off."},
    )
    drop_unknown_labels: bool = field(
        default=False, metadata={"help": "Leave out images whose label maps to none of the three classes."}
    )
    skip_missing_files: bool = field(
        default=False, metadata={"help": "Skip (and report) files that a metadata.csv lists but that do not exist."}
    )
    resize_longer_side: int | None = field(
        default=None, metadata={"help": "Store images shrunk to this longer side (e.g. 256) so decoding is cheap."}
    )
    resized_format: Literal["jpeg", "png"] = field(
        default="jpeg",
        metadata={"help": "Format of pre-resized images: jpeg (quality 95, fastest to decode) or png (lossless)."},
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --output_dir (atomically)."})
    num_workers: int = field(default=2, metadata={"help": "Threads that decode images."})
    benchmark_images: int = field(
        default=200, metadata={"help": "Images used to measure decode+preprocess speed; 0 skips the measurement."}
    )

    def __post_init__(self) -> None:
        if self.layout != "auto" and self.layout not in LAYOUTS:
            raise CorpusError(f"layout {self.layout!r} is not one of auto, {', '.join(LAYOUTS)}")
        if self.protocol not in ("patient", "paper"):
            raise CorpusError(f"protocol {self.protocol!r} is not 'patient' or 'paper'")
        if not 0 < self.test_fraction < 1:
            raise CorpusError(f"test_fraction must be between 0 and 1 (exclusive), got {self.test_fraction}")
        if self.num_folds < 2:
            raise CorpusError(f"num_folds must be at least 2, got {self.num_folds}")
        if not 0 <= self.validation_fold < self.num_folds:
            raise CorpusError(f"validation_fold must be in 0..{self.num_folds - 1}, got {self.validation_fold}")
        if self.resize_longer_side is not None and self.resize_longer_side < 32:
            raise CorpusError(f"resize_longer_side must be at least 32 px, got {self.resize_longer_side}")
        if self.num_workers < 1:
            raise CorpusError(f"num_workers must be at least 1, got {self.num_workers}")


def corpus_features() -> "Features":
    """The corpus schema other parts of the project rely on (label ids 0, 1, 2 = LABEL_NAMES)."""
    from datasets import ClassLabel, Features, Image, Value

    return Features(
        {
            "image": Image(),
            "label": ClassLabel(names=list(LABEL_NAMES)),
            "patient_id": Value("string"),
            "source": Value("string"),
            "original_finding": Value("string"),
            "view": Value("string"),
            "sha256": Value("string"),
            "fold": Value("int32"),
        }
    )


def _check_output_dir(output_dir: Path, sources: list[Path], overwrite: bool) -> None:
    """Fail before any work if the output would clobber data or land inside a source."""
    for source in sources:
        if output_dir == source or source in output_dir.parents or output_dir in source.parents:
            raise CorpusError(f"--output_dir {output_dir} overlaps --source_dir {source}; choose a separate folder")
    if output_dir.exists() and not output_dir.is_dir():
        raise CorpusError(f"--output_dir {output_dir} exists and is a file; choose another path")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise CorpusError(
            f"--output_dir {output_dir} already exists; pass --overwrite to replace it or pick a new one"
        )


def _label_policy(results: list[AdapterResult], drop_unknown: bool) -> tuple[list[CorpusRecord], dict]:
    """Records with a known label; unknown labels fail (naming them) unless dropping was asked for."""
    unknown = defaultdict(list)
    records = []
    for result in results:
        for record in result.records:
            if record.label is None:
                unknown[record.raw_label].append(record)
            else:
                records.append(record)
    if unknown and not drop_unknown:
        shown = "; ".join(
            f"{label!r} ({len(items)} images, e.g. {items[0].path})" for label, items in sorted(unknown.items())[:5]
        )
        raise CorpusError(
            f"{sum(map(len, unknown.values()))} images have labels that map to none of {', '.join(LABEL_NAMES)}: "
            f"{shown}; fix the labels or pass --drop_unknown_labels to leave them out"
        )
    return records, {label: len(items) for label, items in sorted(unknown.items())}


def _load_all(records: list[CorpusRecord], longer_side: int | None, fmt: str, workers: int) -> tuple[list, list]:
    """Decode every record (threads: PIL releases the GIL while decoding); bad images become report entries."""

    def load(record: CorpusRecord):
        try:
            return load_image(record.path, longer_side, fmt)
        except ImageProblem as problem:
            return str(problem)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        outcomes = list(pool.map(load, records))
    loaded, skipped = [], []
    for record, outcome in zip(records, outcomes, strict=True):
        if isinstance(outcome, str):
            skipped.append({"file": f"{record.path}", "reason": outcome})
        else:
            loaded.append(CorpusRow(record, outcome))
    return loaded, skipped


def _dataset_dict(rows: list[CorpusRow]) -> "DatasetDict":
    from datasets import Dataset, DatasetDict

    features = corpus_features()
    splits = {}
    for split in SPLITS:
        part = sorted(
            (row for row in rows if row.split == split),
            key=lambda r: (r.record.label, r.record.source, r.patient_id, r.record.name),
        )
        columns = {
            "image": [
                {"bytes": r.image.data, "path": Path(r.record.name).with_suffix(r.image.stored_suffix).name}
                for r in part
            ],
            "label": [r.record.label for r in part],
            "patient_id": [r.patient_id for r in part],
            "source": [r.record.source for r in part],
            "original_finding": [r.record.original_finding for r in part],
            "view": [r.record.view for r in part],
            "sha256": [r.image.sha256 for r in part],
            "fold": [r.fold for r in part],
        }
        splits[split] = Dataset.from_dict(columns, features=features, split=split)
    return DatasetDict(splits)


def _decode_benchmark(rows: list[CorpusRow], count: int, longer_side: int | None, fmt: str) -> dict:
    """Decode+preprocess speed from the original files versus pre-resized images, on the same images."""
    if count <= 0 or not rows:
        return {}
    step = max(1, len(rows) // count)
    sample = rows[::step][:count]
    originals = [row.record.path.read_bytes() for row in sample]
    if longer_side:
        resized = [row.image.data for row in sample]
    else:
        resized = []
        for row in sample:
            with Image.open(row.record.path) as image:
                resized.append(encode_resized(resize_longer_side(image, BENCHMARK_SIDE), fmt))
    return {
        "images": len(sample),
        "original_images_per_second": decode_images_per_second(originals),
        "pre_resized_side": longer_side or BENCHMARK_SIDE,
        "pre_resized_format": fmt,
        "pre_resized_images_per_second": decode_images_per_second(resized),
    }


def _write_atomically(output_dir: Path, overwrite: bool, write: Callable[[Path], None]) -> None:
    """Write into a hidden sibling folder, then rename it into place; an old output is swapped out, never mixed."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    temporary = output_dir.parent / f".{output_dir.name}.building-{os.getpid()}-{secrets.token_hex(4)}"
    temporary.mkdir()
    try:
        write(temporary)
        if output_dir.exists():
            if any(output_dir.iterdir()) and not overwrite:
                raise CorpusError(
                    f"--output_dir {output_dir} appeared during the build; pass --overwrite to replace it"
                )
            previous = output_dir.parent / f".{output_dir.name}.previous-{secrets.token_hex(4)}"
            output_dir.rename(previous)
            try:
                temporary.rename(output_dir)
            except BaseException:
                previous.rename(output_dir)
                raise
            shutil.rmtree(previous, ignore_errors=True)
        else:
            temporary.rename(output_dir)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def build_corpus(source_dirs: Iterable[str | Path] | str | Path, output_dir: str | Path, **options) -> Path:
    """Build the corpus from cxr3-layout (or other supported) folders into `output_dir`; returns its path.

    `options` are `CorpusOptions` fields (protocol, test_fraction, num_folds, seed, resize_longer_side, ...).
    Raises CorpusError, with nothing written, for bad input or a split that would leak patients.
    """
    start = time.perf_counter()
    opts = CorpusOptions(**options)
    if isinstance(source_dirs, str | Path):
        source_dirs = [source_dirs]
    sources = [Path(source).resolve() for source in source_dirs]
    if not sources:
        raise CorpusError("no source folder given; pass --source_dir DIR")
    output_dir = Path(output_dir).resolve()
    _check_output_dir(output_dir, sources, opts.overwrite)

    results = [read_source(source, opts.layout, opts.skip_missing_files) for source in sources]
    records, dropped = _label_policy(results, opts.drop_unknown_labels)
    logger.info("decoding %d images from %d source folder(s)", len(records), len(sources))
    rows, bad_images = _load_all(records, opts.resize_longer_side, opts.resized_format, opts.num_workers)
    skipped = [skip for result in results for skip in result.skipped] + bad_images
    if not records:
        raise CorpusError("no images left after dropping unknown labels; check the labels of the source folders")
    if not rows:
        raise CorpusError(f"none of the {len(records)} listed images could be decoded; first: {skipped[0]['file']}")
    groups = PatientGroups()
    rows, dedup = deduplicate(rows, groups)
    grouping = group_and_split(rows, opts, groups)
    pairs = grouping.pop("pairs")
    leakage = leakage_checks(rows, pairs)
    if opts.protocol == "patient":
        bad = {
            k: leakage[k]
            for k in (
                "patient_overlap_between_splits",
                "patient_overlap_between_folds",
                "exact_duplicates_between_splits",
                "near_duplicate_pairs_across_splits",
                "near_duplicate_pairs_across_folds",
            )
            if leakage[k]
        }
        if bad:
            examples = [e for part in ("splits", "folds") for v in leakage[part].values() for e in v["examples"]]
            raise CorpusError(f"the split leaks {bad} (e.g. patients {examples[:3]}); nothing was written")
    corpus = _dataset_dict(rows)
    class_source, warnings = class_source_table(rows)
    warnings += [
        f"{split}: no {label} images"
        for split in SPLITS
        for label in LABEL_NAMES
        if not any(r.split == split and r.label_name == label for r in rows)
    ]
    if opts.protocol == "paper":
        warnings.insert(0, "LEAKY: paper protocol (image-level split); patients and near-duplicates straddle splits")
    benchmark = _decode_benchmark(rows, opts.benchmark_images, opts.resize_longer_side, opts.resized_format)
    report = {
        "protocol": opts.protocol,
        "leaky": opts.protocol == "paper",
        "label_names": list(LABEL_NAMES),
        "options": asdict(opts),
        "seed": opts.seed,
        "num_folds": opts.num_folds,
        "validation_fold": opts.validation_fold,
        "test_fraction": opts.test_fraction,
        "sources": [
            {"dir": str(r.source_dir), "layout": r.layout, "records": len(r.records), "skipped": len(r.skipped)}
            for r in results
        ],
        "images_listed": len(records) + sum(dropped.values()),
        "images": len(rows),
        "patients": len({row.patient_id for row in rows}),
        "stored_images": f"{opts.resized_format.upper()}, longer side <= {opts.resize_longer_side} px"
        if opts.resize_longer_side
        else "original files",
        "splits": {name: {**table, "bytes": corpus[name].data.nbytes} for name, table in split_tables(rows).items()},
        "folds": fold_tables(rows),
        "leakage": leakage,
        "deduplication": {
            "sha256": "decoded pixels (mode, size, raw bytes)",
            "phash_bits": 256,
            "phash_threshold": opts.phash_threshold,
            **grouping,
            **dedup,
        },
        "class_source": class_source,
        "licences": licences(rows),
        "warnings": warnings,
        "image_stats": image_stats(rows),
        "skipped": skipped,
        "dropped_unknown_labels": dropped,
        "excluded": dict(sum((r.excluded for r in results), Counter())),
        "notes": [note for r in results for note in r.notes],
        "decode_benchmark": benchmark,
    }

    def write(folder: Path) -> None:
        corpus.save_to_disk(str(folder))
        seconds = time.perf_counter() - start
        report["timing"] = {"seconds": seconds, "images_per_second": len(records) / seconds}
        write_reports(folder, report, corpus_features())

    _write_atomically(output_dir, opts.overwrite, write)
    logger.info("wrote %s (%d images) in %.1f s", output_dir, len(rows), report["timing"]["seconds"])
    return output_dir


def push_corpus_to_hub(output_dir: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Upload a built corpus (parquet shards via DatasetDict.push_to_hub) and then its dataset card as README.md.

    The card goes last because push_to_hub writes its own README; ours carries the same dataset_info/configs YAML.
    """
    import json

    from datasets import load_from_disk
    from huggingface_hub import HfApi

    output_dir = Path(output_dir)
    corpus = load_from_disk(str(output_dir))
    report = json.loads((output_dir / "report.json").read_text(encoding="utf-8"))
    corpus.push_to_hub(repo_id, private=private, token=token, commit_message="Upload corpus")
    card = dataset_card(report, corpus["train"].features, repo_id=repo_id)
    HfApi(token=token).upload_file(
        path_or_fileobj=card.encode("utf-8"),
        path_in_repo="README.md",
        repo_id=repo_id,
        repo_type="dataset",
        commit_message="Dataset card",
    )
    return repo_id
