"""One row per classified file, shared by the app's batch mode and the command-line predictor: the same columns,
the same wording for files that could not be read, the same CSV."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence


def columns(labels: Sequence[str]) -> list[str]:
    return ["file", "predicted", *(f"p_{label}" for label in labels), "lung_evidence", "warnings"]


def result_row(
    labels: Sequence[str], name: str, scores: dict[str, float] | None = None, warnings: Sequence[str] = (),
    error: str | None = None, lung_evidence: str = "",
) -> dict[str, str]:
    """A row of strings: probabilities to 4 decimals, the share of the Grad-CAM evidence inside the lung fields
    (0-1, cxr_app/lung_evidence.py), warnings joined by " | "; a file that was not read has an empty prediction and
    "not read: <why>"."""
    row = dict.fromkeys(columns(labels), "")
    row["file"] = name
    if error is not None or scores is None:
        row["warnings"] = f"not read: {error or 'no prediction'}"
        return row
    row["predicted"] = max(scores, key=scores.get)
    row.update({f"p_{label}": f"{scores[label]:.4f}" for label in labels})
    row["lung_evidence"] = lung_evidence
    row["warnings"] = " | ".join(warnings)
    return row


def spreadsheet_safe(cell: str) -> str:
    """A file name such as `=HYPERLINK(...).png` (in a zip anyone can make) would run as a formula in a spreadsheet:
    such cells get a leading apostrophe (OWASP's advice on CSV injection)."""
    return "'" + cell if cell[:1] in ("=", "+", "-", "@", "\t", "\r") else cell


def rows_csv(rows: Sequence[dict[str, str]], labels: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns(labels), lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: spreadsheet_safe(value) for key, value in row.items()} for row in rows)
    return buffer.getvalue()


__all__ = ["columns", "result_row", "rows_csv", "spreadsheet_safe"]
