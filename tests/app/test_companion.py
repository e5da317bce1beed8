"""The paper's competitive CNN beside the CNN-LSTM in the app (issue 20): off by default, loaded on first use, one
extra forward pass with its own processor; `/predict_cnn` through gradio_client and the tick box in Chromium."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from cxr_app.loading import ENV_COMPANION, ModelUnavailable, resolve_companion
from cxr_app.service import CxrDemo

LABELS = ["COVID-19", "Normal", "Pneumonia"]


@pytest.fixture(scope="module")
def home(make_checkpoint, tmp_path_factory) -> Path:
    """An app home with a tiny CNN-LSTM and a tiny dense-head CNN where the app looks for them."""
    folder = tmp_path_factory.mktemp("home")
    make_checkpoint(folder / "checkpoints" / "cnn-lstm-cxr3")
    make_checkpoint(folder / "checkpoints" / "cnn-dense-cxr3", scale=3.0, head_type="dense")
    return folder


def test_companion_is_found_loaded_lazily_and_exact(home, example_xrays, monkeypatch):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    monkeypatch.delenv(ENV_COMPANION, raising=False)
    app = CxrDemo.from_source(home=home)
    assert app.companion_source == str(home / "checkpoints" / "cnn-dense-cxr3")
    assert app._companion is None  # nothing loaded at start-up
    xray = example_xrays["covid19"][0]
    scores = app.companion_scores(str(xray))
    assert list(scores) == LABELS and sum(scores.values()) == pytest.approx(1.0, abs=1e-6)
    folder = home / "checkpoints" / "cnn-dense-cxr3"
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    assert model.config.head_type == "dense"
    processor = AutoImageProcessor.from_pretrained(folder)
    with torch.no_grad():
        expected = model(**processor(Image.open(xray).convert("RGB"), return_tensors="pt")).logits[0].softmax(-1)
    assert list(scores.values()) == pytest.approx(expected.tolist(), abs=1e-5)
    lstm_scores, _ = app.predict(str(xray))
    assert list(lstm_scores.values()) != pytest.approx(list(scores.values()), abs=1e-3)  # another network


def test_companion_off_or_missing(home, tmp_path, example_xrays, monkeypatch):
    monkeypatch.setenv(ENV_COMPANION, "off")
    assert resolve_companion(home) is None
    monkeypatch.delenv(ENV_COMPANION)
    assert resolve_companion(tmp_path) is None  # no checkpoints/cnn-dense-cxr3 there
    app = CxrDemo.from_source(str(home / "checkpoints" / "cnn-lstm-cxr3"), home=tmp_path)
    with pytest.raises(ModelUnavailable, match="No competitive CNN is installed"):
        app.companion_scores(str(example_xrays["normal"][0]))


@pytest.fixture(scope="module")
def companion_url(app_server, home) -> Iterator[str]:
    """`python app.py` serving the tiny CNN-LSTM with the tiny CNN as its companion ($CNN_LSTM_COMPANION)."""
    previous = os.environ.get(ENV_COMPANION)
    os.environ[ENV_COMPANION] = str(home / "checkpoints" / "cnn-dense-cxr3")
    try:
        with app_server(home / "checkpoints" / "cnn-lstm-cxr3", home) as url:
            yield url
    finally:
        if previous is None:
            os.environ.pop(ENV_COMPANION, None)
        else:
            os.environ[ENV_COMPANION] = previous


@pytest.mark.slow
def test_predict_cnn_endpoint(companion_url, example_xrays, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(companion_url, verbose=False)
    xray = handle_file(str(example_xrays["pneumonia"][0]))
    cnn = client.predict(xray, api_name="/predict_cnn")
    lstm, _ = client.predict(xray, api_name="/predict")
    for answer in (cnn, lstm):
        confidences = {item["label"]: item["confidence"] for item in answer["confidences"]}
        assert sorted(confidences) == sorted(LABELS) and sum(confidences.values()) == pytest.approx(1.0, abs=1e-4)
    assert cnn["label"] in LABELS
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a PNG" * 10)
    with pytest.raises(Exception, match="cannot be read"):  # a bad file: a sentence, and the server goes on
        client.predict(handle_file(str(broken)), api_name="/predict_cnn")
    assert client.predict(xray, api_name="/predict_cnn")["label"] == cnn["label"]


@pytest.mark.slow
def test_tick_box_shows_the_cnn(companion_url, example_xrays, tmp_path):
    from tests.app.test_browser import CHROMIUM, CHROMIUM_FLAGS, open_page

    if not CHROMIUM.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{CHROMIUM} not found")
        pytest.skip(f"{CHROMIUM} not found")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 1100})
        try:
            open_page(page, companion_url)
            assert not page.locator("#cnn-probabilities").is_visible()  # off by default
            page.locator("#xray-file input[type=file]").set_input_files(str(example_xrays["covid19"][0]))
            page.locator('[data-testid="label-output-value"]').first.wait_for(timeout=120_000)
            page.locator("#show-cnn input[type=checkbox]").check()
            cnn = page.locator('#cnn-probabilities [data-testid="label-output-value"]')
            cnn.wait_for(timeout=120_000)
            assert cnn.inner_text().strip() in LABELS
            page.screenshot(path=str(tmp_path / "cnn-beside-cnn-lstm.png"), full_page=True)
            assert (tmp_path / "cnn-beside-cnn-lstm.png").stat().st_size > 10_000
            page.locator("#show-cnn input[type=checkbox]").uncheck()
            page.locator("#cnn-probabilities").wait_for(state="hidden", timeout=30_000)
        finally:
            page.close()
            browser.close()
