"""Batch mode through the API of a launched app (`python app.py`), as a gradio_client user calls it: several files
and a zip in, one row per image out (bad files in their own row), and a CSV with the same rows."""

from __future__ import annotations

import csv
import zipfile
from pathlib import Path

import pytest

LABELS = ["COVID-19", "Normal", "Pneumonia"]
pytestmark = pytest.mark.slow


def test_batch_endpoint_with_a_zip_and_a_bad_file(reported_app_url, example_xrays, tmp_path):
    from gradio_client import Client, handle_file

    xrays = [path for paths in example_xrays.values() for path in paths]
    archive = tmp_path / "more.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        for path in xrays[3:]:
            zipped.write(path, path.name)
        zipped.writestr("../../escape.png", b"\x89PNG\r\n\x1a\nnot really")
    bad = tmp_path / "report.pdf"
    bad.write_bytes(b"%PDF-1.4\n" + b"0" * 2000)
    client = Client(reported_app_url, verbose=False)
    uploads = [*(handle_file(str(path)) for path in xrays[:3]), handle_file(str(bad)), handle_file(str(archive))]
    table, csv_path = client.predict(uploads, api_name="/predict_batch")

    assert table["headers"] == ["file", "predicted", *(f"p_{label}" for label in LABELS), "lung_evidence", "warnings"]
    rows = [dict(zip(table["headers"], row, strict=True)) for row in table["data"]]
    names = [row["file"] for row in rows]
    assert names[:4] == [*(path.name for path in xrays[:3]), "report.pdf"]
    assert {f"more.zip/{path.name}" for path in xrays[3:]} <= set(names)
    good = [row for row in rows if row["predicted"]]
    assert len(good) == len(xrays)  # every real X-ray, loose or zipped, got a prediction
    for row in good:
        probabilities = [float(row[f"p_{label}"]) for label in LABELS]
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-3)
        assert row["predicted"] == LABELS[probabilities.index(max(probabilities))]
    refused = [row for row in rows if not row["predicted"]]
    assert {row["file"] for row in refused} == {"report.pdf", "more.zip/../../escape.png"}
    assert all(row["warnings"].startswith("not read: ") for row in refused)
    assert "PDF" in next(row for row in refused if row["file"] == "report.pdf")["warnings"]

    with Path(csv_path).open(newline="", encoding="utf-8") as handle:
        assert list(csv.DictReader(handle)) == rows  # the download holds the table's rows

    # the single-image endpoint still answers after the batch (the batch ran in the low-priority worker)
    label, _ = client.predict(handle_file(str(xrays[0])), api_name="/predict")
    assert label["label"] in LABELS


def test_empty_batch_is_a_sentence(reported_app_url):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(reported_app_url, verbose=False)
    with pytest.raises(AppError, match="No files were uploaded"):
        client.predict([], api_name="/predict_batch")
