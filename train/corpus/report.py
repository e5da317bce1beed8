"""Leakage and confound report (report.json / report.md) and the Hub dataset card of a built corpus.

Every number here is recomputed from the final rows, not taken from the splitter, so the report is an independent
check: a patient or a near-duplicate pair that straddles splits shows up even if the splitter had a bug.
"""

import json
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass
from itertools import combinations

from .images import LoadedImage
from .sources import LABEL_NAMES, CorpusRecord

SPLITS = ("train", "validation", "test")
PEDIATRIC_SOURCES = ("kaggle-chest-xray-pneumonia",)  # Kermany et al.: children aged about 1-5
DOMINANCE_SHARE = 0.5  # warn when one source gives more than this share of a class
PRETTY_NAME = "Chest X-ray 3-class corpus (COVID-19 / Normal / Pneumonia)"


@dataclass
class CorpusRow:
    """A kept image with its final patient group and split: what the dataset and the report are made of."""

    record: CorpusRecord
    image: LoadedImage
    patient_id: str = ""
    members: tuple[str, ...] = ()  # the source patient ids merged into patient_id
    split: str = ""
    fold: int = -1

    @property
    def label_name(self) -> str:
        return LABEL_NAMES[self.record.label]


def _images_patients(rows: list[CorpusRow]) -> dict:
    return {"images": len(rows), "patients": len({row.patient_id for row in rows})}


def split_tables(rows: list[CorpusRow]) -> dict:
    """Images and patients per split x label x source."""
    tables = {}
    for split in SPLITS:
        in_split = [row for row in rows if row.split == split]
        by_label, by_label_source = {}, {}
        for label in LABEL_NAMES:
            of_label = [row for row in in_split if row.label_name == label]
            by_label[label] = _images_patients(of_label)
            sources = sorted({row.record.source for row in of_label})
            by_label_source[label] = {
                source: _images_patients([row for row in of_label if row.record.source == source])
                for source in sources
            }
        tables[split] = {**_images_patients(in_split), "by_label": by_label, "by_label_source": by_label_source}
    return tables


def fold_tables(rows: list[CorpusRow]) -> dict:
    folds = sorted({row.fold for row in rows if row.fold >= 0})
    tables = {}
    for fold in folds:
        in_fold = [row for row in rows if row.fold == fold]
        by_label = {label: sum(row.label_name == label for row in in_fold) for label in LABEL_NAMES}
        tables[str(fold)] = {**_images_patients(in_fold), "by_label": by_label}
    return tables


def _overlaps(rows: list[CorpusRow], part_of) -> dict:
    """Patients (by final group and by every source id) shared between parts; parts given by `part_of(row)`."""
    groups, members, hashes = defaultdict(set), defaultdict(set), defaultdict(set)
    for row in rows:
        part = part_of(row)
        if part is None:
            continue
        groups[part].add(row.patient_id)
        members[part].update(row.members)
        hashes[part].add(row.image.sha256)
    result = {}
    for first, second in combinations(sorted(groups), 2):
        shared = (groups[first] & groups[second]) | (members[first] & members[second])
        result[f"{first}|{second}"] = {
            "patients": len(shared),
            "exact_duplicate_images": len(hashes[first] & hashes[second]),
            "examples": sorted(shared)[:5],
        }
    return result


def leakage_checks(rows: list[CorpusRow], pairs: list[tuple[int, int, int]]) -> dict:
    """Patient and near-duplicate overlap between splits and between folds; all must be 0 for a sound corpus."""
    between_splits = _overlaps(rows, lambda row: row.split)
    between_folds = _overlaps(rows, lambda row: row.fold if row.fold >= 0 else None)
    near_splits = [(i, j, d) for i, j, d in pairs if rows[i].split != rows[j].split]
    near_folds = [
        (i, j, d) for i, j, d in pairs if min(rows[i].fold, rows[j].fold) >= 0 and rows[i].fold != rows[j].fold
    ]
    return {
        "patient_overlap_between_splits": sum(v["patients"] for v in between_splits.values()),
        "patient_overlap_between_folds": sum(v["patients"] for v in between_folds.values()),
        "exact_duplicates_between_splits": sum(v["exact_duplicate_images"] for v in between_splits.values()),
        "near_duplicate_pairs_across_splits": len(near_splits),
        "near_duplicate_pairs_across_folds": len(near_folds),
        "splits": between_splits,
        "folds": between_folds,
        "near_duplicate_examples": [
            {
                "a": rows[i].record.name,
                "b": rows[j].record.name,
                "distance": d,
                "splits": [rows[i].split, rows[j].split],
            }
            for i, j, d in near_splits[:5]
        ],
    }


