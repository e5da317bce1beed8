"""Every use of Gradio's private parts, behind one door (gradio 6.x). Each function checks that the part it needs is
there and raises `GradioIncompatible` naming it when an upgrade renamed it, so the app fails at start-up instead of
silently losing a protection; tests/app/test_gradio_compat.py checks each against the installed Gradio.

Where Gradio has a public way it is used elsewhere instead: `gr.Request` (the client), `delete_cache` (retention),
`concurrency_limit` / `concurrency_id` (queues). What has none:
- the queue's admission (`Blocks._queue.push`, `event_queue_per_concurrency_id`): the per-client cap of waiting
  requests (cxr_app/limits.py);
- the files a block cached while the page was built (`Block.temp_files`) and the set that `delete_cache` spares
  (`Block.keep_in_cache`): the example X-rays must survive the sweeps (cxr_app/retention.py);
- the cache folder (`Blocks.GRADIO_CACHE`): the sweep of abandoned partial uploads.
The app's own state travels beside the Blocks in `attach`/`attached`, never as attributes set on them.
"""

from __future__ import annotations

import weakref
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class GradioIncompatible(RuntimeError):
    """The installed Gradio lacks a private part the app relies on; the message names it."""


def _require(owner: Any, name: str, what: str) -> Any:
    if not hasattr(owner, name):
        raise GradioIncompatible(
            f"gradio {_version()} has no {type(owner).__name__}.{name} ({what}); cxr_app/gradio_compat.py needs "
            "updating for this Gradio"
        )
    return getattr(owner, name)


def _version() -> str:
    import gradio

    return getattr(gradio, "__version__", "?")


# -- the queue -------------------------------------------------------------------------------------------------------
def queued_events(demo: Any) -> Iterator[Any]:
    """The events waiting in the Blocks' queue (not yet running), across its concurrency groups."""
    queue = _require(demo, "_queue", "the event queue")
    groups = _require(queue, "event_queue_per_concurrency_id", "the waiting events per concurrency group")
    for group in list(groups.values()):
        yield from list(_require(group, "queue", "a concurrency group's waiting events"))


def event_client(event: Any) -> tuple[Any, str | None]:
    """(request, session hash) of a queued event."""
    return _require(event, "request", "a queued event's request"), getattr(event, "session_hash", None)


def wrap_admission(demo: Any, make: Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]) -> None:
    """Replace the queue's `push` (the admission of every queued request) with `make(original_push)`."""
    queue = _require(demo, "_queue", "the event queue")
    _require(queue, "event_queue_per_concurrency_id", "the waiting events per concurrency group")
    queue.push = make(_require(queue, "push", "the admission of a request"))


# -- the cache -------------------------------------------------------------------------------------------------------
def keep_cached_files(demo: Any) -> int:
    """Mark every file that the Blocks' components cached while being built as kept by `delete_cache`; returns how
    many. A component that cached files but has no `keep_in_cache` set is an incompatible Gradio, said loudly."""
    kept = 0
    for block in _require(demo, "blocks", "the page's components").values():
        files = getattr(block, "temp_files", None)
        if not files:
            continue
        keep = _require(block, "keep_in_cache", "the files delete_cache spares")
        keep.update(files)
        kept += len(files)
    return kept


def cache_folder(demo: Any) -> Path:
    """Where this Blocks caches uploads and outputs."""
    return Path(_require(demo, "GRADIO_CACHE", "the upload cache folder"))


# -- the app's state beside the Blocks --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Attached:
    """What `build_demo` made around the Blocks: the service, the fair-use settings, the limiter, the CSV folder."""

    app: Any
    fair_use: Any
    limiter: Any
    batch_dir: Path


_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def attach(demo: Any, state: Attached) -> None:
    _ATTACHED[demo] = state


def attached(demo: Any) -> Attached:
    """The state `build_demo` attached to these Blocks (for `launch`, tests and scripts)."""
    try:
        return _ATTACHED[demo]
    except KeyError:
        raise ValueError("these Blocks were not made by cxr_app.demo.build_demo") from None


__all__ = ["Attached", "GradioIncompatible", "attach", "attached", "cache_folder", "event_client",
           "keep_cached_files", "queued_events", "wrap_admission"]  # fmt: skip
