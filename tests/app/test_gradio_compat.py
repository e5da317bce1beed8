"""Every private part of Gradio the app uses (cxr_app/gradio_compat.py) exists in the installed Gradio and does
what the app relies on; and a missing one fails loudly, naming itself, instead of silently dropping a protection."""

from __future__ import annotations

import types
from pathlib import Path

import gradio as gr
import pytest

from cxr_app import gradio_compat
from cxr_app.gradio_compat import GradioIncompatible

EXAMPLE = sorted((Path(__file__).resolve().parents[2] / "examples").glob("normal-*.jpg"))[0]


def build() -> gr.Blocks:
    with gr.Blocks() as demo:
        file = gr.File(type="filepath")
        gr.Examples([[str(EXAMPLE)]], inputs=[file])
        gr.Button().click(lambda path: path, [file], [file])
    return demo


def test_build_time_files_are_kept():
    demo = build()
    kept = gradio_compat.keep_cached_files(demo)
    assert kept >= 1  # the example's cached copy
    cached = [(block, block.temp_files) for block in demo.blocks.values() if getattr(block, "temp_files", None)]
    assert cached and all(files <= block.keep_in_cache for block, files in cached)


def test_queue_admission_and_events():
    demo = build().queue()
    assert list(gradio_compat.queued_events(demo)) == []  # nothing waits yet; the lists are there
    seen = []

    def make(push):
        seen.append(push)
        return push

    gradio_compat.wrap_admission(demo, make)
    assert seen and callable(seen[0]) and demo._queue.push is seen[0]
    assert isinstance(gradio_compat.cache_folder(demo), Path)


def test_state_travels_beside_the_blocks():
    demo = build()
    state = gradio_compat.Attached(app="service", fair_use=None, limiter=None, batch_dir=Path("."))
    gradio_compat.attach(demo, state)
    assert gradio_compat.attached(demo) is state
    with pytest.raises(ValueError, match="not made by cxr_app.demo.build_demo"):
        gradio_compat.attached(build())


@pytest.mark.parametrize(
    ("call", "missing"),
    [
        (lambda fake: list(gradio_compat.queued_events(fake)), "_queue"),
        (lambda fake: gradio_compat.wrap_admission(fake, lambda push: push), "_queue"),
        (lambda fake: gradio_compat.cache_folder(fake), "GRADIO_CACHE"),
        (lambda fake: gradio_compat.keep_cached_files(fake), "blocks"),
    ],
)
def test_a_renamed_part_fails_loudly(call, missing):
    with pytest.raises(GradioIncompatible, match=f"has no SimpleNamespace.{missing}"):
        call(types.SimpleNamespace())


def test_a_block_with_files_but_no_keep_set_fails_loudly():
    block = types.SimpleNamespace(temp_files={"/tmp/x.png"})
    with pytest.raises(GradioIncompatible, match="keep_in_cache"):
        gradio_compat.keep_cached_files(types.SimpleNamespace(blocks={1: block}))
    queue = types.SimpleNamespace(event_queue_per_concurrency_id={"g": types.SimpleNamespace()})
    with pytest.raises(GradioIncompatible, match="queue"):
        list(gradio_compat.queued_events(types.SimpleNamespace(_queue=queue)))
