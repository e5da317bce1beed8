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
    assert {"/predict", "/explain", "/predict_batch"} <= set(endpoints)
    explain_parameters = {parameter["parameter_name"]: parameter for parameter in endpoints["/explain"]["parameters"]}
    assert list(explain_parameters) == ["file", "method", "target", "opacity"]
    assert explain_parameters["opacity"]["parameter_has_default"]  # older clients send three values; still works
    assert [parameter["parameter_name"] for parameter in endpoints["/predict_batch"]["parameters"]] == ["files"]


def test_predict_and_explain_a_real_xray(client, example_xrays):
    from gradio_client import handle_file

    xray = next(path for paths in example_xrays.values() for path in paths
                if abs(Image.open(path).width / Image.open(path).height - 1) > 0.1)
    label, summary = predict(client, xray)
    assert sorted(item["label"] for item in label["confidences"]) == sorted(LABELS)
    assert sum(item["confidence"] for item in label["confidences"]) == pytest.approx(1.0, abs=1e-4)
    assert label["label"] in summary and "not for diagnosis" in summary
    assert "Evidence inside the lung fields: **" in summary  # the API tells how much of the call rests on the lungs
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


def test_page_tells_users_to_deidentify_and_how_long_files_stay(tiny_app_url):
    import urllib.request

    with urllib.request.urlopen(tiny_app_url + "/config", timeout=30) as response:
        config = response.read().decode()
    assert "Remove patient identifiers before uploading" in config
    assert "deleted from the server within 15 minutes" in config  # the default: every 5 min, older than 10 min
    assert "at most 3 Integrated Gradients or Occlusion maps per 2 minutes per user, one at a time" in config


def abandon_upload(url: str, name: str, sent: bytes) -> None:
    """Start an upload of a 10 MB file, send `sent`, and hang up: gradio keeps the partial file."""
    import socket
    import time
    from urllib.parse import urlsplit

    address = urlsplit(url)
    head = f'--XX\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n\r\n'.encode()
    with socket.create_connection((address.hostname, address.port)) as sock:
        request = (b"POST /gradio_api/upload HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-data; "
                   b"boundary=XX\r\nContent-Length: 10000000\r\n\r\n")
        sock.sendall(request + head + sent)
        time.sleep(0.5)


def test_uploads_results_and_abandoned_uploads_are_deleted(app_server, make_checkpoint, tmp_path, monkeypatch,
                                                           files, example_xrays):
    """With a 1 s sweep of files older than 2 s: a DICOM upload (its patient name in the file name), the overlay made
    from it and a half-sent upload are gone within seconds; the examples' cached copies stay and still work."""
    import time

    from gradio_client import Client, handle_file

    monkeypatch.setenv("CNN_LSTM_DELETE_CACHE", "1,2")
    home = tmp_path / "app"
    home.mkdir()
    make_checkpoint(home / "checkpoint")
    dicom = files.xray_as_dicom(example_xrays["normal"][0], "Doe_Jane_SECRET-123.dcm")
    with app_server(home / "checkpoint", home) as url:
        cache = home / "gradio"
        examples = sorted(path for path in cache.rglob("*.jpg") if path.is_file())
        assert len(examples) == 6  # copied into the cache when the page was built
        client = Client(url, verbose=False)
        assert predict(client, dicom)[0]["label"] in LABELS
        client.predict(handle_file(str(dicom)), "Grad-CAM", "Predicted class", api_name="/explain")
        abandon_upload(url, "Doe_Jane_partial.dcm", dicom.read_bytes()[:200_000])
        sent = [path for path in cache.rglob("*") if path.is_file() and path not in examples]
        assert any(path.name == "Doe_Jane_SECRET-123.dcm" for path in sent), sent  # the upload, under its name
        assert any(path.suffix == ".png" for path in sent), sent  # the overlay
        assert any(path.parent == cache and path.name.startswith("tmp") for path in sent), sent  # the partial one
        deadline = time.monotonic() + 30
        while [path for path in sent if path.exists()] and time.monotonic() < deadline:
            time.sleep(0.5)
        assert [path for path in sent if path.exists()] == []
        assert "Doe" not in " ".join(str(path) for path in cache.rglob("*"))
        assert all(path.is_file() for path in examples)
        example = next(path for path in examples if path.name == example_xrays["pneumonia"][0].name)
        assert predict(client, example)[0]["label"] in LABELS  # an example's cached copy is still served


def test_per_client_limits_through_the_api(make_checkpoint, tmp_path, free_port, example_xrays):
    """Two slow maps per minute per client, told when to retry; another client, predictions and Grad-CAM unaffected;
    behind a proxy the client is the address it appended to X-Forwarded-For."""
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    from cxr_app import demo as demo_module
    from cxr_app.limits import GRAD_CAM_MAP, PREDICT, SLOW_MAP, FairUse, Limit

    make_checkpoint(tmp_path / "checkpoint")
    limits = {PREDICT: Limit(100, 60.0), GRAD_CAM_MAP: Limit(100, 60.0),
              SLOW_MAP: Limit(2, 60.0, in_flight=1, what="Integrated Gradients or Occlusion maps")}
    demo = demo_module.build_demo(str(tmp_path / "checkpoint"), fair_use=FairUse(limits=limits, proxy_hops=1))
    port = free_port()
    demo_module.launch(demo, port=port, prevent_thread_lock=True, quiet=True)
    try:
        url = f"http://127.0.0.1:{port}"
        xray = handle_file(str(example_xrays["normal"][0]))
        first = Client(url, verbose=False, headers={"X-Forwarded-For": "6.6.6.6, 10.0.0.1"})
        forged = Client(url, verbose=False, headers={"X-Forwarded-For": "7.7.7.7, 10.0.0.1"})  # same client
        second = Client(url, verbose=False, headers={"X-Forwarded-For": "10.0.0.2"})
        for method in ("Integrated Gradients", "Occlusion"):
            first.predict(xray, method, "Predicted class", api_name="/explain")
        with pytest.raises(AppError, match=r"at most 2 per minute per user\. Try again in \d+ s"):
            forged.predict(xray, "Occlusion", "Predicted class", api_name="/explain")
        first.predict(xray, "Grad-CAM", "Predicted class", api_name="/explain")  # its own, looser limit
        assert first.predict(xray, api_name="/predict")[0]["label"] in LABELS
        second.predict(xray, "Integrated Gradients", "Predicted class", api_name="/explain")
    finally:
        demo.close()


def test_uploads_over_the_size_limit_are_refused(tiny_app_url, client, example_xrays):
    """gradio's upload route stops reading at the app's limit (64 MB): 413, and the server keeps serving."""
    import httpx

    from cxr_app.uploads import MAX_FILE_BYTES

    payload = {"files": ("big.dcm", b"\0" * (MAX_FILE_BYTES + 1), "application/octet-stream")}
    response = httpx.post(tiny_app_url + "/gradio_api/upload", files=payload, timeout=120)
    assert response.status_code == 413 and "maximum allowed size" in response.text
    assert_serving(client, example_xrays["normal"][0])
