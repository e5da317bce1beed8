"""Leakage and confound report of a built corpus: the numbers of report.json and their rendering as report.md.

Every number here is recomputed from the final rows, not taken from the splitter, so the report is an independent
check: a patient or a near-duplicate pair that straddles splits shows up even if the splitter had a bug.
"""

import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass
from itertools import combinations

from .images import LoadedImage
from .sources import LABEL_NAMES, CorpusRecord

SPLITS = ("train", "validation", "test")
PEDIATRIC_SOURCES = ("kaggle-chest-xray-pneumonia",)  # Kermany et al.: children aged about 1-5
DOMINANCE_SHARE = 0.5  # warn when one source gives more than this share of a class
LEAKAGE_CHECKS = (  # the counts of `leakage_checks` that must all be 0 for a patient-disjoint corpus
    "patient_overlap_between_splits",
    "patient_overlap_between_folds",
    "exact_duplicates_between_splits",
    "near_duplicate_pairs_across_splits",
    "near_duplicate_pairs_across_folds",
)


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


def markdown_table(header: list[str], body: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in line) + " |" for line in body]


def split_table_body(report: dict) -> list[list]:
    body = []
    for split in SPLITS:
        entry = report["splits"][split]
        cells = [
            f"{entry['by_label'][label]['images']} ({entry['by_label'][label]['patients']})" for label in LABEL_NAMES
        ]
        body.append([split, *cells, f"{entry['images']} ({entry['patients']})"])
    return body


def _overview(report: dict) -> list[str]:
    lines = [f"# Corpus report ({report['protocol']} protocol)", ""]
    if report["leaky"]:
        lines += [
            "**LEAKY: image-level split (paper protocol). Patients straddle splits; use only to measure how much "
            "leakage inflates results.**",
            "",
        ]
    return lines + [
        f"{report['images']} images, {report['patients']} patient groups, seed {report['seed']}, "
        f"{report['num_folds']} folds (validation = fold {report['validation_fold']}), "
        f"test fraction {report['test_fraction']}. Built in {report['timing']['seconds']:.1f} s "
        f"({report['timing']['images_per_second']:.0f} images/s).",
        "",
    ]


def _split_sections(report: dict) -> list[str]:
    """Images (patients) per split and label, per split x label x source, and per fold."""
    lines = ["## Images (patients) per split and label", ""]
    lines += markdown_table(["split", *LABEL_NAMES, "total"], split_table_body(report)) + [""]
    lines += ["## Images (patients) per split, label and source", ""]
    body = [
        [split, label, source, f"{n['images']} ({n['patients']})"]
        for split in SPLITS
        for label in LABEL_NAMES
        for source, n in report["splits"][split]["by_label_source"][label].items()
    ]
    lines += markdown_table(["split", "label", "source", "images (patients)"], body) + [""]
    lines += ["## Folds (train + validation)", ""]
    body = [
        [f, *[n["by_label"][label] for label in LABEL_NAMES], n["images"], n["patients"]]
        for f, n in report["folds"].items()
    ]
    return lines + markdown_table(["fold", *LABEL_NAMES, "images", "patients"], body) + [""]


def _leakage_section(report: dict) -> list[str]:
    leak, dedup = report["leakage"], report["deduplication"]
    lines = ["## Leakage checks (must all be 0 unless the protocol is leaky)", ""]
    lines += markdown_table(["check", "count"], [[check, leak[check]] for check in LEAKAGE_CHECKS]) + [""]
    return lines + [
        f"Exact duplicates removed (sha256 of decoded pixels): {dedup['exact_duplicates_removed']}; "
        f"removed for conflicting labels: {dedup['label_conflicts_removed']}. Near-duplicate pairs "
        f"(256-bit pHash, Hamming <= {dedup['phash_threshold']}): {dedup['near_duplicate_pairs']}, "
        f"which merged {dedup['patient_groups_merged']} patient groups; largest group: "
        f"{dedup['largest_group_images']} images.",
        "",
    ]


def _image_section(report: dict) -> list[str]:
    """Source image sizes, modes and formats, and the decode benchmark."""
    lines = ["## Images", ""]
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
    lines += markdown_table(header, body) + [""]
    bench = report.get("decode_benchmark") or {}
    if bench:
        lines += [
            f"Decode + preprocess (224x224 float, 1 thread, {bench['images']} images): original files "
            f"{bench['original_images_per_second']:.0f} images/s; pre-resized to {bench['pre_resized_side']} px "
            f"{bench['pre_resized_format'].upper()} {bench['pre_resized_images_per_second']:.0f} images/s. "
            f"Stored: {report['stored_images']}.",
            "",
        ]
    return lines


def _left_out_sections(report: dict) -> list[str]:
    """Skipped files, dropped labels, exclusions and the adapters' notes."""
    skipped = report["skipped"]
    lines = [f"## Skipped ({len(skipped)})", ""] + [f"- `{s['file']}`: {s['reason']}" for s in skipped[:200]] + [""]
    if report["dropped_unknown_labels"]:
        lines += ["## Dropped unknown labels", ""]
        lines += [f"- {label!r}: {n}" for label, n in report["dropped_unknown_labels"].items()] + [""]
    if report["excluded"]:
        lines += (
            ["## Excluded on purpose", ""] + [f"- {reason}: {n}" for reason, n in report["excluded"].items()] + [""]
        )
    if report["notes"]:
        lines += ["## Notes", ""] + [f"- {note}" for note in report["notes"]] + [""]
    return lines


def class_source_body(report: dict) -> list[list]:
    """One row per source: its image count per class."""
    sources = sorted({s for per in report["class_source"].values() for s in per})
    return [[s, *[report["class_source"][label].get(s, 0) for label in LABEL_NAMES]] for s in sources]


def report_markdown(report: dict) -> str:
    """Human-readable report.md: the same numbers as report.json."""
    lines = _overview(report) + _split_sections(report) + _leakage_section(report)
    lines += ["## Class x source", ""] + markdown_table(["source", *LABEL_NAMES], class_source_body(report)) + [""]
    lines += ["## Warnings", ""] + [f"- {w}" for w in report["warnings"] or ["none"]] + [""]
    lines += _image_section(report) + _left_out_sections(report)
    return "\n".join(lines)
