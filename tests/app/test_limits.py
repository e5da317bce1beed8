"""cxr_app/limits.py: the per-client rate limiter on a fake clock, who a client is (X-Forwarded-For only through
trusted proxies), and the cap on one client's waiting requests against a real gradio queue."""

from __future__ import annotations

import threading
import time

import pytest

from cxr_app.limits import (
    FairUse,
    Limit,
    LowPriorityWorker,
    RateLimited,
    RateLimiter,
    client_key,
    default_proxy_hops,
    request_key,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


class TestRateLimiter:
    def test_window_and_retry_after(self, clock):
        limiter = RateLimiter({"map": Limit(3, 120.0, what="maps")}, clock)
        for step in range(3):
            clock.now += 10 * step
            with limiter.slot("a", "map"):
                pass
        clock.now = 1030.0  # starts at 1000, 1010, 1030: the first leaves the window at 1120
        with pytest.raises(RateLimited, match=r"at most 3 per 2 minutes per user\. Try again in 90 s") as caught:
            limiter.acquire("a", "map")
        assert caught.value.retry_after == pytest.approx(90.0)
        limiter.acquire("b", "map")  # another client has its own budget
        limiter.release("b", "map")
        clock.now = 1120.0  # exactly one window after the first start: it no longer counts
        limiter.acquire("a", "map")
        limiter.release("a", "map")
        with pytest.raises(RateLimited, match="Try again in 10 s"):  # 1010 leaves at 1130
            limiter.acquire("a", "map")

    def test_refusals_do_not_count(self, clock):
        limiter = RateLimiter({"map": Limit(1, 60.0)}, clock)
        limiter.acquire("a", "map")
        limiter.release("a", "map")
        for _ in range(50):  # a client hammering while refused does not push its own retry time back
            clock.now += 1
            with pytest.raises(RateLimited):
                limiter.acquire("a", "map")
        clock.now = 1060.0
        limiter.acquire("a", "map")

    def test_one_in_flight(self, clock):
        limiter = RateLimiter({"slow": Limit(10, 60.0, in_flight=1, what="slow maps")}, clock)
        with limiter.slot("a", "slow"):
            with pytest.raises(RateLimited, match="already have 1 slow maps running; at most 1 at a time"):
                limiter.acquire("a", "slow")
            limiter.acquire("b", "slow")
            limiter.release("b", "slow")
        assert limiter.running("a", "slow") == 0
        with pytest.raises(ValueError, match="boom"), limiter.slot("a", "slow"):  # released on errors too
            raise ValueError("boom")
        assert limiter.running("a", "slow") == 0
        limiter.acquire("a", "slow")

    def test_unlimited_kinds_and_disabled(self, clock):
        limiter = RateLimiter({"map": Limit(1, 60.0)}, clock)
        for _ in range(100):
            with limiter.slot("a", "other"):
                pass
        disabled = FairUse(enabled=False).limiter(clock)
        for _ in range(100):
            with disabled.slot("a", "slow-map"):
                pass

    def test_idle_clients_are_forgotten(self, clock):
        limiter = RateLimiter({"map": Limit(5, 60.0)}, clock)
        for index in range(1023):
            limiter.acquire(f"client-{index}", "map")
            limiter.release(f"client-{index}", "map")
        clock.now += 61
        limiter.acquire("last", "map")  # the 1024th call sweeps
        assert set(limiter._starts) == {("last", "map")}

    def test_thread_safe(self):
        limiter = RateLimiter({"map": Limit(500, 3600.0, in_flight=4)})
        admitted, refused, lock = [], [], threading.Lock()
        peak = {"value": 0}

        def worker() -> None:
            for _ in range(100):
                try:
                    with limiter.slot("shared", "map"):
                        with lock:
                            admitted.append(1)
                            peak["value"] = max(peak["value"], limiter.running("shared", "map"))
                        time.sleep(0.0005)
                except RateLimited:
                    with lock:
                        refused.append(1)

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(admitted) + len(refused) == 800
        assert len(admitted) <= 500 and peak["value"] <= 4
        assert limiter.running("shared", "map") == 0

    def test_limit_validation(self):
        with pytest.raises(ValueError, match="count >= 1"):
            Limit(0, 60.0)
        with pytest.raises(ValueError, match="in_flight"):
            Limit(1, 60.0, in_flight=0)


class TestClientKey:
    def test_without_a_proxy_the_header_is_ignored(self):
        assert client_key({"X-Forwarded-For": "1.2.3.4"}, "10.0.0.9") == "ip:10.0.0.9"

    def test_behind_a_proxy_the_entry_it_appended(self):
        # the client forged "6.6.6.6"; the proxy appended the address it saw, 1.2.3.4
        headers = {"x-forwarded-for": "6.6.6.6, 1.2.3.4"}
        assert client_key(headers, "10.0.0.9", proxy_hops=1) == "ip:1.2.3.4"
        assert client_key(headers, "10.0.0.9", proxy_hops=2) == "ip:6.6.6.6"
        assert client_key({}, "10.0.0.9", proxy_hops=1) == "ip:10.0.0.9"  # no header: the connection's address

    def test_session_only_without_any_address(self):
        assert client_key(None, None, "abc") == "session:abc"
        assert client_key(None, None) == "unknown"

    def test_request_objects(self):
        from starlette.datastructures import Headers

        class Request:
            headers = Headers(raw=[(b"x-forwarded-for", b"6.6.6.6"), (b"x-forwarded-for", b"1.2.3.4")])
            client = type("Address", (), {"host": "10.0.0.9"})()
            session_hash = "abc"

        assert request_key(Request(), proxy_hops=1) == "ip:1.2.3.4"  # two header lines read as one list
        assert request_key(Request(), proxy_hops=0) == "ip:10.0.0.9"
        assert request_key(None) == "unknown"

    def test_proxy_hops_setting(self, monkeypatch):
        monkeypatch.delenv("CNN_LSTM_PROXY_HOPS", raising=False)
        monkeypatch.delenv("SPACE_ID", raising=False)
        assert default_proxy_hops() == 0
        monkeypatch.setenv("SPACE_ID", "someone/cnn-lstm-cxr")  # set by Hugging Face Spaces
        assert default_proxy_hops() == 1
        monkeypatch.setenv("CNN_LSTM_PROXY_HOPS", "2")
        assert default_proxy_hops() == 2
        monkeypatch.setenv("CNN_LSTM_PROXY_HOPS", "-1")
        with pytest.raises(ValueError, match="must be >= 0"):
            default_proxy_hops()


def test_low_priority_worker():
    """Calls run in one thread whose niceness is raised, with the caller's context variables; errors come back."""
    import contextvars
    import os

    variable = contextvars.ContextVar("variable", default="unset")
    variable.set("caller's")
    worker = LowPriorityWorker(niceness=5)

    def where() -> tuple[int, int, str]:
        native_id = threading.get_native_id()
        return native_id, os.getpriority(os.PRIO_PROCESS, native_id), variable.get()

    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    native_id, niceness, value = worker.run(where)
    assert native_id != threading.get_native_id() and niceness == min(19, base + 5) and value == "caller's"
    assert worker.run(where)[0] == native_id  # one thread, reused
    with pytest.raises(ZeroDivisionError):
        worker.run(lambda: 1 / 0)
    assert LowPriorityWorker(niceness=0).run(where) == (threading.get_native_id(), base, "caller's")



def test_low_priority_worker_follows_the_callers_torch_threads():
    """torch's thread count is per thread: the worker takes the caller's at every call (the benchmark measures 1 and
    then 2 threads; the maps once ran at the count the worker started with)."""
    import torch

    before = torch.get_num_threads()
    worker = LowPriorityWorker(niceness=1)
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            assert worker.run(torch.get_num_threads) == threads
    finally:
        torch.set_num_threads(before)

@pytest.mark.slow
def test_one_client_cannot_fill_the_queue(free_port):
    """A real gradio queue with a slow function: a client's 4th waiting request is refused, another client's is not."""
    import gradio as gr
    from gradio_client import Client

    from cxr_app.limits import limit_waiting_per_client

    release = threading.Event()

    def slow(text: str) -> str:
        release.wait(30)
        return text

    with gr.Blocks() as demo:
        box, out = gr.Textbox(), gr.Textbox()
        box.submit(slow, box, out, api_name="slow", concurrency_limit=1)
    demo.queue(max_size=64)
    fair_use = FairUse(proxy_hops=1)
    limit_waiting_per_client(demo, lambda request, session: fair_use.key(request), max_waiting=2)
    port = free_port()
    demo.launch(server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        url = f"http://127.0.0.1:{port}"
        greedy = Client(url, verbose=False, headers={"X-Forwarded-For": "10.0.0.1"})
        other = Client(url, verbose=False, headers={"X-Forwarded-For": "10.0.0.2"})
        running = greedy.submit("0", api_name="/slow")  # runs (holds the only slot)
        deadline = time.monotonic() + 20
        while demo._queue.get_active_worker_count() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        waiting = [greedy.submit(str(index), api_name="/slow") for index in (1, 2)]
        time.sleep(1)
        refused = greedy.submit("3", api_name="/slow")
        with pytest.raises(Exception, match="Queue is full"):
            refused.result(timeout=20)
        others = other.submit("x", api_name="/slow")  # another client still gets in
        release.set()
        assert [job.result(timeout=30) for job in (running, *waiting, others)] == ["0", "1", "2", "x"]
    finally:
        release.set()
        demo.close()


def test_predictions_on_large_files_have_their_own_limit(tmp_path, make_checkpoint, example_xrays):
    """A file over LARGE_FILE_BYTES (its decoding alone can take seconds) counts against a stricter per-client
    limit and is decoded in the low-priority worker; a small file from the same client is not held back by it."""
    import gradio as gr
    import numpy as np
    from PIL import Image

    from cxr_app.endpoints import Endpoints
    from cxr_app.limits import LARGE_FILE, LARGE_FILE_BYTES, PREDICT, FairUse, Limit, default_limits
    from cxr_app.service import CxrDemo

    assert default_limits()[LARGE_FILE].in_flight == 1
    make_checkpoint(tmp_path / "checkpoint")
    app = CxrDemo.from_source(str(tmp_path / "checkpoint"))
    large = tmp_path / "large.png"
    noise = np.random.default_rng(0).integers(0, 256, (2600, 2600), dtype=np.uint16)
    Image.fromarray(noise * 257).save(large)  # 16-bit noise: ~13 MB of PNG
    assert large.stat().st_size > LARGE_FILE_BYTES
    fair_use = FairUse(limits={PREDICT: Limit(60, 60.0), LARGE_FILE: Limit(1, 60.0, in_flight=1)}, proxy_hops=0)
    endpoints = Endpoints(app, fair_use, fair_use.limiter(), tmp_path)
    request = gr.Request(headers={}, client=None, session_hash="one-client")
    worker_calls = []
    original = app.slow_maps.run
    app.slow_maps.run = lambda function, *args: worker_calls.append(function.__name__) or original(function, *args)
    scores, _ = endpoints.predict(str(large), request)
    assert sum(scores.values()) == pytest.approx(1.0, abs=1e-5) and worker_calls == ["predict"]
    with pytest.raises(gr.Error, match="at most 1 per minute per user"):
        endpoints.predict(str(large), request)
    small, _ = endpoints.predict(str(example_xrays["normal"][0]), request)  # a normal file still goes through
    assert sum(small.values()) == pytest.approx(1.0, abs=1e-5) and worker_calls == ["predict"]