def class_source_table(rows: list[CorpusRow]) -> tuple[dict, list[str]]:
    """Images per class x source, and warnings where a source stands in for a class."""
    table = {
        label: dict(sorted(Counter(r.record.source for r in rows if r.label_name == label).items()))
        for label in LABEL_NAMES
    }
    warnings = []
    for label, per_source in table.items():
        total = sum(per_source.values())
        if not total:
            warnings.append(f"{label}: no images at all")
            continue
        source, count = max(per_source.items(), key=lambda item: item[1])
        if count / total > DOMINANCE_SHARE:
            warnings.append(
                f"{label}: {count / total:.0%} of images ({count}/{total}) come from {source}; "
                "a model can learn the source instead of the disease"
            )
    for source in sorted({row.record.source for row in rows}):
        labels = [label for label in LABEL_NAMES if table[label].get(source)]
        if len(labels) == 1 and table[labels[0]][source] >= 10:
            warnings.append(
                f"source {source} contributes only {labels[0]} images: its look is a shortcut to that class"
            )
    pediatric = {label: sum(n for s, n in table[label].items() if s in PEDIATRIC_SOURCES) for label in LABEL_NAMES}
    if any(pediatric.values()):
        shares = {label: pediatric[label] / max(1, sum(table[label].values())) for label in LABEL_NAMES}
        listed = ", ".join(f"{label} {share:.0%}" for label, share in shares.items())
        warnings.append(f"pediatric images ({', '.join(PEDIATRIC_SOURCES)}) per class: {listed}; age is a shortcut")
    return table, warnings


def _spread(values: list[int]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)} if values else {}


def image_stats(rows: list[CorpusRow]) -> dict:
    """Source image size, mode and format statistics, overall and per source (before any pre-resizing)."""

    def stats(subset: list[CorpusRow]) -> dict:
        return {
            "images": len(subset),
            "modes": dict(Counter(row.image.mode for row in subset).most_common()),
            "formats": dict(Counter(row.image.format for row in subset).most_common()),
            "width": _spread([row.image.width for row in subset]),
            "height": _spread([row.image.height for row in subset]),
        }

    per_source = {
        source: stats([r for r in rows if r.record.source == source])
        for source in sorted({r.record.source for r in rows})
    }
    return {"all": stats(rows), "by_source": per_source}


def licences(rows: list[CorpusRow]) -> dict:
    """Licence strings per source, as the sources give them (blank: the source states none)."""
    per_source = defaultdict(Counter)
    for row in rows:
        per_source[row.record.source][row.record.license or "(none stated)"] += 1
    return {source: dict(counter.most_common()) for source, counter in sorted(per_source.items())}


def _counts(counter: dict) -> str:
    return ", ".join(f"{key} {value}" for key, value in counter.items())


def _table(header: list[str], body: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in line) + " |" for line in body]


def _split_body(report: dict) -> list[list]:
    body = []
    for split in SPLITS:
        entry = report["splits"][split]
        cells = [
            f"{entry['by_label'][label]['images']} ({entry['by_label'][label]['patients']})" for label in LABEL_NAMES
        ]
        body.append([split, *cells, f"{entry['images']} ({entry['patients']})"])
    return body


