"""Fair use of the public app: who a client is, how often it may run each kind of request, and how many of its
requests may wait in the queue.

Why: one Integrated Gradients or Occlusion map costs 5-15 s of CPU, so a single script looping on `/explain` could
hold the server for everyone. Gradio gives a queue per concurrency group (predictions never wait behind saliency
maps) and a global `max_size`; this module adds what is per client:

- `RateLimiter`: per client and kind of request, at most `count` starts in any `window_s` seconds and at most
  `in_flight` at once. Checked when a request starts running; a refusal is cheap and says when to retry.
- `limit_waiting_per_client`: at most `max_waiting` queued (not yet running) requests per client, so that one client
  cannot fill the global queue and lock others out with "queue full".
- `LowPriorityWorker`: the slow maps run in one thread at a lower CPU priority, so that on a busy CPU the
  predictions (and Grad-CAM) go first, while on an idle one the maps still get every core.

Who a client is (`client_key`): its IP address. A session hash is chosen by the client and costs nothing to change,
so it cannot carry a limit. Behind a reverse proxy (Hugging Face Spaces) every request comes from the proxy's address;
the client's is the entry that the *trusted* proxy appended to `X-Forwarded-For`, counted from the right
(`proxy_hops`). Entries further left are written by the client and can be forged, so they are never used. Without a
proxy (`proxy_hops=0`) the header is ignored altogether. People behind one NAT share a budget: the limits are sized so
that a few people exploring images rarely meet them.
"""

from __future__ import annotations

import contextvars
import logging
import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from .gradio_compat import event_client, queued_events, wrap_admission

ENV_PROXY_HOPS = "CNN_LSTM_PROXY_HOPS"
ENV_RATE_LIMITS = "CNN_LSTM_RATE_LIMITS"  # "off" disables the per-client limits (a private deployment, a benchmark)
ENV_SLOW_MAP_NICE = "CNN_LSTM_SLOW_MAP_NICE"  # niceness added to the slow-map thread; 0 runs them in the caller
PREDICT, GRAD_CAM_MAP, SLOW_MAP, BATCH = "predict", "grad-cam", "slow-map", "batch"
LARGE_FILE = "large-file"  # a prediction on an upload over LARGE_FILE_BYTES: decoding it costs ~0.5-2 s of CPU
LARGE_FILE_BYTES = 12 * 2**20  # a CR/DX DICOM or a 16-bit PNG of a detector is ~5-18 MB; a 49 MP noise JPEG ~33 MB
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limit:
    """At most `count` starts in any `window_s` seconds, and at most `in_flight` running at once (None: no cap)."""

    count: int
    window_s: float
    in_flight: int | None = None
    what: str = "requests"  # for the message: "... at most 3 {what} per 2 minutes"

    def __post_init__(self) -> None:
        if self.count < 1 or self.window_s <= 0 or (self.in_flight is not None and self.in_flight < 1):
            raise ValueError(f"a limit needs count >= 1, window_s > 0 and in_flight >= 1 or None, got {self}")


