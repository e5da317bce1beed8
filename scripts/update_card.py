"""Re-render a final model folder's README.md (model card) with results that came after training.

    python scripts/update_card.py --model_dir checkpoints/cnn-lstm-cxr3 \
        --cv_results runs/cv/cv_results.json --shortcut_audit audit/shortcut_audit.json \
        --leaky_metrics runs/leaky/final/report/metrics.json

Each given result is stored in the folder's `report/metrics.json` (keys `cross_validation`, `shortcut_audit`,
`leaky_protocol`); the card is rendered again from the repository's `model_card.md` and `report/report.md` from the
same data. Results not given keep their stored value, and a result never run renders as "not run". Everything is
rendered before anything is written, and each file is written atomically (`train.atomic.atomic_write_text`), so an
interrupted update never leaves a truncated card or metrics.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from train.atomic import atomic_write_text
from train.training.model_card import DEFAULT_TEMPLATE, card_context, render_model_card
from train.training.report import render_report_markdown


@dataclass
class UpdateCardArguments:
    model_dir: str = field(metadata={"help": "Final model folder written by train/run.py (report/metrics.json)."})
    cv_results: str | None = field(default=None, metadata={"help": "cv_results.json of a --cross_validation run."})
    cv_note: str | None = field(default=None, metadata={"help": "A sentence shown under the CV table."})
    shortcut_audit: str | None = field(default=None, metadata={"help": "shortcut_audit.json of the same model."})
    leaky_metrics: str | None = field(
        default=None, metadata={"help": "report/metrics.json of the same network on the --protocol paper split."}
    )
    model_card_template: str | None = field(default=None, metadata={"help": "Template (default: model_card.md)."})


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
    if args.leaky_metrics:
        report["leaky_protocol"] = json.loads(Path(args.leaky_metrics).read_text())["metrics"]
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