def report_markdown(report: dict) -> str:
    """Human-readable report.md: the same numbers as report.json."""
    leak = report["leakage"]
    lines = [f"# Corpus report ({report['protocol']} protocol)", ""]
    if report["leaky"]:
        lines += [
            "**LEAKY: image-level split (paper protocol). Patients straddle splits; use only to measure how much "
            "leakage inflates results.**",
            "",
        ]
    lines += [
        f"{report['images']} images, {report['patients']} patient groups, seed {report['seed']}, "
        f"{report['num_folds']} folds (validation = fold {report['validation_fold']}), "
        f"test fraction {report['test_fraction']}. Built in {report['timing']['seconds']:.1f} s "
        f"({report['timing']['images_per_second']:.0f} images/s).",
        "",
    ]
    lines += ["## Images (patients) per split and label", ""]
    lines += _table(["split", *LABEL_NAMES, "total"], _split_body(report)) + [""]
    lines += ["## Images (patients) per split, label and source", ""]
    body = [
        [split, label, source, f"{n['images']} ({n['patients']})"]
        for split in SPLITS
        for label in LABEL_NAMES
        for source, n in report["splits"][split]["by_label_source"][label].items()
    ]
    lines += _table(["split", "label", "source", "images (patients)"], body) + [""]
    lines += ["## Folds (train + validation)", ""]
    body = [
        [f, *[n["by_label"][label] for label in LABEL_NAMES], n["images"], n["patients"]]
        for f, n in report["folds"].items()
    ]
    lines += _table(["fold", *LABEL_NAMES, "images", "patients"], body) + [""]
    lines += ["## Leakage checks (must all be 0 unless the protocol is leaky)", ""]
    checks = [
        "patient_overlap_between_splits",
        "patient_overlap_between_folds",
        "exact_duplicates_between_splits",
        "near_duplicate_pairs_across_splits",
        "near_duplicate_pairs_across_folds",
    ]
    lines += _table(["check", "count"], [[check, leak[check]] for check in checks]) + [""]
    dedup = report["deduplication"]
    lines += [
        f"Exact duplicates removed (sha256 of decoded pixels): {dedup['exact_duplicates_removed']}; "
        f"removed for conflicting labels: {dedup['label_conflicts_removed']}. Near-duplicate pairs "
        f"(256-bit pHash, Hamming <= {dedup['phash_threshold']}): {dedup['near_duplicate_pairs']}, "
        f"which merged {dedup['patient_groups_merged']} patient groups; largest group: "
        f"{dedup['largest_group_images']} images.",
        "",
    ]
    lines += ["## Class x source", ""]
    sources = sorted({s for per in report["class_source"].values() for s in per})
    body = [[s, *[report["class_source"][label].get(s, 0) for label in LABEL_NAMES]] for s in sources]
    lines += _table(["source", *LABEL_NAMES], body) + [""]
    lines += ["## Warnings", ""] + [f"- {w}" for w in report["warnings"] or ["none"]] + [""]
    lines += ["## Images", ""]
    body = [
        [
            s,
            n["images"],
            _counts(n["modes"]),
            _counts(n["formats"]),
            n["width"].get("min"),
            n["width"].get("median"),
            n["width"].get("max"),
            n["height"].get("min"),
            n["height"].get("median"),
            n["height"].get("max"),
        ]
        for s, n in [("all", report["image_stats"]["all"]), *report["image_stats"]["by_source"].items()]
    ]
    header = ["source", "images", "modes", "formats", "w min", "w median", "w max", "h min", "h median", "h max"]
    lines += _table(header, body) + [""]
    bench = report.get("decode_benchmark") or {}
    if bench:
        lines += [
            f"Decode + preprocess (224x224 float, 1 thread, {bench['images']} images): original files "
            f"{bench['original_images_per_second']:.0f} images/s; pre-resized to {bench['pre_resized_side']} px "
            f"{bench['pre_resized_format'].upper()} {bench['pre_resized_images_per_second']:.0f} images/s. "
            f"Stored: {report['stored_images']}.",
            "",
        ]
    skipped = report["skipped"]
    lines += [f"## Skipped ({len(skipped)})", ""] + [f"- `{s['file']}`: {s['reason']}" for s in skipped[:200]] + [""]
    if report["dropped_unknown_labels"]:
        lines += ["## Dropped unknown labels", ""]
        lines += [f"- {label!r}: {n}" for label, n in report["dropped_unknown_labels"].items()] + [""]
    if report["excluded"]:
        lines += (
            ["## Excluded on purpose", ""] + [f"- {reason}: {n}" for reason, n in report["excluded"].items()] + [""]
        )
    if report["notes"]:
        lines += ["## Notes", ""] + [f"- {note}" for note in report["notes"]] + [""]
    return "\n".join(lines)


def _size_category(count: int) -> str:
    for bound, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K")):
        if count < bound:
            return name
    return "100K<n<1M"


