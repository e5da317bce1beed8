"""Build the three-class `datasets` corpus: patient-disjoint splits, CV folds, deduplication, atomic output.

Pipeline: layout adapters (`sources`) -> decode + fingerprints (`images`) -> exact duplicates removed -> patient ids
and near-duplicates merged into patient groups -> groups assigned to test + k folds (`split`) -> leakage re-checked
from the final rows (`report`) -> DatasetDict + report written into a temporary sibling folder and renamed into place
only when complete (`cxr_common.atomic`).
"""

import json
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from cxr_common.atomic import DestinationExists, atomic_folder, check_destination

from .card import dataset_card
from .images import ImageProblem, decode_images_per_second, encode_resized, load_image, resize_longer_side
from .options import CorpusOptions
from .report import (
    LEAKAGE_CHECKS,
    SPLITS,
    CorpusRow,
    class_source_table,
    fold_tables,
    image_stats,
    leakage_checks,
    licences,
    report_markdown,
    split_tables,
)
from .sources import LABEL_NAMES, AdapterResult, CorpusError, CorpusRecord, read_source
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
    try:
        check_destination(output_dir, overwrite)
    except DestinationExists as error:
        raise CorpusError(f"--output_dir {error}") from error


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


@dataclass
class _Intake:
    """What the source folders gave: adapter results, known-label records, decoded rows (before deduplication),
    and what was left out."""

    results: list[AdapterResult]
    records: list[CorpusRecord]
    rows: list[CorpusRow]
    skipped: list[dict]
    dropped: dict[str, int]


def _read_sources(sources: list[Path], opts: CorpusOptions) -> _Intake:
    """Read every folder with its layout adapter, apply the label policy and decode; fail if nothing is left."""
    results = [read_source(source, opts.layout, opts.skip_missing_files) for source in sources]
    records, dropped = _label_policy(results, opts.drop_unknown_labels)
    logger.info("decoding %d images from %d source folder(s)", len(records), len(sources))
    rows, bad_images = _load_all(records, opts.resize_longer_side, opts.resized_format, opts.num_workers)
    skipped = [skip for result in results for skip in result.skipped] + bad_images
    if not records:
        raise CorpusError("no images left after dropping unknown labels; check the labels of the source folders")
    if not rows:
        raise CorpusError(f"none of the {len(records)} listed images could be decoded; first: {skipped[0]['file']}")
    return _Intake(results, records, rows, skipped, dropped)


def _refuse_leaks(leakage: dict) -> None:
    """A patient-protocol split must pass every leakage check; otherwise nothing is written."""
    bad = {key: leakage[key] for key in LEAKAGE_CHECKS if leakage[key]}
    if bad:
        examples = [e for part in ("splits", "folds") for v in leakage[part].values() for e in v["examples"]]
        raise CorpusError(f"the split leaks {bad} (e.g. patients {examples[:3]}); nothing was written")


def _warnings(rows: list[CorpusRow], protocol: str) -> tuple[dict, list[str]]:
    """The class x source table and every warning a user of the corpus should read (confounds, empty classes)."""
    class_source, warnings = class_source_table(rows)
    warnings += [
        f"{split}: no {label} images"
        for split in SPLITS
        for label in LABEL_NAMES
        if not any(r.split == split and r.label_name == label for r in rows)
    ]
    if protocol == "paper":
        warnings.insert(0, "LEAKY: paper protocol (image-level split); patients and near-duplicates straddle splits")
    return class_source, warnings


def _report(
    opts: CorpusOptions,
    intake: _Intake,
    rows: list[CorpusRow],
    corpus: "DatasetDict",
    leakage: dict,
    grouping: dict,
    dedup: dict,
) -> dict:
    """report.json from the intake and the kept, split rows (without its timing: known once the corpus is on disk)."""
    results = intake.results
    class_source, warnings = _warnings(rows, opts.protocol)
    return {
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
        "images_listed": len(intake.records) + sum(intake.dropped.values()),
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
        "skipped": intake.skipped,
        "dropped_unknown_labels": intake.dropped,
        "excluded": dict(sum((r.excluded for r in results), Counter())),
        "notes": [note for r in results for note in r.notes],
        "decode_benchmark": _decode_benchmark(
            rows, opts.benchmark_images, opts.resize_longer_side, opts.resized_format
        ),
    }


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

    intake = _read_sources(sources, opts)
    groups = PatientGroups()
    rows, dedup = deduplicate(intake.rows, groups)
    grouping = group_and_split(rows, opts, groups)
    leakage = leakage_checks(rows, grouping.pop("pairs"))
    if opts.protocol == "patient":
        _refuse_leaks(leakage)
    corpus = _dataset_dict(rows)
    report = _report(opts, intake, rows, corpus, leakage, grouping, dedup)
    try:
        with atomic_folder(output_dir, overwrite=opts.overwrite) as folder:
            corpus.save_to_disk(str(folder))
            seconds = time.perf_counter() - start
            report["timing"] = {"seconds": seconds, "images_per_second": len(intake.records) / seconds}
            write_reports(folder, report, corpus_features())
    except DestinationExists as error:
        raise CorpusError(
            f"--output_dir {output_dir} appeared during the build; pass --overwrite to replace it"
        ) from error
    logger.info("wrote %s (%d images) in %.1f s", output_dir, len(rows), report["timing"]["seconds"])
    return output_dir


def write_reports(folder: Path, report: dict, features: "Features") -> None:
    """report.json, report.md and the dataset card README.md into `folder`."""
    (folder / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "report.md").write_text(report_markdown(report), encoding="utf-8")
    (folder / "README.md").write_text(dataset_card(report, features), encoding="utf-8")


def push_corpus_to_hub(output_dir: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Upload a built corpus (parquet shards via DatasetDict.push_to_hub) and then its dataset card as README.md.

    The card goes last because push_to_hub writes its own README; ours carries the same dataset_info/configs YAML.
    """
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
