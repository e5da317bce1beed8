"""The Hub dataset card (README.md) of a built corpus: YAML metadata the Hub reads, then counts, sources, caveats.

Rendered from report.json (`report.py`), so the card and the report cannot disagree.
"""

from .report import SPLITS, class_source_body, markdown_table, split_table_body
from .sources import LABEL_NAMES

PRETTY_NAME = "Chest X-ray 3-class corpus (COVID-19 / Normal / Pneumonia)"


def _size_category(count: int) -> str:
    for bound, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K")):
        if count < bound:
            return name
    return "100K<n<1M"


def _card_metadata(report: dict, features, pretty_name: str) -> str:
    """The card's YAML header: licence, task, tags, size, and the dataset_info/configs the Hub viewer reads."""
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
    return card_data.to_yaml()


def _card_introduction(report: dict, pretty_name: str) -> list[str]:
    lines = [f"# {pretty_name}", ""]
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
    return lines + [
        "Three-class chest X-ray corpus for the CNN-LSTM reproduction of Islam, Islam & Asraf (2020). Labels: "
        + ", ".join(f"`{i}` {name}" for i, name in enumerate(LABEL_NAMES))
        + ".",
        "",
    ]


def _card_splits(report: dict) -> list[str]:
    lines = ["## Splits", ""]
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
    return lines + markdown_table(["split", *LABEL_NAMES, "total"], split_table_body(report)) + [""]


def _card_sources_and_features(report: dict) -> list[str]:
    """Images per source and class with their licences, the licence terms, and the columns."""
    body = [
        [*row, "; ".join(f"{lic} ({n})" for lic, n in report["licences"].get(row[0], {}).items())]
        for row in class_source_body(report)
    ]
    lines = ["## Sources and licences", ""]
    lines += markdown_table(["source", *LABEL_NAMES, "licences (images)"], body) + [""]
    return lines + [
        "Licences vary per image and are those the sources give; respect each image's licence and the terms of "
        "the original repositories (NIH ChestX-ray14 asks to link https://nihcc.app.box.com/v/ChestXray-NIHCC, "
        "cite Wang et al. 2017 and acknowledge the NIH Clinical Center).",
        "",
        "## Features",
        "",
        "`image`, `label` (ClassLabel), `patient_id` (patient group; merged ids joined by `|`), `source`, "
        "`original_finding` (label as the source gives it), `view`, `sha256` (SHA-256 of the source image's "
        f"decoded pixels), `fold`. Stored images: {report['stored_images']}.",
        "",
    ]


def _card_caveats_and_leakage(report: dict) -> list[str]:
    lines = ["## Caveats", ""]
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
    return lines + [
        "## Leakage checks",
        "",
        f"Patients shared between splits: {leak['patient_overlap_between_splits']}; between folds: "
        f"{leak['patient_overlap_between_folds']}; near-duplicate pairs across splits: "
        f"{leak['near_duplicate_pairs_across_splits']}. The full report is `report.json` / `report.md`.",
        "",
    ]


def _card_usage(repo_id: str | None) -> list[str]:
    return [
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


def dataset_card(report: dict, features, repo_id: str | None = None, pretty_name: str = PRETTY_NAME) -> str:
    """README.md for the Hub: YAML metadata (licence, task, tags, features, splits) + counts, sources, caveats."""
    lines = ["---", _card_metadata(report, features, pretty_name), "---", ""]
    lines += _card_introduction(report, pretty_name) + _card_splits(report)
    lines += _card_sources_and_features(report) + _card_caveats_and_leakage(report) + _card_usage(repo_id)
    return "\n".join(lines)