def dataset_card(report: dict, features, repo_id: str | None = None, pretty_name: str = PRETTY_NAME) -> str:
    """README.md for the Hub: YAML metadata (licence, task, tags, features, splits) + counts, sources, caveats."""
    from datasets import DatasetInfo, SplitDict, SplitInfo
    from datasets.info import DatasetInfosDict
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCardData

    card_data = DatasetCardData(
        license="other",
        task_categories=["image-classification"],
        tags=["medical", "chest-x-ray", "radiology", "covid-19", "pneumonia"]
        + (["leaky-split"] if report["leaky"] else []),
        pretty_name=pretty_name,
        size_categories=[_size_category(report["images"])],
    )
    splits = SplitDict()
    for split in SPLITS:
        entry = report["splits"][split]
        splits.add(SplitInfo(name=split, num_bytes=entry.get("bytes", 0), num_examples=entry["images"]))
    DatasetInfosDict({"default": DatasetInfo(features=features, splits=splits)}).to_dataset_card_data(card_data)
    data_files = [{"split": split, "path": f"data/{split}-*"} for split in SPLITS]
    MetadataConfigs({"default": {"data_files": data_files}}).to_dataset_card_data(card_data)

    lines = ["---", card_data.to_yaml(), "---", "", f"# {pretty_name}", ""]
    lines += [
        "> **Research use only. Not for clinical diagnosis.** Labels are noisy and sources are confounded with "
        "classes (see Caveats).",
        "",
    ]
    if report["leaky"]:
        lines += [
            "> **LEAKY SPLIT.** Built with the paper's image-level 80/20 protocol: images of one patient and "
            "near-duplicates sit on both sides of the split. It exists only to measure how much leakage inflates "
            "results; do not report numbers from it as generalisation.",
            "",
        ]
    lines += [
        "Three-class chest X-ray corpus for the CNN-LSTM reproduction of Islam, Islam & Asraf (2020). Labels: "
        + ", ".join(f"`{i}` {name}" for i, name in enumerate(LABEL_NAMES))
        + ".",
        "",
    ]
    lines += ["## Splits", ""]
    if report["leaky"]:
        lines += ["Image-level stratified split (paper protocol)."]
    else:
        lines += [
            f"Patient-disjoint: split by patient group, stratified by label and source, seed {report['seed']}. "
            "Near-duplicate images (256-bit perceptual hash, Hamming distance <= "
            f"{report['deduplication']['phash_threshold']}) count as one patient; exact duplicates were removed."
        ]
    lines += [
        f"`fold` gives {report['num_folds']}-fold cross-validation over train + validation (validation = fold "
        f"{report['validation_fold']}); test rows have fold -1. Images (patients):",
        "",
    ]
    lines += _table(["split", *LABEL_NAMES, "total"], _split_body(report)) + [""]
    lines += ["## Sources and licences", ""]
    sources = sorted({s for per in report["class_source"].values() for s in per})
    body = [
        [
            s,
            *[report["class_source"][label].get(s, 0) for label in LABEL_NAMES],
            "; ".join(f"{lic} ({n})" for lic, n in report["licences"].get(s, {}).items()),
        ]
        for s in sources
    ]
    lines += _table(["source", *LABEL_NAMES, "licences (images)"], body) + [""]
    lines += [
        "Licences vary per image and are those the sources give; respect each image's licence and the terms of "
        "the original repositories (NIH ChestX-ray14 asks to link https://nihcc.app.box.com/v/ChestXray-NIHCC, "
        "cite Wang et al. 2017 and acknowledge the NIH Clinical Center).",
        "",
    ]
    lines += ["## Features", ""]
    lines += [
        "`image`, `label` (ClassLabel), `patient_id` (patient group; merged ids joined by `|`), `source`, "
        "`original_finding` (label as the source gives it), `view`, `sha256` (SHA-256 of the source image's "
        f"decoded pixels), `fold`. Stored images: {report['stored_images']}.",
        "",
    ]
    lines += ["## Caveats", ""]
    lines += [
        "- Pediatric/adult confound: the Kaggle chest-xray-pneumonia images (Kermany et al.) are of children aged "
        "about 1-5; the other sources are (almost only) adults, and no COVID-19 image is pediatric. A classifier "
        "can separate classes by age and source cues rather than disease.",
        "- Source confound: classes come from different sources with different looks (cropped publication "
        "figures, hospital films, burnt-in text and arrows). Evaluate per source.",
        "- Label noise: NIH labels were mined from reports by NLP; `normal` from some sources means "
        '"COVID-19 negative", not radiologically normal.',
    ]
    lines += [f"- {warning}" for warning in report["warnings"]] + [""]
    leak = report["leakage"]
    lines += ["## Leakage checks", ""]
    lines += [
        f"Patients shared between splits: {leak['patient_overlap_between_splits']}; between folds: "
        f"{leak['patient_overlap_between_folds']}; near-duplicate pairs across splits: "
        f"{leak['near_duplicate_pairs_across_splits']}. The full report is `report.json` / `report.md`.",
        "",
    ]
    lines += [
        "## Usage",
        "",
        "```python",
        "from datasets import load_dataset",
        "",
        f'corpus = load_dataset("{repo_id or "<user>/<dataset>"}")',
        'train = corpus["train"]  # fold column for cross-validation',
        "```",
        "",
    ]
    return "\n".join(lines)


def write_reports(folder, report: dict, features) -> None:
    """report.json, report.md and the dataset card README.md into `folder`."""
    (folder / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "report.md").write_text(report_markdown(report), encoding="utf-8")
    (folder / "README.md").write_text(dataset_card(report, features), encoding="utf-8")
