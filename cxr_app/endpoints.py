"""The functions behind the page and the API (`Endpoints`): each runs under its client's fair-use slot
(cxr_app/limits.py) and reaches the user as a sentence, never a traceback (`as_user_error`); the server keeps
serving. Also the note shown beside the upload box.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
import torch
from PIL import Image

from .limits import BATCH, GRAD_CAM_MAP, LARGE_FILE, LARGE_FILE_BYTES, PREDICT, SLOW_MAP, FairUse, RateLimited
from .loading import ModelUnavailable
from .results import columns, rows_csv
from .retention import remove_older_than, retention_text
from .saliency import DEFAULT_OPACITY, GRAD_CAM
from .service import CxrDemo, SaliencyView, file_path
from .uploads import InputError

logger = logging.getLogger(__name__)


def _is_large(file: Any) -> bool:
    with contextlib.suppress(OSError, TypeError):
        return os.path.getsize(file_path(file) or "") > LARGE_FILE_BYTES
    return False


def as_user_error(action: str) -> Callable:
    """Every exception leaves as a gr.Error with a sentence; unexpected ones are logged with their traceback here."""

    def decorator(function: Callable) -> Callable:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return function(*args, **kwargs)
            except gr.Error:
                raise
            except InputError as error:
                raise gr.Error(str(error), title="Cannot use this file", print_exception=False) from None
            except ModelUnavailable as error:
                raise gr.Error(str(error), title="No model", print_exception=False) from None
            except RateLimited as error:
                raise gr.Error(str(error), title="Please wait", print_exception=False) from None
            except (MemoryError, torch.OutOfMemoryError):
                raise gr.Error(f"Out of memory while {action}; try a smaller image.", print_exception=False) from None
            except Exception as error:  # noqa: BLE001 - the user gets a sentence, the log gets the traceback
                logger.exception("unexpected error while %s", action)
                raise gr.Error(
                    f"Unexpected error while {action} ({type(error).__name__}). The server is still running; "
                    "please try another image.",
                    print_exception=False,
                ) from None

        return wrapper

    return decorator


def upload_note(delete_cache: tuple[int, int], fair_use: FairUse) -> str:
    """What the page says beside the upload box: de-identify first, how long files stay, the fair-use limits."""
    note = (
        "**Remove patient identifiers before uploading** (names, IDs, dates: in DICOM headers and burned into the "
        "image). Uploaded files and saliency images are deleted from the server within "
        f"{retention_text(delete_cache)}; DICOM patient tags are never shown."
    )
    slow = fair_use.limits.get(SLOW_MAP)
    if fair_use.enabled and slow is not None:
        window = "minute" if slow.window_s == 60 else f"{slow.window_s / 60:g} minutes"
        note += f" Fair use: at most {slow.count} Integrated Gradients or Occlusion maps per {window} per user"
        note += ", one at a time." if slow.in_flight == 1 else "."
    return note


class Endpoints:
    """The functions behind the page and the API: each runs under its client's fair-use slot and reaches the user
    as a sentence (`as_user_error`). The `*_ui` variants are the page's private events."""

    def __init__(self, app: CxrDemo, fair_use: FairUse, limiter: Any, batch_dir: Path) -> None:
        self.app, self.fair_use, self.limiter, self.batch_dir = app, fair_use, limiter, batch_dir

    @as_user_error("reading the image and predicting")
    def predict(self, file: str, request: gr.Request) -> tuple[dict[str, float], str]:
        client = self.fair_use.key(request)
        with self.limiter.slot(client, PREDICT):
            if not _is_large(file):
                return self.app.predict(file)
            with self.limiter.slot(client, LARGE_FILE):  # decoded in the low-priority worker, a few a minute
                return self.app.slow_maps.run(self.app.predict, file)

    @as_user_error("running the competitive CNN")
    def predict_cnn(self, file: str, request: gr.Request) -> dict[str, float]:
        """The paper's competitive CNN (dense head) on the same upload, beside the CNN-LSTM's answer."""
        with self.limiter.slot(self.fair_use.key(request), PREDICT):
            return self.app.companion_scores(file)

    def cnn_ui(self, file: str | None, show: bool, request: gr.Request):
        """The page's CNN column: hidden unless asked for; computed for the current upload when shown."""
        if not show or file is None:
            return gr.update(visible=bool(show), value=None)
        return gr.update(visible=True, value=self.predict_cnn(file, request))

    @as_user_error("computing the saliency map")
    def explain(
        self,
        file: str,
        method: str,
        target: str,
        opacity: float,
        request: gr.Request,
        progress=gr.Progress(),  # noqa: B008
    ) -> tuple[Image.Image, str, SaliencyView]:
        kind = GRAD_CAM_MAP if method in (None, "", GRAD_CAM) else SLOW_MAP
        opacity = DEFAULT_OPACITY if opacity is None else opacity
        with self.limiter.slot(self.fair_use.key(request), kind):
            view, image = self.app.attribution_and_image(file, method, target, progress)
        return self.app.render(file, view, opacity, image), self.app.explanation(view), view

    @as_user_error("classifying the batch")
    def predict_batch(
        self,
        files: list[str] | None,
        request: gr.Request,
        progress=gr.Progress(),  # noqa: B008
    ) -> tuple[Any, str]:
        import pandas as pd

        with self.limiter.slot(self.fair_use.key(request), BATCH):
            rows = self.app.slow_maps.run(self.app.predict_batch, files, progress)
        return pd.DataFrame(rows, columns=columns(self.app.require().labels)), self._write_csv(rows)

    def _write_csv(self, rows: list[dict[str, str]]) -> str:
        """The batch's CSV in a fresh folder of the app's own; gradio copies it into its cache (deleted on the
        retention schedule), and folders older than a minute are removed here."""
        remove_older_than(self.batch_dir, 60.0)  # older folders: gradio has copied their CSV into its cache
        folder = Path(tempfile.mkdtemp(dir=self.batch_dir))
        path = folder / "cxr_predictions.csv"
        path.write_text(rows_csv(rows, self.app.require().labels), encoding="utf-8")
        return str(path)

    def predict_ui(self, file: str | None, request: gr.Request):
        if file is None:
            return None, "", None
        scores, summary = self.predict(file, request)
        return scores, summary, self._input_image(file)

    @as_user_error("showing the image")
    def _input_image(self, file: str) -> Image.Image:
        return self.app.input_image(file)

    def explain_ui(
        self,
        file: str | None,
        method: str,
        target: str,
        opacity: float,
        request: gr.Request,
        progress=gr.Progress(),  # noqa: B008
    ):
        return (None, "", None) if file is None else self.explain(file, method, target, opacity, request, progress)

    @as_user_error("drawing the saliency map")
    def redraw_ui(self, file: str | None, view: SaliencyView | None, opacity: float):
        """Another opacity: the kept map drawn again, nothing recomputed."""
        return gr.skip() if file is None or view is None else self.app.render(file, view, opacity)

    @as_user_error("computing the predictive values")
    def reading_ui(self, scores: dict[str, float] | None, prevalence_percent: float) -> str:
        label = max(scores, key=scores.get) if isinstance(scores, dict) and scores else None
        return self.app.prevalence_reading(label, float(prevalence_percent) / 100)
