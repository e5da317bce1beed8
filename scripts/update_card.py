"""Re-render a final model folder's README.md (model card) with results that came after training.

    python scripts/update_card.py --model_dir checkpoints/cnn-lstm-cxr3 \
        --cv_results runs/cv/cv_results.json --shortcut_audit audit/shortcut_audit.json \
        --leaky_metrics runs/leaky/final/report/metrics.json

Each given result is stored in the folder's `report/metrics.json` (keys `cross_validation`, `shortcut_audit`,
`lung_evidence` (the app's warning threshold, from a validation audit: `--lung_evidence_from`), `leaky_protocol`);
the card is rendered again from the repository's `model_card.md` and `report/report.md` from the same data. Results
not given keep their stored value, and a result never run renders as "not run". Everything is rendered before
anything is written, and each file is written atomically (`cxr_common.atomic.atomic_write_text`), so an interrupted
update never leaves a truncated card or metrics.json.

`--recompute_bootstrap` recomputes the `bootstrap` section (macro and per-class intervals) from the folder's own
`report/predictions.csv` (the calibrated probabilities the metrics came from) with the training code's
`bootstrap_intervals`, the stored number of resamples and the run's seed: reports written before per-class intervals
existed gain them, and their macro intervals come out as before (within the CSV's 6-decimal rounding).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from cxr_common.atomic import atomic_write_text
from train.metrics.cxr_metrics.cxr_metrics import compute_classification_metrics
from train.training.model_card import DEFAULT_TEMPLATE, card_context, render_model_card
from train.training.report import PREDICTIONS_FILE, bootstrap_intervals, read_predictions, render_report_markdown
from train.training.shortcut_audit import evidence_threshold

SEED_IN_SUMMARY = re.compile(r"\bseed (\d+)\.")  # model_card.training_summary: "...; seed 42."


@dataclass
class UpdateCardArguments:
    model_dir: str = field(metadata={"help": "Final model folder written by train/run.py (report/metrics.json)."})
    cv_results: str | None = field(default=None, metadata={"help": "cv_results.json of a --cross_validation run."})
    cv_note: str | None = field(default=None, metadata={"help": "A sentence shown under the CV table."})
    shortcut_audit: str | None = field(default=None, metadata={"help": "shortcut_audit.json of the same model."})
    previous_model: str | None = field(
        default=None,
        metadata={
            "help": "A Markdown file comparing this model with the one it replaces on the same images (report key "
            "previous_model, shown in the card and the app's report tab); --previous_model_name names that model."
        },
    )
    previous_model_name: str = field(default="previous model", metadata={"help": "Name of the replaced model."})
    lung_evidence_from: str | None = field(
        default=None,
        metadata={
            "help": "shortcut_audit.json of the same model on its VALIDATION split: sets the app's lung-evidence "
            "warning threshold (report key lung_evidence) from the shares it holds."
        },
    )
    leaky_metrics: str | None = field(
        default=None, metadata={"help": "report/metrics.json of the same network on the --protocol paper split."}
    )
    model_card_template: str | None = field(default=None, metadata={"help": "Template (default: model_card.md)."})
    recompute_bootstrap: bool = field(
        default=False,
        metadata={"help": "Recompute the bootstrap intervals (macro and per class) from report/predictions.csv."},
    )
    bootstrap_seed: int | None = field(
        default=None,
        metadata={
            "help": "Seed of the recomputed bootstrap (default: the stored one, else the run's seed named in the "
            "card's training summary; training passes its --seed)."
        },
    )


def resolve_seed(report: dict, given: int | None) -> int:
    """The bootstrap seed: given, else stored with the intervals, else the run's seed (training passes --seed)."""
    if given is not None:
        return given
    if report["bootstrap"].get("seed") is not None:
        return int(report["bootstrap"]["seed"])
    found = SEED_IN_SUMMARY.findall(report["card_info"].get("training_summary", ""))
    if len(found) != 1:
        raise SystemExit("the bootstrap seed is not recorded in metrics.json; pass --bootstrap_seed")
    return int(found[0])


def recompute_bootstrap(report: dict, report_dir: Path, seed: int) -> dict:
    """The `bootstrap` section again, from predictions.csv, after checking that the CSV is this report's."""
    names = list(report["label_names"])
    try:
        probabilities, labels, groups, _ = read_predictions(report_dir / PREDICTIONS_FILE, names)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    bins = len(report["metrics"].get("calibration_bins") or []) or 15
    check = compute_classification_metrics(probabilities, labels, names, input_type="probabilities", ece_bins=bins)
    for key in ("num_samples", "accuracy", "macro_auc"):
        stored, found = report["metrics"][key], check[key]
        if stored is None or found is None or abs(found - stored) > 1e-3:
            raise SystemExit(f"{report_dir / PREDICTIONS_FILE} does not reproduce metrics.json ({key} {found} vs "
                             f"{stored}): not the predictions this report was computed from")  # fmt: skip
    samples = int(report["bootstrap"]["samples"])
    return bootstrap_intervals(probabilities, labels, names, groups, samples, seed, bins)


def update_card(args: UpdateCardArguments) -> Path:
    folder = Path(args.model_dir)
    metrics_path = folder / "report" / "metrics.json"
    report = json.loads(metrics_path.read_text())
    if "card_info" not in report:
        raise SystemExit(f"{metrics_path} has no card_info (written by an older train/run.py); retrain to update")
    if args.cv_results:
        report["cross_validation"] = json.loads(Path(args.cv_results).read_text())
    if args.cv_note and report.get("cross_validation"):
        report["cross_validation"]["note"] = args.cv_note
    if args.shortcut_audit:
        report["shortcut_audit"] = json.loads(Path(args.shortcut_audit).read_text())
    if args.previous_model:
        markdown = Path(args.previous_model).read_text(encoding="utf-8")
        report["previous_model"] = {"name": args.previous_model_name, "markdown": markdown}
    if args.lung_evidence_from:
        validation = json.loads(Path(args.lung_evidence_from).read_text())
        report["lung_evidence"] = evidence_threshold(validation["attribution"]["shares"], validation["split"])
    if args.leaky_metrics:
        report["leaky_protocol"] = json.loads(Path(args.leaky_metrics).read_text())["metrics"]
    if args.recompute_bootstrap:
        seed = resolve_seed(report, args.bootstrap_seed)
        report["bootstrap"] = recompute_bootstrap(report, metrics_path.parent, seed)
    template = Path(args.model_card_template or DEFAULT_TEMPLATE).read_text(encoding="utf-8")
    card_text = render_model_card(template, card_context(report, report["card_info"]))  # fails before any write
    report_text = render_report_markdown(report)
    atomic_write_text(metrics_path, json.dumps(report, indent=2))
    atomic_write_text(metrics_path.parent / "report.md", report_text)
    return atomic_write_text(folder / "README.md", card_text)


def main(argv: list[str] | None = None) -> Path:
    (args,) = HfArgumentParser(UpdateCardArguments).parse_args_into_dataclasses(args=argv)
    card = update_card(args)
    print(f"model card re-rendered: {card}")
    return card


if __name__ == "__main__":
    main()