class RateLimited(Exception):
    """A request over its client's limit; `str()` is the sentence for the user, `retry_after` in seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _duration(seconds: float) -> str:
    seconds = max(1, math.ceil(seconds))
    if seconds < 120:
        return f"{seconds} s"
    return f"{math.ceil(seconds / 60)} minutes"


def _window(seconds: float) -> str:
    return "minute" if seconds == 60 else _duration(seconds)


class RateLimiter:
    """Sliding-window rate and in-flight limits per (client, kind); thread-safe, with an injectable clock.

    `with limiter.slot(client, kind): ...` counts a start and holds an in-flight place until the block ends; it raises
    `RateLimited` (nothing counted) when the client is over either limit. Kinds without a limit pass freely.
    """

    def __init__(self, limits: Mapping[str, Limit], clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = dict(limits)
        self.clock = clock
        self._lock = threading.Lock()
        self._starts: dict[tuple[str, str], deque[float]] = {}
        self._running: dict[tuple[str, str], int] = {}
        self._calls = 0

    def acquire(self, client: str, kind: str) -> None:
        """Count one start of `kind` for `client`, or raise `RateLimited` saying when to retry."""
        limit = self.limits.get(kind)
        if limit is None:
            return
        key = (client, kind)
        with self._lock:
            now = self.clock()
            self._calls += 1
            if self._calls % 1024 == 0:
                self._forget_idle(now)
            starts = self._starts.setdefault(key, deque())
            while starts and starts[0] <= now - limit.window_s:
                starts.popleft()
            running = self._running.get(key, 0)
            if limit.in_flight is not None and running >= limit.in_flight:
                raise RateLimited(
                    f"You already have {running} {limit.what} running; at most {limit.in_flight} at a time per user. "
                    "Try again when it has finished.",
                    retry_after=0.0,
                )
            if len(starts) >= limit.count:
                wait = starts[0] + limit.window_s - now
                raise RateLimited(
                    f"Too many {limit.what}: at most {limit.count} per {_window(limit.window_s)} per user. "
                    f"Try again in {_duration(wait)}.",
                    retry_after=wait,
                )
            starts.append(now)
            self._running[key] = running + 1

    def release(self, client: str, kind: str) -> None:
        """End one in-flight request started by `acquire`."""
        if kind not in self.limits:
            return
        key = (client, kind)
        with self._lock:
            left = self._running.get(key, 0) - 1
            if left > 0:
                self._running[key] = left
            else:
                self._running.pop(key, None)

    @contextmanager
    def slot(self, client: str, kind: str) -> Iterator[None]:
        self.acquire(client, kind)
        try:
            yield
        finally:
            self.release(client, kind)

    def running(self, client: str, kind: str) -> int:
        with self._lock:
            return self._running.get((client, kind), 0)

    def _forget_idle(self, now: float) -> None:
        """Drop clients with nothing in their windows and nothing running: memory stays bounded by recent clients."""
        for key in list(self._starts):
            limit = self.limits[key[1]]
            starts = self._starts[key]
            if (not starts or starts[-1] <= now - limit.window_s) and key not in self._running:
                del self._starts[key]


def _header(headers: Any, name: str) -> str | None:
    """All values of one header joined with "," (proxies may add a second line); case-insensitive."""
    if headers is None:
        return None
    if hasattr(headers, "getlist"):
        values = headers.getlist(name)
        return ",".join(values) if values else None
    for key, value in dict(headers).items():
        if key.lower() == name:
            return value
    return None


def client_key(headers: Any, host: str | None, session_hash: str | None = None, proxy_hops: int = 0) -> str:
    """The client's IP address: `host` without a proxy; behind `proxy_hops` trusted proxies, the X-Forwarded-For
    entry the outermost of them appended (the `proxy_hops`-th from the right). The session hash only when there
    is no address at all (a request object without a client, as in direct calls)."""
    if proxy_hops > 0:
        forwarded = [entry.strip() for entry in (_header(headers, "x-forwarded-for") or "").split(",")]
        forwarded = [entry for entry in forwarded if entry]
        if len(forwarded) >= proxy_hops:
            return f"ip:{forwarded[-proxy_hops]}"
    if host:
        return f"ip:{host}"
    return f"session:{session_hash}" if session_hash else "unknown"


def request_key(request: Any, proxy_hops: int = 0, session_hash: str | None = None) -> str:
    """`client_key` of a `gr.Request` or a Starlette request (None: one shared "unknown" client)."""
    if request is None:
        return client_key(None, None, session_hash, proxy_hops)
    client = getattr(request, "client", None)
    host = getattr(client, "host", None) if client is not None else None
    session_hash = session_hash or getattr(request, "session_hash", None)
    return client_key(getattr(request, "headers", None), host, session_hash, proxy_hops)


def default_proxy_hops() -> int:
    """$CNN_LSTM_PROXY_HOPS, else 1 on a Hugging Face Space (it sets SPACE_ID; its proxy appends the client's
    address), else 0."""
    value = os.environ.get(ENV_PROXY_HOPS)
    if value not in (None, ""):
        hops = int(value)
        if hops < 0:
            raise ValueError(f"{ENV_PROXY_HOPS} must be >= 0, got {hops}")
        return hops
    return 1 if os.environ.get("SPACE_ID") else 0


def default_limits() -> dict[str, Limit]:
    """Per user: 60 predictions a minute (a person needs a few), 30 Grad-CAM maps a minute (~0.5 s each), and
    3 Integrated Gradients / Occlusion maps per 2 minutes, one at a time (5-15 s of CPU each: one user then holds
    the saliency worker at most ~25% of the time), and 3 batches (up to 50 images, ~5-15 s) per 5 minutes, one at a
    time (a batch runs in the same low-priority worker as the slow maps). Predictions on files over 12 MB (their
    decoding alone can take seconds): 6 a minute, one at a time."""
    return {
        PREDICT: Limit(60, 60.0, what="predictions"),
        LARGE_FILE: Limit(6, 60.0, in_flight=1, what="predictions on files over 12 MB"),
        GRAD_CAM_MAP: Limit(30, 60.0, what="Grad-CAM maps"),
        SLOW_MAP: Limit(3, 120.0, in_flight=1, what="Integrated Gradients or Occlusion maps"),
        BATCH: Limit(3, 300.0, in_flight=1, what="batches"),
    }


@dataclass
class FairUse:
    """The app's per-client limits: rates per kind, waiting requests per client, and how to find the client."""

    limits: dict[str, Limit] = field(default_factory=default_limits)
    max_waiting: int = 3  # queued, not yet running, per client (the global queue holds 64)
    proxy_hops: int = field(default_factory=default_proxy_hops)
    enabled: bool = True

    @classmethod
    def from_env(cls) -> FairUse:
        return cls(enabled=os.environ.get(ENV_RATE_LIMITS, "").lower() not in ("off", "0", "false", "no"))

    def limiter(self, clock: Callable[[], float] = time.monotonic) -> RateLimiter:
        return RateLimiter(self.limits if self.enabled else {}, clock)

    def key(self, request: Any) -> str:
        return request_key(request, self.proxy_hops)


