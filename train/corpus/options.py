"""The corpus builder's options: one dataclass that `build_corpus`, the splitter and the CLI (HfArgumentParser) share.

Its own module so that the builder and the splitter can both import it without importing each other.
"""

from dataclasses import dataclass, field
from typing import Literal

from .images import PHASH_THRESHOLD
from .sources import LAYOUTS, CorpusError


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
