"""The disk budget of uploads (cxr_app/upload_budget.py) against a real `python app.py`: a client uploading in a
loop is refused with a sentence once past its budget while another client still uploads, and the upload cache
never grows past its cap; the server keeps serving."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cxr_app.upload_budget import MB, UploadBudget, UploadLedger, folder_bytes

pytestmark = pytest.mark.slow


def test_ledger_window_and_cap(tmp_path):
    now = [0.0]
    ledger = UploadLedger(UploadBudget(3 * MB, 60.0, 5 * MB), lambda: tmp_path, clock=lambda: now[0])
    assert ledger.admit("ip:a", 2 * MB) is None
    refusal = ledger.admit("ip:a", 2 * MB)
    assert refusal and "at most 3 MB" in refusal and "last 1 minutes" in refusal
    assert ledger.admit("ip:b", 2 * MB) is None
    assert "space for uploads is full" in ledger.admit("ip:c", 2 * MB)  # 4 MB admitted of 5
    now[0] = 61.0  # a's window has passed; the cache is measured again (empty folder)
    assert ledger.admit("ip:a", 2 * MB) is None


@pytest.fixture
def budget_server(app_server, make_checkpoint, tmp_path) -> Iterator[tuple[str, Path]]:
    """A tiny app behind one trusted proxy (each client its X-Forwarded-For), 3 MB per client, an 8 MB cache."""
    settings = {"CNN_LSTM_UPLOAD_BUDGET": "3,600", "CNN_LSTM_UPLOAD_CACHE_MB": "8", "CNN_LSTM_PROXY_HOPS": "1"}
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    make_checkpoint(tmp_path / "checkpoint")
    try:
        with app_server(tmp_path / "checkpoint", tmp_path) as url:
            yield url, tmp_path / "gradio"
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def upload(url: str, payload: bytes, client: str) -> tuple[int, str]:
    import httpx

    files = {"files": ("scan.png", payload, "image/png")}
    response = httpx.post(f"{url}/gradio_api/upload", files=files, headers={"X-Forwarded-For": client}, timeout=60)
    return response.status_code, response.text


def test_upload_loop_is_refused_and_the_cache_cap_holds(budget_server, example_xrays):
    url, cache = budget_server
    payload = os.urandom(MB - 4096)  # ~1 MB each: content does not matter to the upload route
    statuses = [upload(url, payload, "10.0.0.1") for _ in range(6)]
    assert [status for status, _ in statuses[:2]] == [200, 200], statuses[:2]
    refused = [text for status, text in statuses if status == 413]
    assert len(refused) >= 3 and "each user may upload at most 3 MB" in refused[0], statuses
    assert upload(url, payload, "10.0.0.2")[0] == 200  # another client still may
    # many clients in a loop: the cache stops at its cap
    answers = [upload(url, payload, f"10.0.1.{index}") for index in range(16)]
    full = [text for status, text in answers if status == 413]
    assert full and "space for uploads is full right now (8 MB)" in full[-1], answers
    assert folder_bytes(cache) <= 8 * MB + MB, folder_bytes(cache)
    # the server still answers (a page request; a prediction needs an upload, and the cache is full)
    import httpx

    assert httpx.get(f"{url}/config", timeout=30).status_code == 200
