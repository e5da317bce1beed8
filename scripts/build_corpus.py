"""Build the three-class chest X-ray corpus (DatasetDict + report) from one or more source folders.

    python scripts/build_corpus.py --source_dir ../shared/data/cxr3 --output_dir data/corpus
    python scripts/build_corpus.py --source_dir A --source_dir B --output_dir OUT --resize_longer_side 256
    python scripts/build_corpus.py ... --protocol paper        # leaky image-level split, for comparison only
    python scripts/build_corpus.py ... --push_to_hub user/cxr3-corpus

Input problems end with a one-line `error: ...` and exit status 2; nothing is written then.
"""

import time

_START = time.perf_counter()  # before the heavy imports, so the printed wall time includes start-up

import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import datasets  # noqa: E402
from transformers import HfArgumentParser  # noqa: E402

from train.corpus.build import LABEL_NAMES, CorpusError, build_corpus, push_corpus_to_hub  # noqa: E402
from train.corpus.options import CorpusOptions  # noqa: E402
from train.corpus.report import SPLITS  # noqa: E402


@dataclass
class SourceArguments:
    """Where the images come from and where the corpus goes."""

    source_dir: list[str] = field(
        metadata={
            "help": "Source folder (cxr3, ieee8023 or Kaggle layout); repeat or list several.",
            "action": "extend",
        }
    )
    output_dir: str = field(metadata={"help": "Folder for the DatasetDict, report.json, report.md and README.md."})


@dataclass
class HubArguments:
    """Optional upload; the token comes from `huggingface-cli login` or HF_TOKEN."""

    push_to_hub: str | None = field(default=None, metadata={"help": "Hub dataset repo id to upload the corpus to."})
    hub_private: bool = field(default=False, metadata={"help": "Create the Hub repo as private."})


def _summary(output_dir: Path, wall_seconds: float) -> str:
    report = json.loads((output_dir / "report.json").read_text(encoding="utf-8"))
    lines = [f"corpus written to {output_dir} ({report['protocol']} protocol{', LEAKY' if report['leaky'] else ''})"]
    for split in SPLITS:
        entry = report["splits"][split]
        per_label = ", ".join(f"{label} {entry['by_label'][label]['images']}" for label in LABEL_NAMES)
        lines.append(f"  {split:<10} {entry['images']:>6} images {entry['patients']:>6} patients  ({per_label})")
    leak = report["leakage"]
    lines.append(
        f"  leakage: {leak['patient_overlap_between_splits']} patients between splits, "
        f"{leak['patient_overlap_between_folds']} between folds, "
        f"{leak['near_duplicate_pairs_across_splits']} near-duplicate pairs across splits"
    )
    dedup = report["deduplication"]
    lines.append(
        f"  removed {dedup['exact_duplicates_removed']} exact duplicates, {dedup['label_conflicts_removed']} with "
        f"conflicting labels; {dedup['near_duplicate_pairs']} near-duplicate pairs; "
        f"skipped {len(report['skipped'])} files"
    )
    lines += [f"  warning: {warning}" for warning in report["warnings"]]
    bench = report["decode_benchmark"]
    if bench:
        lines.append(
            "  decode+preprocess (224x224 float, 1 thread): "
            f"original {bench['original_images_per_second']:.0f} images/s, "
            f"pre-resized {bench['pre_resized_side']} px {bench['pre_resized_format'].upper()} "
            f"{bench['pre_resized_images_per_second']:.0f} images/s"
        )
    timing = report["timing"]
    lines.append(
        f"  built in {timing['seconds']:.1f} s ({timing['images_per_second']:.0f} images/s); "
        f"{wall_seconds:.1f} s wall including start-up"
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> tuple[SourceArguments, CorpusOptions, HubArguments]:
    """Command-line flags, or a single JSON file holding the same keys."""
    parser = HfArgumentParser((SourceArguments, CorpusOptions, HubArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(json_file=argv[0])
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("train").setLevel(logging.INFO)  # our progress lines, not every HTTP request of a push
    datasets.disable_progress_bars()
    try:
        sources, options, hub = parse_args(argv)
        output_dir = build_corpus(sources.source_dir, sources.output_dir, **asdict(options))
        print(_summary(output_dir, time.perf_counter() - _START))
        if hub.push_to_hub:
            push_corpus_to_hub(output_dir, hub.push_to_hub, private=hub.hub_private)
            print(f"pushed to the Hub as dataset {hub.push_to_hub}")
    except CorpusError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
