"""The trust features of the page without a server: the model report tab's content (from the shipped checkpoint's own
report), predictive values next to a prediction, batch rows, and the saliency opacity."""

from __future__ import annotations

import csv
import io
import json
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from cxr_app import report_view
from cxr_app.demo import CxrDemo, build_demo
from cxr_app.prevalence import ClassRates, predictive_values
from cxr_app.results import rows_csv
from tests.app.conftest import SHIPPED_REPORT

LABELS = ["COVID-19", "Normal", "Pneumonia"]


@pytest.fixture(scope="module")
def shipped() -> dict:
    return json.loads((SHIPPED_REPORT / "metrics.json").read_text())


@pytest.fixture(scope="module")
def app(reported_checkpoint: Path) -> CxrDemo:
    app = CxrDemo.from_source(str(reported_checkpoint))
    assert app.classifier is not None and app.report is not None, app.status
    return app


def page_texts(demo) -> str:
    """Every Markdown/HTML value of the built page, joined."""
    values = [block.get("props", {}).get("value") for block in demo.config["components"]]
    return "\n".join(value for value in values if isinstance(value, str))


class TestReportView:
    def test_numbers_come_from_the_checkpoints_own_report(self, shipped):
        report = report_view.load_report(SHIPPED_REPORT)
        text = report_view.summary_markdown(report)
        for name, values in shipped["metrics"]["per_class"].items():
            row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
            for key in ("sensitivity", "specificity", "f1", "auc"):
                assert f"{100 * values[key]:.1f}%" in row, (name, key, row)
            intervals = shipped["bootstrap"].get("per_class", {}).get(name)
            if intervals:  # the report's per-class 95% intervals, in brackets
                assert f"({100 * intervals['sensitivity']['low']:.1f}–" in row
        assert f"accuracy {100 * shipped['metrics']['accuracy']:.1f}%" in text
        assert "not a diagnostic" in text and "source" in text
        assert report.patients() == len({row["patient_id"] for row in csv.DictReader(
            (SHIPPED_REPORT / "predictions.csv").open())})

    def test_every_section_renders_from_the_shipped_report(self, shipped):
        report = report_view.load_report(SHIPPED_REPORT)
        confusion = report_view.confusion_markdown(report)
        first_row = shipped["metrics"]["confusion_matrix"][0]
        assert "| **COVID-19** | " + " | ".join(map(str, first_row)) + " |" in confusion
        assert f"T = {shipped['calibration']['temperature']:.2f}" in report_view.calibration_markdown(report)
        sources = report_view.sources_markdown(report)
        assert all(f"| {source} | {values['num_samples']} |" in sources
                   for source, values in shipped["per_source"].items())
        audit = report_view.audit_markdown(report)
        hidden = shipped["shortcut_audit"]["conditions"]["lungs_hidden"]["accuracy"]
        assert "lung fields hidden" in audit and f"{100 * hidden:.1f}%" in audit
        assert "Source probe" in audit and "Per-source confusion" in audit  # the whole battery, as trained
        assert [path.name for path, _ in report.figures()] == [
            "confusion_matrix.png", "roc_curves.png", "reliability_diagram.png"]

    def test_older_and_partial_reports_still_render(self, tmp_path, shipped):
        data = json.loads(json.dumps(shipped))
        data["bootstrap"].pop("per_class", None)
        data.pop("shortcut_audit")
        data.pop("per_source")
        (tmp_path / "metrics.json").write_text(json.dumps(data))
        report = report_view.load_report(tmp_path)
        assert "no per-class intervals" in report_view.summary_markdown(report)
        assert "Not run for this checkpoint" in report_view.audit_markdown(report)
        assert "no per-source metrics" in report_view.sources_markdown(report)
        assert report.figures() == [] and report.patients() is None  # no PNGs, no predictions.csv here

    @pytest.mark.parametrize("content", [b"{not json", b"[]", b'{"metrics": {}}', b"\xff\xfe", b" " * (3 * 2**20)])
    def test_broken_reports_are_ignored(self, tmp_path, content):
        (tmp_path / "metrics.json").write_bytes(content)
        assert report_view.load_report(tmp_path) is None
        assert report_view.load_report(None) is None

    def test_figure_names_cannot_leave_the_report_folder(self, tmp_path, shipped):
        data = {**shipped, "plots": {"confusion_matrix": "../../etc/passwd", "roc_curves": "/etc/hostname"}}
        (tmp_path / "metrics.json").write_text(json.dumps(data))
        assert report_view.load_report(tmp_path).figures() == []

    def test_where_the_report_is_found(self, tmp_path, reported_checkpoint, monkeypatch):
        assert report_view.report_folder(str(reported_checkpoint)) == reported_checkpoint / "report"
        assert report_view.report_folder(str(tmp_path)) is None  # a folder without report/
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        assert report_view.report_folder("someone/not-cached") is None  # offline, not cached: no report, no error


