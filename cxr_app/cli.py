"""Command-line predictor: the app's reading, guardrails and calibrated model on files, without a browser.

    python -m cxr_app predict FILES_OR_FOLDERS... [--model PATH_OR_HUB_ID] [--revision REV] [--csv OUT.csv]

The model is chosen as in the app: --model, else $CNN_LSTM_MODEL, else checkpoints/cnn-lstm-cxr3 under the current
directory. Every file gets a row: the predicted class and the three probabilities, or the reason it could not be
read (the other files still run). Exit status 0 when every file was read, 1 when some were not, 2 on a usage error
or no model. Research use only, not for diagnosis.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cxr_common.atomic import atomic_write_text

from .demo import DISCLAIMER, CxrDemo
from .results import rows_csv
from .uploads import ACCEPTED_SUFFIXES


def expand(paths: list[str]) -> list[Path]:
    """Files as given (any suffix: the reader decides), folders as their image/DICOM files, sorted."""
    found = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in ACCEPTED_SUFFIXES)
        else:
            found.append(path)
    return found


def predict_files(app: CxrDemo, files: list[Path], progress: bool = True) -> list[dict[str, str]]:
    """One row per file (the app's batch rows); unreadable files are reported in their row."""
    from tqdm.auto import tqdm

    return [app.classify_row(str(path), str(path))
            for path in tqdm(files, desc="X-rays", unit="file", disable=not progress)]


def write_csv(rows: list[dict[str, str]], labels: list[str], destination: str) -> None:
    """`-` is standard output; a file is written whole or not at all (temporary file, then rename)."""
    text = rows_csv(rows, labels)
    if destination == "-":
        sys.stdout.write(text)
        return
    atomic_write_text(destination, text)  # usual permissions; nothing left behind if writing fails


def print_table(rows: list[dict[str, str]]) -> None:
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(row[column].replace("|", "/") for column in columns) + " |")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cxr_app", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    predict = commands.add_parser("predict", help="classify chest X-ray files (PNG, JPEG, BMP, TIFF, WebP, DICOM)")
    predict.add_argument("files", nargs="+", help="files or folders (searched recursively)")
    predict.add_argument("--model", help="checkpoint folder or Hub id (default: $CNN_LSTM_MODEL, else "
                                         "./checkpoints/cnn-lstm-cxr3)")
    predict.add_argument("--revision", help="Hub revision (default: $CNN_LSTM_REVISION)")
    predict.add_argument("--csv", help="also write the rows as CSV here ('-' for standard output)")
    predict.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    files = expand(args.files)
    missing = [str(path) for path in files if not path.is_file()]
    if not files or missing:
        print(f"error: no such file(s): {', '.join(missing)}" if missing else "error: no image files found",
              file=sys.stderr)
        return 2
    if args.csv not in (None, "-") and not Path(args.csv).parent.is_dir():
        print(f"error: --csv {args.csv}: its folder does not exist", file=sys.stderr)
        return 2
    app = CxrDemo.from_source(args.model, args.revision)
    if app.classifier is None:
        print(f"error: {app.status}", file=sys.stderr)
        return 2
    rows = predict_files(app, files, progress=not args.no_progress)
    labels = app.classifier.labels
    if args.csv == "-":
        write_csv(rows, labels, "-")
    else:
        print_table(rows)
        if args.csv:
            write_csv(rows, labels, args.csv)
    print(DISCLAIMER.replace("**", ""), file=sys.stderr)
    return 1 if any(row["predicted"] == "" for row in rows) else 0
