"""The launched app (`python app.py --model ... --port N`) through its API with gradio_client: named endpoints,
labels, the overlay's aspect ratio, every bad input answered with its message while the server keeps serving, and
the no-model state."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

LABELS = ["COVID-19", "Normal", "Pneumonia"]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(tiny_app_url: str):
    from gradio_client import Client

    return Client(tiny_app_url, verbose=False)


def predict(client, path: Path) -> tuple[dict, str]:
    from gradio_client import handle_file

    return client.predict(handle_file(str(path)), api_name="/predict")


def assert_serving(client, xray: Path) -> None:
    label, _ = predict(client, xray)
    assert label["label"] in LABELS


def test_named_endpoints(client):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/predict", "/explain"} <= set(endpoints)
    explain_parameters = [parameter["parameter_name"] for parameter in endpoints["/explain"]["parameters"]]
    assert explain_parameters == ["file", "method", "target"]


def test_predict_and_explain_a_real_xray(client, example_xrays):
    from gradio_client import handle_file

    xray = next(path for paths in example_xrays.values() for path in paths
                if abs(Image.open(path).width / Image.open(path).height - 1) > 0.1)
    label, summary = predict(client, xray)
    assert sorted(item["label"] for item in label["confidences"]) == sorted(LABELS)
    assert sum(item["confidence"] for item in label["confidences"]) == pytest.approx(1.0, abs=1e-4)
    assert label["label"] in summary and "not for diagnosis" in summary
    for method in ("Grad-CAM", "Occlusion"):
        overlay_path, note = client.predict(handle_file(str(xray)), method, "Predicted class", api_name="/explain")
        with Image.open(overlay_path) as overlay, Image.open(xray) as original:
            assert overlay.format == "PNG" and overlay.mode == "RGB"
            assert overlay.width / overlay.height == pytest.approx(original.width / original.height, rel=0.01)
        assert method in note


@pytest.mark.parametrize(
    ("name", "make", "message"),
    [
        ("corrupt.png", lambda files, xray: files.write("corrupt.png", b"\x89PNG\r\n\x1a\n" + bytes(3000)), "damaged"),
        ("text.png", lambda files, xray: files.write("text.png", b"just some text\n" * 20), "contains text"),
        ("1x1.png", lambda files, xray: files.save("1x1.png", Image.new("L", (1, 1))), "too small"),
        ("huge.png", lambda files, xray: files.huge_png("huge.png"), "too large"),
    ],
)
def test_bad_inputs_get_their_message(client, files, example_xrays, name, make, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=message) as caught:
        predict(client, make(files, example_xrays["normal"][0]))
    assert "Traceback" not in str(caught.value)
    assert_serving(client, example_xrays["normal"][0])


@pytest.mark.parametrize(
    ("name", "make", "expected"),
    [
        ("16-bit PNG", lambda files, xray: files.sixteen_bit_png("16.png"), "16-bit image"),
        ("RGBA", lambda files, xray: files.rgba_xray_png(xray, "rgba.png"), "composited on black"),
        ("MONOCHROME1", lambda files, xray: files.xray_as_dicom(xray, "m1.dcm", "MONOCHROME1"), "MONOCHROME1"),
    ],
)
def test_unusual_inputs_are_answered_with_notes(client, files, example_xrays, name, make, expected):
    label, summary = predict(client, make(files, example_xrays["pneumonia"][0]))
    assert label["label"] in LABELS and expected in summary
    assert_serving(client, example_xrays["normal"][0])


def test_colour_photo_is_answered_with_a_warning(client, files, non_radiograph, example_xrays):
    label, summary = predict(client, files.save("photo.jpg", non_radiograph("colour photo", 1), "JPEG"))
    assert label["label"] in LABELS and "does not look like a frontal chest radiograph" in summary
    assert_serving(client, example_xrays["normal"][0])


def test_unknown_method_is_an_error_not_a_crash(client, example_xrays):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="is not in the list of choices"):
        client.predict(handle_file(str(example_xrays["normal"][0])), "LIME", "Predicted class", api_name="/explain")
    assert_serving(client, example_xrays["normal"][0])


def test_no_model_state(tmp_path, monkeypatch, example_xrays, free_port):
    """The default checkpoint folder missing: the page says so and every call answers with the instructions."""
    import urllib.request

    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from cxr_app import demo as demo_module

    monkeypatch.delenv("CNN_LSTM_MODEL", raising=False)
    demo = demo_module.build_demo(home=tmp_path)
    port = free_port()
    demo_module.launch(demo, port=port, prevent_thread_lock=True, quiet=True)
    try:
        url = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(url + "/config", timeout=30) as response:
            assert "No trained model is installed" in response.read().decode()
        client = Client(url, verbose=False)
        for _ in range(2):  # and it keeps answering
            with pytest.raises(AppError, match="No trained model is installed") as caught:
                predict(client, example_xrays["normal"][0])
            assert "train/run.py" in str(caught.value) and "--model" in str(caught.value)
    finally:
        demo.close()
