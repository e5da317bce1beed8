"""A disk budget for uploads: Gradio's upload route takes any number of files from anyone, and they stay on disk
until the retention sweep (cxr_app/retention.py), so one client uploading in a loop could fill a Space's disk.

`UploadBudgetMiddleware` (plain ASGI, in front of Gradio's `/upload` route) refuses, with a sentence and before a
byte is written:
- a client's upload once its uploads in the last `window_s` seconds would pass `per_client_bytes` (the client as
  the fair-use limits name it: its address, or behind trusted proxies the X-Forwarded-For entry; limits.py);
- any upload once the upload cache would pass `cache_cap_bytes` (its size measured at most every few seconds, plus
  what was admitted since).
A body longer than it declared is cut off when it passes the client's budget. Settings: $CNN_LSTM_UPLOAD_BUDGET =
"MEGABYTES,SECONDS" per client (default "512,900": the retention window), $CNN_LSTM_UPLOAD_CACHE_MB (default 2048).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .limits import client_key

ENV_BUDGET, ENV_CACHE_CAP = "CNN_LSTM_UPLOAD_BUDGET", "CNN_LSTM_UPLOAD_CACHE_MB"
MB = 2**20


@dataclass(frozen=True)
class UploadBudget:
    per_client_bytes: int = 512 * MB
    window_s: float = 900.0
    cache_cap_bytes: int = 2048 * MB

    @classmethod
    def from_env(cls) -> UploadBudget:
        budget, cap = os.environ.get(ENV_BUDGET), os.environ.get(ENV_CACHE_CAP)
        try:
            megabytes, window = (float(part) for part in budget.split(",")) if budget else (512.0, 900.0)
            cap_mb = float(cap) if cap else 2048.0
        except ValueError:
            raise ValueError(f'{ENV_BUDGET} must be "MEGABYTES,SECONDS" and {ENV_CACHE_CAP} a number') from None
        if min(megabytes, window, cap_mb) <= 0:
            raise ValueError(f"{ENV_BUDGET} and {ENV_CACHE_CAP} must be positive")
        return cls(int(megabytes * MB), window, int(cap_mb * MB))


def folder_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):  # deleted meanwhile by the retention sweep
                total += os.lstat(os.path.join(root, name)).st_size
    return total


class UploadLedger:
    """Bytes admitted per client over the window, and the cache's size; thread-safe."""

    def __init__(
        self,
        budget: UploadBudget,
        cache_dir: Callable[[], Path],
        clock: Callable[[], float] = time.monotonic,
        measure_every_s: float = 5.0,
    ) -> None:
        self.budget, self.cache_dir, self.clock, self.measure_every_s = budget, cache_dir, clock, measure_every_s
        self._lock = threading.Lock()
        self._clients: dict[str, deque[tuple[float, int]]] = {}
        self._cache_bytes, self._measured_at = 0, -float("inf")

    def _used(self, client: str, now: float) -> int:
        records = self._clients.setdefault(client, deque())
        while records and now - records[0][0] > self.budget.window_s:
            records.popleft()
        return sum(size for _, size in records)

    def admit(self, client: str, size: int) -> str | None:
        """Record `size` bytes for `client` and return None, or return why the upload is refused."""
        with self._lock:
            now = self.clock()
            used = self._used(client, now)
            if used + size > self.budget.per_client_bytes:
                minutes = self.budget.window_s / 60
                return (f"Upload refused: you have uploaded {used / MB:.0f} MB in the last {minutes:g} minutes, and "
                        f"each user may upload at most {self.budget.per_client_bytes / MB:.0f} MB in that time. "
                        "Try again later.")  # fmt: skip
            if now - self._measured_at > self.measure_every_s:
                self._cache_bytes, self._measured_at = folder_bytes(self.cache_dir()), now
            if self._cache_bytes + size > self.budget.cache_cap_bytes:
                return ("Upload refused: the server's space for uploads is full right now "
                        f"({self.budget.cache_cap_bytes / MB:.0f} MB); uploads are deleted within minutes, so try "
                        "again shortly.")  # fmt: skip
            self._clients[client].append((now, size))
            self._cache_bytes += size
            return None

    def charge(self, client: str, size: int) -> bool:
        """Bytes received beyond what was declared; False once the client's budget is passed."""
        with self._lock:
            used = self._used(client, self.clock())
            self._clients[client].append((self.clock(), size))
            self._cache_bytes += size
            return used + size <= self.budget.per_client_bytes


class UploadBudgetMiddleware:
    """ASGI middleware for Gradio's upload route (any path ending in /upload, POST)."""

    def __init__(self, app: Any, ledger: UploadLedger, proxy_hops: int = 0) -> None:
        self.app, self.ledger, self.proxy_hops = app, ledger, proxy_hops

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        is_upload = scope.get("method") == "POST" and scope.get("path", "").endswith("/upload")
        if scope.get("type") != "http" or not is_upload:
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope.get("headers", [])}
        host = (scope.get("client") or (None,))[0]
        client = client_key(headers, host, None, self.proxy_hops)
        declared = int(headers.get("content-length") or 0) if (headers.get("content-length") or "").isdigit() else 0
        refusal = self.ledger.admit(client, declared)
        if refusal is not None:
            await _refuse(send, refusal)
            return
        received = 0

        async def counted() -> dict:
            nonlocal received, declared
            message = await receive()
            if message.get("type") == "http.request":
                received += len(message.get("body", b""))
                if received > declared and not self.ledger.charge(client, received - declared):
                    return {"type": "http.disconnect"}  # past the budget: the upload ends here, unparsed
                declared = max(declared, received)
            return message

        await self.app(scope, counted, send)


async def _refuse(send: Callable, sentence: str) -> None:
    body = sentence.encode()
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})


__all__ = ["ENV_BUDGET", "ENV_CACHE_CAP", "UploadBudget", "UploadBudgetMiddleware", "UploadLedger", "folder_bytes"]