def limit_waiting_per_client(demo: Any, key_of: Callable[[Any, str | None], str], max_waiting: int) -> None:
    """Refuse a new request (HTTP 503, as "queue full") from a client that already has `max_waiting` requests
    queued and not yet running; `key_of(request, session_hash)` names the client.

    Gradio has no public hook at admission, so this wraps the queue's admission through cxr_app/gradio_compat.py
    (the check counts the events in the queue's own lists, so there is no count to keep in step or leak).
    """

    def make(push: Callable[..., Any]) -> Callable[..., Any]:
        async def limited_push(body: Any, request: Any, username: str | None) -> Any:
            client = key_of(request, getattr(body, "session_hash", None))
            waiting = sum(1 for event in queued_events(demo) if key_of(*event_client(event)) == client)
            if waiting >= max_waiting:
                return (
                    False,
                    f"You have {waiting} requests waiting already (at most {max_waiting} per user); "
                    "try again when they have finished.",
                    "queue_full",
                )
            return await push(body=body, request=request, username=username)

        return limited_push

    wrap_admission(demo, make)


class LowPriorityWorker:
    """Runs calls in one dedicated thread whose niceness is raised by `niceness` (Linux: per thread) before it
    touches torch, so the OpenMP threads it starts inherit it. Why: a prediction (~0.15 s) beside an Integrated
    Gradients map (~10 s, both CPU cores) otherwise waits for the cores like any other thread; at nice +10 the
    scheduler gives the map ~10% of a contested core and all of an idle one. Calls keep the caller's context
    variables (gradio's progress bar) and torch thread count. `niceness=0`: calls run in the caller's thread, as
    without this class."""

    def __init__(self, niceness: int | None = None) -> None:
        if niceness is None:
            niceness = int(os.environ.get(ENV_SLOW_MAP_NICE, "10") or 0)
        self.niceness = max(0, niceness)
        self.native_id: int | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _start(self) -> None:
        self.native_id = threading.get_native_id()
        try:
            current = os.getpriority(os.PRIO_PROCESS, self.native_id)
            os.setpriority(os.PRIO_PROCESS, self.native_id, current + self.niceness)
        except (AttributeError, OSError) as error:  # not Linux, or not allowed: run at normal priority
            logger.warning("slow saliency maps run at normal priority: %s", error)

    def run(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.niceness == 0:
            return function(*args, **kwargs)
        return self.submit(function, *args, **kwargs).result()

    def submit(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        """Queue the call in the worker without waiting (background work such as choosing the fast path); with
        `niceness=0` it still runs in the worker thread, at normal priority."""
        with self._lock:
            if self._executor is None:
                initializer = self._start if self.niceness else None
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="slow-saliency", initializer=initializer)
        context = contextvars.copy_context()
        threads = _torch_threads()
        return self._executor.submit(context.run, _with_threads, threads, function, *args, **kwargs)


def _torch_threads() -> int | None:
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else None


def _with_threads(threads: int | None, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run with the caller's torch thread count: a thread keeps the count it started with (torch's setting is per
    thread), so without this the worker would ignore a later `torch.set_num_threads` in the caller."""
    if threads is not None and _torch_threads() != threads:
        sys.modules["torch"].set_num_threads(threads)
    return function(*args, **kwargs)


__all__ = ["BATCH", "FairUse", "GRAD_CAM_MAP", "LARGE_FILE", "LARGE_FILE_BYTES", "Limit", "LowPriorityWorker",
           "PREDICT", "RateLimited", "RateLimiter", "SLOW_MAP", "client_key", "default_limits", "default_proxy_hops",
           "limit_waiting_per_client", "request_key"]