class TestPage:
    def test_report_tab_and_its_absence(self, app, checkpoint_without_report):
        text = page_texts(build_demo(app=app))
        assert "How far to trust this model" in text and "Shortcut audit" in text
        assert "Model report" in json.dumps(build_demo(app=app).config["components"], default=str)
        bare = page_texts(build_demo(app=CxrDemo.from_source(str(checkpoint_without_report))))
        assert "No model report" in bare and "How far to trust" not in bare

    def test_prevalence_reading_is_computed_from_the_report(self, app, shipped):
        rates = shipped["metrics"]["per_class"]["COVID-19"]
        ppv, npv = predictive_values(rates["sensitivity"], rates["specificity"], 0.05)
        text = app.prevalence_reading("COVID-19", 0.05)
        assert f"right about {100 * ppv:.0f}% of the time (PPV)" in text and f"about {100 * npv:.0f}% (NPV)" in text
        assert round(100 * ppv) == 13  # 0.903 x 0.05 / (0.903 x 0.05 + 0.314 x 0.95), by hand: 0.131
        higher = app.prevalence_reading("COVID-19", 0.30)
        assert higher != text and "30% prevalence" in higher
        assert app.prevalence_reading(None, 0.05) == ""

    def test_no_report_no_predictive_values(self, checkpoint_without_report):
        bare = CxrDemo.from_source(str(checkpoint_without_report))
        assert "cannot be computed" in bare.prevalence_reading("Normal", 0.05)

    def test_hand_worked_predictive_values(self):
        assert predictive_values(0.9, 0.8, 0.1) == pytest.approx((1 / 3, 0.72 / 0.73))
        assert ClassRates(0.99, 0.99) and predictive_values(0.99, 0.99, 0.01)[0] == pytest.approx(0.5)


class TestBatch:
    def test_rows_for_files_a_zip_and_a_bad_file(self, app, example_xrays, tmp_path):
        xrays = [path for paths in example_xrays.values() for path in paths]
        archive = tmp_path / "films.zip"
        with zipfile.ZipFile(archive, "w") as zipped:
            for path in xrays[2:5]:
                zipped.write(path, f"nested/{path.name}")
            zipped.writestr("notes.txt", "not an x-ray")
        bad = tmp_path / "broken.png"
        bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
        calls = []
        rows = app.predict_batch([str(xrays[0]), str(bad), str(archive), str(xrays[1])],
                                 progress=lambda fraction, **kwargs: calls.append(fraction))
        names = [row["file"] for row in rows]
        assert names[:2] == [xrays[0].name, "broken.png"] and names[-1] == xrays[1].name
        assert {f"films.zip/nested/{path.name}" for path in xrays[2:5]} <= set(names)
        by_name = {row["file"]: row for row in rows}
        assert by_name["broken.png"]["predicted"] == "" and by_name["broken.png"]["warnings"].startswith("not read:")
        assert any(name.endswith("notes.txt") and row["warnings"].startswith("not read:")
                   for name, row in by_name.items())
        for path in xrays[:5]:  # the same probabilities as one upload at a time
            row = by_name.get(path.name) or by_name[f"films.zip/nested/{path.name}"]
            scores = app.classify(str(path)).scores
            assert row["predicted"] == max(scores, key=scores.get)
            assert [float(row[f"p_{label}"]) for label in LABELS] == pytest.approx(
                [scores[label] for label in LABELS], abs=1e-4)
        assert calls and calls[-1] == (len(rows) - 1, len(rows))
        assert not list(Path(tempfile.gettempdir()).glob("cxr-batch-*/*.png"))  # extracted members are deleted

    def test_batch_without_files_is_a_user_error(self, app):
        from cxr_app.uploads import InputError

        with pytest.raises(InputError, match="No files"):
            app.predict_batch([])
        with pytest.raises(InputError, match="at most 200 uploads"):
            app.predict_batch(["x.png"] * 201)

    def test_csv_is_safe_in_a_spreadsheet(self):
        from cxr_app.results import result_row

        rows = [result_row(LABELS, "=HYPERLINK(\"http://x\").png", {"COVID-19": 0.2, "Normal": 0.5,
                                                                    "Pneumonia": 0.3}),
                result_row(LABELS, "@evil.dcm", error="the file is damaged")]
        parsed = list(csv.DictReader(io.StringIO(rows_csv(rows, LABELS))))
        assert parsed[0]["file"].startswith("'=") and parsed[1]["file"] == "'@evil.dcm"
        assert parsed[0]["predicted"] == "Normal" and parsed[0]["p_Normal"] == "0.5000"
        assert parsed[1]["warnings"] == "not read: the file is damaged"


class TestSaliencyView:
    def test_opacity_redraws_the_kept_map_without_recomputing(self, app, example_xrays):
        path = str(example_xrays["normal"][0])
        view = app.attribution(path, "Grad-CAM")
        faint = np.asarray(app.render(path, view, 0.2), np.int16)
        strong = np.asarray(app.render(path, view, 0.9), np.int16)
        plain = np.asarray(app.input_image(path), np.int16)
        assert faint.shape == strong.shape == plain.shape
        assert np.abs(strong - plain).mean() > np.abs(faint - plain).mean() > 0
        assert (np.abs(faint - plain).sum(-1) == 0).mean() > 0.05  # weak areas: the X-ray itself, uncoloured
        overlay, note = app.explain(path, "Grad-CAM", opacity=0.9)
        assert np.array_equal(np.asarray(overlay, np.int16), strong) and "uncoloured areas mattered little" in note


@pytest.fixture(scope="module")
def checkpoint_without_report(tmp_path_factory, make_checkpoint) -> Path:
    folder = tmp_path_factory.mktemp("bare") / "checkpoint"
    make_checkpoint(folder)
    assert not (folder / "report").exists()
    return folder


def test_shipped_report_is_small():
    """The report travels with every copy of the model (Space, Hub): it must stay small."""
    total = sum(path.stat().st_size for path in SHIPPED_REPORT.iterdir())
    assert total < 512 * 1024, total
