"""The app's logic without a server: upload reading (images, DICOM, bad files), guardrails, predict and explain."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxr_app import demo as demo_module
from cxr_app import endpoints as endpoints_module
from cxr_app import guardrails, uploads
from cxr_app.demo import CxrDemo, ModelUnavailable
from cxr_app.uploads import (
    CorruptImageError,
    ImageTooLargeError,
    ImageTooSmallError,
    InputError,
    NotAnImageError,
    UnsupportedImageError,
    read_upload,
)

LABELS = ["COVID-19", "Normal", "Pneumonia"]
PATIENT_STRINGS = ("Doe", "Jane", "SECRET-123", "19700101", "Elsewhere")
# The finding each kind of non-radiograph must raise (others may come with it: text also looks like fine texture).
EXPECTED_FINDING = {"colour photo": "colour", "document": "text", "screenshot": "text", "flat": "flat",
                    "noise": "noise"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, make_checkpoint) -> Path:
    folder = tmp_path_factory.mktemp("tiny-checkpoint")
    make_checkpoint(folder)
    return folder


@pytest.fixture(scope="module")
def app(checkpoint: Path) -> CxrDemo:
    app = CxrDemo.from_source(str(checkpoint))
    assert app.classifier is not None, app.status
    return app


@pytest.fixture(scope="module")
def wide_xray(example_xrays: dict[str, list[Path]]) -> Path:
    """A real X-ray that is not square, so that aspect-ratio mistakes show."""
    for path in (path for paths in example_xrays.values() for path in paths):
        with Image.open(path) as image:
            if abs(image.width / image.height - 1) > 0.15:
                return path
    pytest.fail("no non-square X-ray found")


class TestReadUpload:
    def test_real_jpeg_is_read_unchanged(self, example_xrays):
        path = example_xrays["covid19"][0]
        loaded = read_upload(path)
        assert loaded.kind == "JPEG" and loaded.notes == [] and loaded.dicom == {}
        np.testing.assert_array_equal(loaded.pixels[..., 0], np.asarray(Image.open(path).convert("L")))

    def test_sixteen_bit_png_keeps_its_range(self, files):
        loaded = read_upload(files.sixteen_bit_png("16.png"))
        assert loaded.pixels.shape == (300, 240, 1) and "16-bit" in loaded.notes[0]
        assert loaded.pixels.min() == 0 and loaded.pixels.max() == pytest.approx(255)
        assert len(np.unique(loaded.pixels)) > 256  # finer than 8 bits survives as float

    def test_rgba_is_composited_on_black(self, files, example_xrays):
        loaded = read_upload(files.rgba_xray_png(example_xrays["normal"][0], "rgba.png"))
        assert loaded.pixels[:, loaded.width // 2 + 1 :].max() == 0
        assert loaded.pixels[:, : loaded.width // 2].max() > 100
        assert any("transparent" in note for note in loaded.notes)

    def test_cmyk_jpeg_bmp_tiff_and_multipage(self, files):
        cmyk = read_upload(files.save("c.jpg", Image.new("CMYK", (120, 90), (0, 0, 0, 0)), "JPEG"))
        assert cmyk.pixels.shape == (90, 120, 3) and cmyk.pixels.min() > 240  # no ink -> white
        assert "CMYK" in cmyk.notes[0]
        grey = Image.fromarray(np.tile(np.arange(100, dtype=np.uint8), (80, 1)))
        assert read_upload(files.save("g.bmp", grey, "BMP")).kind == "BMP"
        pages = [grey.transpose(Image.FLIP_LEFT_RIGHT)]
        tiff = read_upload(files.save("g.tif", grey, "TIFF", save_all=True, append_images=pages))
        assert tiff.kind == "TIFF" and "first one" in tiff.notes[0]
        np.testing.assert_array_equal(tiff.pixels[..., 0], np.asarray(grey))

    def test_exif_orientation_is_applied(self, files):
        image = Image.new("L", (160, 100), 128)
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90 degrees clockwise to display
        loaded = read_upload(files.save("o.jpg", image, "JPEG", exif=exif))
        assert (loaded.width, loaded.height) == (100, 160)

    @pytest.mark.parametrize(
        ("name", "make", "error", "words"),
        [
            ("corrupt.png", lambda encode: b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8, CorruptImageError,
             "damaged"),
            ("text.png", lambda encode: b"patient list\nnot an image at all\n", NotAnImageError, "text"),
            ("scan.png", lambda encode: b"%PDF-1.7\n...", NotAnImageError, "PDF"),
            ("empty.png", lambda encode: b"", NotAnImageError, "empty"),
            ("one.png", lambda encode: encode(Image.new("L", (1, 1))), ImageTooSmallError, "1x1"),
            ("anim.gif", lambda encode: encode(Image.new("L", (100, 100)), "GIF"), UnsupportedImageError, "GIF"),
        ],
    )
    def test_bad_files_name_the_problem(self, files, name, make, error, words):
        with pytest.raises(error, match=words):
            read_upload(files.write(name, make(files.encode)))

    @pytest.mark.parametrize("suffix", ["png", "jpg"])
    def test_truncated_files(self, files, example_xrays, suffix):
        image = Image.open(example_xrays["pneumonia"][0])
        data = files.encode(image, "PNG" if suffix == "png" else "JPEG")
        with pytest.raises(CorruptImageError, match="truncated"):
            read_upload(files.write(f"cut.{suffix}", data[: len(data) // 2]))

    @pytest.mark.parametrize(("side", "megapixels"), [(20_000, 400), (8_000, 64)])  # Pillow's own refusal, ours
    def test_huge_image_is_refused_before_decoding(self, files, monkeypatch, side, megapixels):
        path = files.huge_png("huge.png", side)
        assert path.stat().st_size < 1_000_000  # a bomb: a tiny file, hundreds of megapixels
        monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("pixels were decoded"))
        with pytest.raises(ImageTooLargeError, match=f"{megapixels} megapixels"):
            read_upload(path)

    def test_file_size_limit(self, example_xrays, monkeypatch):
        monkeypatch.setattr(uploads, "MAX_FILE_BYTES", 1000)
        with pytest.raises(ImageTooLargeError, match="too large"):
            read_upload(example_xrays["normal"][0])

    def test_no_file(self):
        with pytest.raises(InputError, match="No file"):
            read_upload(None)


class TestDicom:
    STORED = np.repeat(np.array([100, 1000, 3000], np.uint16), [32, 32, 32])[:, None] * np.ones((1, 80), np.uint16)

    def test_rescale_and_window(self, files):
        # modality values 2 * stored - 1024 = -824, 976, 4976; window centred on 976, 1001 wide
        path = files.dicom("w.dcm", self.STORED, RescaleSlope=2, RescaleIntercept=-1024,
                           WindowCenter=976, WindowWidth=1001)
        loaded = read_upload(path)
        assert loaded.kind == "DICOM" and loaded.pixels.shape == (96, 80, 1)
        assert loaded.pixels[[0, 40, 90], 0, 0] == pytest.approx([0, 127.6, 255], abs=0.5)
        assert "window" in loaded.notes[0]

    def test_monochrome1_is_inverted(self, files):
        tags = {"WindowCenter": 976, "WindowWidth": 1001, "RescaleSlope": 2, "RescaleIntercept": -1024}
        mono2 = read_upload(files.dicom("m2.dcm", self.STORED, "MONOCHROME2", **tags))
        mono1 = read_upload(files.dicom("m1.dcm", self.STORED, "MONOCHROME1", **tags))
        np.testing.assert_allclose(mono1.pixels, 255 - mono2.pixels, atol=1e-4)
        assert any("MONOCHROME1" in note for note in mono1.notes)

    def test_voi_lut_sequence_is_applied(self, files):
        from pydicom.dataset import Dataset
        from pydicom.sequence import Sequence

        lut = Dataset()
        lut.LUTDescriptor = [4096, 0, 12]
        lut.LUTData = np.arange(4095, -1, -1, dtype=np.uint16).tobytes()  # an inverting LUT
        loaded = read_upload(files.dicom("l.dcm", self.STORED, VOILUTSequence=Sequence([lut])))
        expected = 255 * (4095 - np.array([100, 1000, 3000])) / 4095
        assert loaded.pixels[[0, 40, 90], 0, 0] == pytest.approx(expected, abs=0.01)

    def test_no_window_multiframe_and_no_patient_tags(self, files):
        loaded = read_upload(files.dicom("f.dcm", np.stack([self.STORED, self.STORED[::-1]])))
        assert loaded.pixels[[0, 40, 90], 0, 0] == pytest.approx([0, 79.1, 255], abs=0.2)  # first frame, stretched
        assert any("first one" in note for note in loaded.notes)
        assert set(loaded.dicom) <= set(uploads.DICOM_SAFE_TAGS)
        assert not any(s in json.dumps([loaded.dicom, loaded.notes]) for s in PATIENT_STRINGS)

    def test_dicom_without_pixels(self, files):
        path = files.dicom("sr.dcm", self.STORED)
        import pydicom

        ds = pydicom.dcmread(path)
        del ds.PixelData
        ds.save_as(path)
        with pytest.raises(NotAnImageError, match="Pixel Data"):
            read_upload(path)


class TestGuardrails:
    @pytest.mark.shared_data
    def test_false_alarm_rate_on_all_cxr3_radiographs(self, cxr3_dir):
        paths = sorted((cxr3_dir / "images").glob("*/*.jpg"))
        assert len(paths) == 1038
        alarms = [path.name for path in paths if guardrails.check_radiograph(read_upload(path).pixels)]
        print(f"guardrail false alarms on cxr3: {len(alarms)}/{len(paths)} = {len(alarms) / len(paths):.2%} {alarms}")
        assert len(alarms) / len(paths) <= 0.01, alarms

    def test_no_alarm_on_the_example_xrays(self, example_xrays):
        for path in (path for paths in example_xrays.values() for path in paths):
            assert guardrails.check_radiograph(read_upload(path).pixels) == [], path.name

    @pytest.mark.parametrize("kind", sorted(EXPECTED_FINDING))
    def test_hit_rate_on_generated_non_radiographs(self, files, non_radiograph, kind):
        hits = 0
        for seed in range(12):
            image = non_radiograph(kind, seed)
            fmt = "JPEG" if kind == "colour photo" else "PNG"  # photos arrive as JPEG, the rest as PNG
            loaded = read_upload(files.save(f"{seed}.{fmt.lower()}", image, fmt))
            codes = {finding.code for finding in guardrails.check_radiograph(loaded.pixels)}
            hits += EXPECTED_FINDING[kind] in codes
        print(f"guardrail hits on generated {kind}: {hits}/12")
        assert hits == 12

    def test_dicom_header_findings(self, example_xrays):
        pixels = np.asarray(Image.open(example_xrays["normal"][1]), np.float32)[..., None]  # the NIH PA film
        assert guardrails.check_radiograph(pixels, {"Modality": "DX", "ViewPosition": "PA"}) == []
        codes = {f.code for f in guardrails.check_radiograph(pixels, {"Modality": "CT", "ViewPosition": "LL"})}
        assert codes == {"modality", "lateral"}

    def test_low_confidence(self):
        assert guardrails.check_confidence({"COVID-19": 0.9, "Normal": 0.05, "Pneumonia": 0.05}) == []
        (finding,) = guardrails.check_confidence({"COVID-19": 0.4, "Normal": 0.35, "Pneumonia": 0.25})
        assert finding.code == "low_confidence" and "COVID-19" in finding.message


class TestPredict:
    def test_probabilities_match_the_model(self, app, checkpoint, example_xrays):
        from transformers import AutoModelForImageClassification

        from modeling_cnn_lstm.fast_inference_cnn_lstm import CANDIDATES

        assert app.classifier.runner is None  # not chosen at start-up: launch() starts the choice in the background
        assert app.start_fast_path().result(timeout=300) in CANDIDATES  # then Occlusion opts in to the fast path
        runner = app.classifier.runner
        assert runner is not None and runner.backend in CANDIDATES and runner.reason
        assert app.classifier.explainer.no_grad_logits is runner
        tolerance = 1e-5  # predictions: the eager fp32 pass that also gives their Grad-CAM
        model = AutoModelForImageClassification.from_pretrained(checkpoint).eval()
        processor = app.classifier.processor
        for paths in example_xrays.values():
            scores, summary = app.predict(str(paths[0]))
            assert list(scores) == LABELS and sum(scores.values()) == pytest.approx(1.0, abs=1e-5)
            with torch.no_grad():  # the model's own fp32 forward as the reference
                pixels = processor(Image.open(paths[0]), return_tensors="pt")["pixel_values"]
                expected = model(pixel_values=pixels).logits[0].softmax(-1).tolist()
            assert list(scores.values()) == pytest.approx(expected, abs=tolerance)
            top = max(scores, key=scores.get)
            assert summary.startswith(f"### {top}: ") and "not for diagnosis" in summary
            assert "Evidence inside the lung fields: **" in summary
            assert "does not look like" not in summary

    def test_low_confidence_and_calibration_are_said(self, tmp_path, make_checkpoint, example_xrays, caplog):
        make_checkpoint(tmp_path, calibration_temperature=1000.0)  # every answer close to 1/3
        with caplog.at_level("INFO", logger="cxr_app.loading"):
            app = CxrDemo.from_source(str(tmp_path))
            app.start_fast_path().result(timeout=300)
        assert f"Occlusion now runs on {app.classifier.runner.backend}: " in caplog.text
        scores, summary = app.predict(str(example_xrays["normal"][0]))
        assert max(scores.values()) < 0.34
        assert "Low confidence" in summary and "calibrated with temperature 1000.00" in summary

    def test_colour_photo_is_answered_with_a_warning(self, app, files, non_radiograph):
        path = files.save("photo.jpg", non_radiograph("colour photo", 0), "JPEG")
        scores, summary = app.predict(str(path))
        assert list(scores) == LABELS
        assert "does not look like a frontal chest radiograph" in summary and "colour" in summary

    def test_dicom_summary_has_no_patient_data(self, app, files, example_xrays):
        path = files.xray_as_dicom(example_xrays["covid19"][0], "x.dcm", "MONOCHROME1", ViewPosition="PA")
        _, summary = app.predict(str(path))
        assert "DICOM" in summary and "MONOCHROME1" in summary
        assert not any(text in summary for text in PATIENT_STRINGS)

    def test_monochrome1_dicom_predicts_like_the_image(self, app, files, example_xrays):
        xray = example_xrays["pneumonia"][1]
        dicom = files.xray_as_dicom(xray, "x.dcm", "MONOCHROME1")
        from_image, _ = app.predict(str(xray))
        from_dicom, _ = app.predict(str(dicom))
        assert list(from_dicom.values()) == pytest.approx(list(from_image.values()), abs=0.02)


class TestExplain:
    @pytest.mark.parametrize("method", ["Grad-CAM", "Integrated Gradients", "Occlusion"])
    def test_overlay_keeps_the_aspect_ratio(self, app, wide_xray, method):
        reports = []
        overlay, note = app.explain(str(wide_xray), method, progress=lambda f, desc: reports.append(f))
        with Image.open(wide_xray) as original:
            assert overlay.size == original.size  # <= 768 px: shown at its own size
        assert overlay.mode == "RGB" and method in note
        assert any(label in note for label in LABELS)
        if method != "Grad-CAM":
            assert reports and reports[-1] == pytest.approx(1.0)

    def test_target_choice_and_bad_choices(self, app, example_xrays):
        _, note = app.explain(str(example_xrays["normal"][0]), "Grad-CAM", "COVID-19")
        assert "for **COVID-19**" in note
        with pytest.raises(InputError, match="method"):
            app.explain(str(example_xrays["normal"][0]), "LIME")
        with pytest.raises(InputError, match="class"):
            app.explain(str(example_xrays["normal"][0]), "Grad-CAM", "Tuberculosis")

    def test_all_zero_map_is_said_not_drawn(self, tmp_path, make_checkpoint, example_xrays):
        model = make_checkpoint(tmp_path)
        with torch.no_grad():  # a head that ignores the features: every attribution is zero
            model.head.fc.weight.zero_()
        model.save_pretrained(tmp_path)
        app = CxrDemo.from_source(str(tmp_path))
        path = example_xrays["normal"][0]
        overlay, note = app.explain(str(path), "Grad-CAM")
        assert "zero everywhere" in note
        from cxr_app.saliency import OUTLINE_COLOUR

        plain = np.asarray(Image.open(path).convert("RGB"))
        drawn = np.asarray(overlay)
        outline = np.all(drawn == OUTLINE_COLOUR, axis=-1)  # the lung fields' outline is still drawn ...
        assert outline.any()
        np.testing.assert_array_equal(drawn[~outline], plain[~outline])  # ... but no colour of a map


def test_no_model_states(tmp_path, monkeypatch, checkpoint, make_checkpoint):
    monkeypatch.delenv("CNN_LSTM_MODEL", raising=False)
    app = CxrDemo.from_source(home=tmp_path)
    assert app.classifier is None
    for text in ("No trained model is installed", "checkpoints/cnn-lstm-cxr3", "python train/run.py",
                 "train/configs/paper_cpu.json", "--model PATH_OR_HUB_ID", "CNN_LSTM_MODEL", "CNN_LSTM_REVISION"):
        assert text in app.status
    with pytest.raises(ModelUnavailable, match="No trained model"):
        app.predict("anything.png")
    (tmp_path / "empty").mkdir()
    assert "no config.json" in CxrDemo.from_source(str(tmp_path / "empty")).status
    assert "failed" in CxrDemo.from_source("someone/not-cached-anywhere", "v1").status  # offline, not cached
    (tmp_path / "vit").mkdir()
    (tmp_path / "vit" / "config.json").write_text(json.dumps({"model_type": "vit"}))
    assert "not a CNN-LSTM" in CxrDemo.from_source(str(tmp_path / "vit")).status
    mismatched = tmp_path / "mismatched"
    make_checkpoint(mismatched)
    processor_config = json.loads((mismatched / "preprocessor_config.json").read_text())
    processor_config["size"] = {"height": 64, "width": 64}
    (mismatched / "preprocessor_config.json").write_text(json.dumps(processor_config))
    assert "inconsistent" in CxrDemo.from_source(str(mismatched)).status
    monkeypatch.setenv("CNN_LSTM_DEVICE", "no-such-device")
    broken = CxrDemo.from_source(str(checkpoint))
    assert broken.classifier is None and "on no-such-device failed" in broken.status
    monkeypatch.delenv("CNN_LSTM_DEVICE")
    monkeypatch.setenv("CNN_LSTM_MODEL", str(checkpoint))
    monkeypatch.setenv("CNN_LSTM_REVISION", "main")
    assert demo_module.resolve_source() == (str(checkpoint), "main")
    assert demo_module.resolve_source("other/model", "v2") == ("other/model", "v2")


def test_user_errors_never_leak_tracebacks():
    import gradio as gr

    @endpoints_module.as_user_error("testing")
    def fails(exception: Exception) -> None:
        raise exception

    with pytest.raises(gr.Error) as caught:
        fails(ImageTooSmallError("The image is too small (1x1 pixels)"))
    assert caught.value.message == "The image is too small (1x1 pixels)"
    with pytest.raises(gr.Error) as caught:
        fails(KeyError("internal detail"))
    assert "Unexpected error while testing (KeyError)" in caught.value.message
    assert "internal detail" not in caught.value.message and "Traceback" not in caught.value.message


class TestLungEvidence:
    """How much of each call rests on the lungs: shown beside the prediction, warned about below the checkpoint's
    threshold, drawn as an outline on the overlay, in the batch rows (cxr_app/lung_evidence.py)."""

    def test_share_matches_the_audit_rule_and_is_said(self, app, example_xrays):
        from modeling_cnn_lstm.lung_region_cnn_lstm import evidence_share, find_lung_region

        path = example_xrays["covid19"][0]
        prediction = app.classify(str(path))
        evidence = prediction.evidence
        assert evidence is not None and 0.0 <= evidence.share <= 1.0 and 0.1 < evidence.area < 0.7
        pixels = app.classifier.processor(Image.open(path), return_tensors="pt")["pixel_values"]
        _, cam, target = app.classifier.explainer.gradcam_with_logits(pixels)
        assert app.classifier.labels[target] == prediction.label  # the map of the predicted class
        mask = find_lung_region(pixels[0]).mask
        assert evidence.share == pytest.approx(float(evidence_share(cam[None], mask[None])[0]))
        assert np.array_equal(evidence.mask, mask.numpy())
        _, summary = app.predict(str(path))
        assert f"Evidence inside the lung fields: **{evidence.share:.0%}**" in summary

    def test_warning_below_the_threshold_only(self, app, example_xrays, monkeypatch):
        from cxr_app.lung_evidence import WARNING

        path = str(example_xrays["normal"][0])
        monkeypatch.setattr(app, "lung_threshold", 1.01)  # every share is below
        assert WARNING in app.classify(path).warnings
        assert WARNING in app.predict(path)[1]
        monkeypatch.setattr(app, "lung_threshold", 0.0)  # none is
        assert WARNING not in app.classify(path).warnings

    def test_threshold_comes_from_the_report(self):
        from cxr_app.lung_evidence import DEFAULT_THRESHOLD, threshold_from_report

        assert threshold_from_report({"lung_evidence": {"threshold": 0.31}}) == 0.31
        for bad in (None, {}, {"lung_evidence": {"threshold": 0.9}}, {"lung_evidence": {"threshold": True}},
                    {"lung_evidence": {"threshold": "0.3"}}, {"lung_evidence": [0.3]}):  # fmt: skip
            assert threshold_from_report(bad) == DEFAULT_THRESHOLD

    def test_overlay_outlines_the_lung_fields(self, app, example_xrays):
        from cxr_app.saliency import OUTLINE_COLOUR

        overlay, note = app.explain(str(example_xrays["pneumonia"][0]))
        pixels = np.asarray(overlay)
        outline = np.all(pixels == OUTLINE_COLOUR, axis=-1)
        assert 200 < outline.sum() < 0.1 * outline.size and "green line outlines the lung fields" in note
        assert not outline[:, : pixels.shape[1] // 20].any()  # never along the image's own edge

    def test_batch_row_has_the_share(self, app, example_xrays):
        from cxr_app.results import columns, rows_csv

        row = app.classify_row("x.jpg", str(example_xrays["normal"][1]))
        assert 0.0 <= float(row["lung_evidence"]) <= 1.0
        assert "lung_evidence" in columns(LABELS) and ",lung_evidence," in rows_csv([row], LABELS).splitlines()[0]

    def test_cropping_model_places_map_and_outline_inside_its_lung_box(self, tmp_path, make_checkpoint, wide_xray):
        from cxr_app.saliency import OUTLINE_COLOUR
        from modeling_cnn_lstm.lung_region_cnn_lstm import lung_crop_box

        make_checkpoint(tmp_path, crop_to_lungs=True)
        cropping = CxrDemo.from_source(str(tmp_path))
        assert cropping.classifier.processor.crop_to_lungs is True
        overlay, _ = cropping.explain(str(wide_xray))
        with Image.open(wide_xray) as original:
            grey = np.asarray(original.convert("L"), dtype=np.float32)
            assert overlay.size == original.size
        top, left, bottom, right = lung_crop_box(torch.from_numpy(grey)[None])
        outline = np.all(np.asarray(overlay) == OUTLINE_COLOUR, axis=-1)
        rows, cols = np.nonzero(outline)
        assert rows.min() >= top - 2 and rows.max() <= bottom + 1
        assert cols.min() >= left - 2 and cols.max() <= right + 1
