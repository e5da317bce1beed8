"""The Gradio page: an "Analyse" tab (one X-ray: probabilities, predictive values at a chosen prevalence, saliency),
a "Batch" tab and the checkpoint's "Model report", around a `CxrDemo` (cxr_app/service.py) whose functions the
endpoints (cxr_app/endpoints.py) serve; `launch` starts it with the app's settings.

The parts: cxr_app/loading.py (which model, and loading it), service.py (what the app computes), endpoints.py
(fair use and plain-sentence errors), this file (the page). For a public deployment, `build_demo` adds per-client
limits (cxr_app/limits.py) and deletes uploads on a schedule (cxr_app/retention.py); the page says both beside the
upload box.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr
from starlette.middleware import Middleware

from . import log_privacy
from .batch import MAX_BATCH_FILES
from .endpoints import Endpoints, upload_note
from .gradio_compat import Attached, attach, attached, cache_folder
from .limits import FairUse, limit_waiting_per_client
from .loading import ModelUnavailable, app_home, default_checkpoint, load_classifier, resolve_source
from .results import columns
from .retention import delete_cache_setting, protect_build_time_files
from .saliency import DEFAULT_OPACITY, GRAD_CAM, METHODS
from .service import PREDICTED, CxrDemo
from .upload_budget import UploadBudget, UploadBudgetMiddleware, UploadLedger
from .uploads import ACCEPTED_SUFFIXES

DISCLAIMER = (
    "**Research use only — not for diagnosis.** This demo and its model are not medical devices. The model was "
    "trained on a small public collection whose classes differ by source and patient age, so it can be right for the "
    "wrong reasons. Never use its output for clinical decisions."
)


def _analyse_tab(app: CxrDemo, endpoints: Endpoints, labels: list[str], upload_text: str) -> None:
    from .prevalence import DEFAULT_PREVALENCE
    from .saliency import colour_bar_html

    with gr.Row():
        with gr.Column(scale=1):
            file = gr.File(
                label="Frontal chest X-ray: PNG, JPEG, BMP, TIFF, WebP or DICOM",
                file_types=list(ACCEPTED_SUFFIXES),
                type="filepath",
                elem_id="xray-file",
            )
            gr.Markdown(upload_text, elem_id="upload-note")
            analyse = gr.Button("Analyse", variant="primary")
            examples = sorted(p for p in app.examples_dir.glob("*") if p.suffix.lower() in ACCEPTED_SUFFIXES)
            if examples:
                gr.Examples(
                    [[str(path)] for path in examples],
                    inputs=[file],
                    label="Examples (public X-rays; credits in examples/CREDITS.md)",
                )
        with gr.Column(scale=1):
            label = gr.Label(num_top_classes=len(labels), label="Probabilities")
            summary = gr.Markdown(label="Summary", elem_id="summary")
            cnn = _companion_controls(app, labels)
            prevalence = gr.Slider(
                0.5,
                50,
                value=100 * DEFAULT_PREVALENCE,
                step=0.5,
                label="Prevalence of the predicted class (%)",
                info="How common this class is among the films where you would use the model (default 5%).",
                elem_id="prevalence",
            )
            reading_text = gr.Markdown(elem_id="prevalence-reading")
    with gr.Row():
        method = gr.Radio(
            list(METHODS),
            value=GRAD_CAM,
            label="Saliency method",
            info="Grad-CAM: fast, coarse. Integrated Gradients and Occlusion: finer, ~10-20 s.",
        )
        target = gr.Dropdown([PREDICTED, *labels], value=PREDICTED, label="Explain the score of")
        opacity = gr.Slider(0.0, 1.0, value=DEFAULT_OPACITY, step=0.05, label="Overlay opacity", elem_id="opacity")
    with gr.Row():
        original = gr.Image(format="png", type="pil", label="Your image", interactive=False, elem_id="input-image")
        with gr.Column():
            overlay = gr.Image(
                format="png", type="pil", label="Saliency overlay", interactive=False, elem_id="overlay"
            )
            gr.HTML(colour_bar_html(), elem_id="colour-bar")
    note = gr.Markdown(label="How to read the map", elem_id="explain-note")
    view = gr.State(None)

    # Separate queues: a prediction never waits behind a saliency map. Three predictions at a time (~0.15 s each;
    # one on a file over 12 MB per client, decoded in the low-priority worker).
    # Maps: three at a time, but the slow ones (5-20 s) run one by one in the low-priority worker, so a Grad-CAM
    # map (~0.5 s) waits behind them only when three clients ask for slow maps at once (each may have one).
    fast = {"concurrency_limit": 3, "concurrency_id": "predict"}
    maps = {"concurrency_limit": 3, "concurrency_id": "explain"}
    private = {"api_visibility": "private"}
    map_inputs, map_outputs = [file, method, target, opacity], [overlay, note, view]
    analyse.click(endpoints.predict, [file], [label, summary], api_name="predict", **fast).success(
        endpoints.explain, map_inputs, map_outputs, api_name="explain", **maps
    )
    upload = file.change(endpoints.predict_ui, [file], [label, summary, original], **private, **fast)
    upload.success(endpoints.explain_ui, map_inputs, map_outputs, **private, **maps)
    if cnn is not None:  # the competitive CNN: one extra forward pass, only while the box is ticked
        show_cnn, cnn_label, cnn_button = cnn
        for event in (show_cnn.change, upload.success, analyse.click):
            event(endpoints.cnn_ui, [file, show_cnn], [cnn_label], **private, **fast)
        cnn_button.click(endpoints.predict_cnn, [file], [cnn_label], api_name="predict_cnn", **fast)
    gr.on(
        [label.change, prevalence.change], endpoints.reading_ui, [label, prevalence], [reading_text], **private, **fast
    )
    gr.on([method.change, target.change], endpoints.explain_ui, map_inputs, map_outputs, **private, **maps)
    opacity.change(
        endpoints.redraw_ui, [file, view, opacity], [overlay], trigger_mode="always_last", **private, **fast
    )


def _companion_controls(app: CxrDemo, labels: list[str]) -> tuple[Any, Any, Any] | None:
    """A tick box that shows the paper's competitive CNN beside the CNN-LSTM (when one is installed), its
    probabilities, and a hidden button that gives the API its `/predict_cnn` endpoint."""
    if app.companion_source is None:
        return None
    show = gr.Checkbox(False, label="Also show the paper's competitive CNN (same trunk, dense head)",
                       info="One extra forward pass. Its comparison with the CNN-LSTM is on the Model report tab.",
                       elem_id="show-cnn")  # fmt: skip
    probabilities = gr.Label(num_top_classes=len(labels), label="Competitive CNN: probabilities", visible=False,
                             elem_id="cnn-probabilities")  # fmt: skip
    return show, probabilities, gr.Button(visible=False)


def _batch_tab(endpoints: Endpoints, labels: list[str]) -> None:
    gr.Markdown(
        f"Classify up to {MAX_BATCH_FILES} X-rays at once: choose several files, or a zip of PNG, JPEG, BMP, TIFF, "
        "WebP or DICOM "
        "files (each file up to the single-upload limit; zips are unpacked on the server into a private folder "
        "that is deleted as soon as the batch is done). A file that cannot be read gets its reason in its row; "
        "the others still run. Also an API endpoint: `/predict_batch`."
    )
    # No file_types: gradio would refuse the whole batch for one file of another type; here it gets its own row.
    files = gr.File(
        label="X-rays, DICOM files or a zip", file_count="multiple", type="filepath", elem_id="batch-files"
    )
    run = gr.Button("Classify all", variant="primary", elem_id="batch-run")
    table = gr.Dataframe(headers=columns(labels), interactive=False, wrap=True, label="Results", elem_id="batch-table")
    csv_file = gr.File(label="Results as CSV", interactive=False, elem_id="batch-csv")
    run.click(
        endpoints.predict_batch,
        [files],
        [table, csv_file],
        api_name="predict_batch",
        concurrency_limit=1,
        concurrency_id="batch",
    )


def _report_tab(app: CxrDemo) -> None:
    from . import report_view

    report = app.report
    if report is None:
        gr.Markdown(
            report_view.no_report_markdown(app.classifier.source if app.classifier else "none"),
            elem_id="report-missing",
        )
        return
    gr.Markdown(report_view.summary_markdown(report), elem_id="report-summary")
    figures = report.figures()
    with gr.Row():
        gr.Markdown(report_view.confusion_markdown(report))
        for path, caption in figures[:2]:
            gr.Image(str(path), label=caption, show_label=False, interactive=False, buttons=["fullscreen"])
    gr.Markdown(report_view.calibration_markdown(report))
    for path, caption in figures[2:]:
        gr.Image(str(path), label=caption, show_label=False, interactive=False, buttons=["fullscreen"], height=420)
    gr.Markdown(report_view.sources_markdown(report), elem_id="report-sources")
    gr.Markdown(report_view.audit_markdown(report), elem_id="report-audit")
    comparison = report_view.comparison_view(report)
    if comparison is not None:
        gr.Markdown(comparison[0], elem_id="report-comparison")
        if comparison[1] is not None:
            caption = "Confusion matrices of both networks (the paper's Fig. 6 layout)"
            gr.Image(str(comparison[1]), label=caption, show_label=False, interactive=False, buttons=["fullscreen"],
                     elem_id="comparison-figure")  # fmt: skip


def build_demo(
    model: str | None = None,
    revision: str | None = None,
    app: CxrDemo | None = None,
    home: str | Path | None = None,
    delete_cache: tuple[int, int] | None = None,
    fair_use: FairUse | None = None,
):
    """The Blocks UI around a `CxrDemo` (loaded from `model`/env/the default under `home` unless one is given):
    an "Analyse" tab (one X-ray: probabilities, predictive values at a chosen prevalence, saliency), a "Batch" tab
    and the checkpoint's "Model report".

    `delete_cache`: (frequency, age) in seconds, default $CNN_LSTM_DELETE_CACHE or every 5 min, older than 10 min
    (cxr_app/retention.py). `fair_use`: the per-client limits, default `FairUse.from_env()` (cxr_app/limits.py).
    """
    app = app or CxrDemo.from_source(model, revision, home)
    labels = app.classifier.labels if app.classifier else ["COVID-19", "Normal", "Pneumonia"]
    delete_cache = delete_cache_setting(delete_cache)
    fair_use = fair_use or FairUse.from_env()
    limiter = fair_use.limiter()
    batch_dir = Path(tempfile.mkdtemp(prefix="cxr-batch-results-"))  # the batches' CSVs before gradio copies them
    atexit.register(shutil.rmtree, batch_dir, ignore_errors=True)
    endpoints = Endpoints(app, fair_use, limiter, batch_dir)

    with gr.Blocks(title="CNN-LSTM chest X-ray classifier (research demo)", delete_cache=delete_cache) as demo:
        gr.Markdown("# CNN-LSTM chest X-ray classifier: COVID-19 / Normal / Pneumonia")
        gr.Markdown(f"> ⚠️ {DISCLAIMER}", elem_id="disclaimer")
        gr.Markdown(app.status, elem_id="model-status")
        with gr.Tabs():
            with gr.Tab("Analyse an X-ray", id="analyse"):
                _analyse_tab(app, endpoints, labels, upload_note(delete_cache, fair_use))
            with gr.Tab("Batch", id="batch", elem_id="batch-tab"):
                _batch_tab(endpoints, labels)
            with gr.Tab("Model report", id="report", elem_id="report-tab"):
                _report_tab(app)
        gr.Markdown(
            "Network: Islam, Islam & Asraf (2020), *A combined deep CNN-LSTM network for the detection of novel "
            "coronavirus (COVID-19) using X-ray images*. Inputs are checked for size, format and whether they look "
            "like a frontal chest radiograph; the check is a heuristic and warns rather than refuses."
        )
    protect_build_time_files(demo)  # the examples' and the report's cached copies stay; only users' files go
    demo.queue(default_concurrency_limit=1, max_size=64)
    if fair_use.enabled:
        limit_waiting_per_client(demo, lambda request, session: fair_use.key(request), fair_use.max_waiting)
    attach(demo, Attached(app, fair_use, limiter, endpoints.batch_dir))  # for launch, tests and scripts
    return demo


def launch(demo: Any, port: int | None = None, host: str | None = None, **kwargs: Any) -> Any:
    """Launch with the app's settings: no SSR, upload size limit, examples folder allowed, and the sweep of
    abandoned partial uploads on the `delete_cache` schedule (cxr_app/retention.py)."""
    from .retention import lifespan
    from .uploads import MAX_FILE_BYTES

    log_privacy.install()  # no upload paths (patients' names) in the log from here on
    app = attached(demo).app
    app.start_fast_path()  # in the low-priority worker: the server starts without waiting for it
    app_kwargs = dict(kwargs.pop("app_kwargs", None) or {})
    ledger = UploadLedger(UploadBudget.from_env(), lambda: cache_folder(demo))  # disk: per client and in all
    middleware = Middleware(UploadBudgetMiddleware, ledger=ledger, proxy_hops=attached(demo).fair_use.proxy_hops)
    app_kwargs["middleware"] = [*app_kwargs.get("middleware", []), middleware]
    if demo.delete_cache and "lifespan" not in app_kwargs:
        app_kwargs["lifespan"] = lifespan(lambda: cache_folder(demo), demo.delete_cache)
    return demo.launch(
        server_name=host or os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1",
        server_port=port,
        ssr_mode=False,
        max_file_size=MAX_FILE_BYTES,
        allowed_paths=[str(app.examples_dir)],
        footer_links=["api"],
        app_kwargs=app_kwargs,
        **kwargs,
    )


__all__ = [
    "CxrDemo",
    "DISCLAIMER",
    "ModelUnavailable",
    "build_demo",
    "launch",
    "load_classifier",
    "resolve_source",
    "default_checkpoint",
    "app_home",
]
