"""The app's service: `CxrDemo` holds the loaded classifier (or the reason there is none), the checkpoint's report,
and the functions the page, the API, the batch and the CLI call (`predict`, `explain`, `classify`,
`predict_batch`...). Nothing here knows about Gradio's page; the endpoints (cxr_app/endpoints.py) put each call
under its client's fair-use slot and turn every failure into a sentence.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import torch
from PIL import Image

from modeling_cnn_lstm.lung_region_cnn_lstm import find_lung_region

from . import guardrails
from .batch import MAX_BATCH_FILES, expand_batch
from .limits import LowPriorityWorker
from .loading import (
    EXAMPLES_SUBDIR,
    LoadedClassifier,
    ModelUnavailable,
    app_home,
    choose_fast_path,
    load_classifier,
    resolve_companion,
    resolve_source,
)
from .lung_evidence import WARNING as LUNG_EVIDENCE_WARNING
from .lung_evidence import LungEvidence, measure, model_frame, threshold_from_report
from .prevalence import ClassRates, rates_from_metrics, reading
from .report_view import ModelReport, load_report, report_folder
from .results import result_row
from .saliency import DEFAULT_OPACITY, GRAD_CAM, INTEGRATED_GRADIENTS, METHODS, OCCLUSION, render_overlay
from .uploads import InputError, LoadedImage, read_upload, read_upload_cached

logger = logging.getLogger(__name__)

PREDICTED = "Predicted class"
MAX_BATCH_UPLOADS = 4 * MAX_BATCH_FILES  # uploads per batch: room for a few unreadable ones, bounded rows


def _log_failure(future: Future) -> None:
    if future.exception() is not None:  # the eager path keeps serving; say why the fast one is not used
        logger.warning("no fast CPU path for Occlusion (eager fp32 stays): %r", future.exception())


def file_path(file: Any) -> str | None:
    """gr.File gives a path string; gradio_client's FileData dicts and objects with .name are accepted too."""
    if file is None or isinstance(file, (str, Path)):
        return None if file in (None, "") else str(file)
    if isinstance(file, dict):
        return file.get("path") or file.get("name")
    return getattr(file, "name", None) or getattr(file, "path", None)


@dataclass
class Prediction:
    scores: dict[str, float]  # label -> calibrated probability
    warnings: list[str]  # the guardrails' sentences (not a radiograph? low confidence? evidence off the lungs?)
    image: LoadedImage
    evidence: LungEvidence | None = None  # how much of the call's Grad-CAM evidence lies inside the lung fields

    @property
    def label(self) -> str:
        return max(self.scores, key=self.scores.get)

    def astuple(self) -> tuple[dict[str, float], list[str], LoadedImage]:
        return self.scores, self.warnings, self.image


@dataclass(frozen=True)
class SaliencyView:
    """A computed map and what it explains: the page keeps it per session to redraw at another opacity."""

    saliency: np.ndarray | None  # [0, 1] at the model's input size; None when the map is zero everywhere
    method: str
    label: str
    lung_mask: np.ndarray | None = None  # the lung fields at the model's input size (drawn as an outline)
    frame: tuple[int, int, int, int] | None = None  # where the model's input lies in the upload (a lung crop)


class CxrDemo:
    """The app's state (a classifier or the reason there is none) and the functions the UI calls."""

    def __init__(
        self,
        classifier: LoadedClassifier | None,
        status: str,
        home: str | Path | None = None,
        report: ModelReport | None = None,
        companion: str | None = None,
    ) -> None:
        self.classifier = classifier
        self.companion_source = companion  # the competitive CNN offered beside the CNN-LSTM (loaded on first use)
        self._companion: LoadedClassifier | None = None
        self._companion_lock = threading.Lock()
        self.status = status
        self.home = app_home(home)
        self.report = report  # the checkpoint's own test report (report/metrics.json), None without one
        self.rates: dict[str, ClassRates] | None = rates_from_metrics(report.data) if report else None
        self.lung_threshold = threshold_from_report(report.data if report else None)
        self.slow_maps = LowPriorityWorker()  # IG, Occlusion and batches ($CNN_LSTM_SLOW_MAP_NICE)

    def start_fast_path(self) -> Future | None:
        """Choose Occlusion's fast CPU path in the low-priority worker (`choose_fast_path`), off the start-up path:
        `launch` calls it as the server starts; requests are served in eager fp32 meanwhile."""
        if self.classifier is None:
            return None
        future = self.slow_maps.submit(choose_fast_path, self.classifier)
        future.add_done_callback(_log_failure)
        return future

    @property
    def examples_dir(self) -> Path:
        return self.home / EXAMPLES_SUBDIR

    @classmethod
    def from_source(
        cls, model: str | None = None, revision: str | None = None, home: str | Path | None = None, **kwargs: Any
    ) -> CxrDemo:
        source, revision = resolve_source(model, revision, home)
        try:
            classifier = load_classifier(source, revision, **kwargs)
        except ModelUnavailable as error:
            logger.warning("no model: %s", error)
            return cls(None, str(error), home)
        report = load_report(report_folder(source, revision))
        shown = classifier.source  # a folder under the app's home is shown relative to it: no server paths on the page
        with contextlib.suppress(ValueError):
            shown = str(Path(classifier.source).resolve().relative_to(app_home(home)))
        return cls(classifier, f"Model: `{shown}`.", home, report, resolve_companion(home))

    def companion(self) -> LoadedClassifier:
        """The competitive CNN, loaded on first use (one load however many requests ask at once)."""
        if self.companion_source is None:
            raise ModelUnavailable(
                "No competitive CNN is installed (checkpoints/cnn-dense-cxr3, or set $CNN_LSTM_COMPANION)."
            )
        with self._companion_lock:
            if self._companion is None:
                self._companion = load_classifier(self.companion_source)
            return self._companion

    def companion_scores(self, file: Any) -> dict[str, float]:
        """The competitive CNN's calibrated probabilities for the same upload: its own processor, one fp32 forward."""
        self.require()
        companion = self.companion()
        image = read_upload_cached(file_path(file))
        pixel_values = companion.processor(image.model_input(), return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            logits = companion.model(pixel_values=pixel_values.to(companion.model.device)).logits
        probabilities = logits[0].float().softmax(-1).cpu().tolist()
        return dict(zip(companion.labels, probabilities, strict=True))

    def require(self) -> LoadedClassifier:
        if self.classifier is None:
            raise ModelUnavailable(self.status)
        return self.classifier

    def _prepare(
        self, file: Any, reader: Callable[[Any], LoadedImage] = read_upload_cached
    ) -> tuple[LoadedClassifier, LoadedImage, torch.Tensor]:
        classifier = self.require()
        image = reader(file_path(file))
        pixel_values = classifier.processor(image.model_input(), return_tensors="pt")["pixel_values"]
        return classifier, image, pixel_values

    def classify(self, file: Any, reader: Callable[[Any], LoadedImage] = read_upload_cached) -> Prediction:
        """A file -> calibrated probabilities, the share of the evidence inside the lung fields and the guardrails'
        warnings (what the UI, the API, the batch and the CLI share). One eager fp32 pass gives the logits and the
        predicted class's Grad-CAM map (cxr_app/lung_evidence.py)."""
        classifier, image, pixel_values = self._prepare(file, reader)
        logits, cam, _ = classifier.explainer.gradcam_with_logits(pixel_values)
        probabilities = logits[0].float().softmax(-1).cpu()
        evidence = measure(cam, pixel_values, self.lung_threshold)
        scores = {label: float(p) for label, p in zip(classifier.labels, probabilities.tolist(), strict=True)}
        input_findings = guardrails.check_radiograph(image.pixels, image.dicom)
        confidence_findings = guardrails.check_confidence(scores)
        warnings = [guardrails.warning_text(input_findings)] if input_findings else []
        warnings += [f"Low confidence: {finding.message}." for finding in confidence_findings]
        if evidence.low:
            warnings.append(LUNG_EVIDENCE_WARNING)
        return Prediction(scores, warnings, image, evidence)

    def predict(self, file: Any) -> tuple[dict[str, float], str]:
        """Upload -> ({label: probability}, a Markdown summary with the warnings and the caveat)."""
        classifier = self.require()
        prediction = self.classify(file)
        scores, warnings, image = prediction.astuple()
        top_label = max(scores, key=scores.get)
        for warning in warnings:
            gr.Warning(warning)
        calibrated = (
            f"calibrated with temperature {classifier.temperature:.2f}"
            if classifier.temperature != 1.0
            else "not calibrated (temperature 1)"
        )
        lines = [f"### {top_label}: {scores[top_label]:.0%}", f"Probabilities {calibrated}."]
        if prediction.evidence is not None:
            lines.append(prediction.evidence.sentence())
        lines += [f"- ⚠️ {warning}" for warning in warnings]
        details = f"{image.kind}, {image.width}x{image.height} px"
        if image.notes:
            details += "; " + "; ".join(image.notes)
        lines += ["", f"Input: {details}.", "", "_Research use only — not for diagnosis._"]  # "" ends the list
        return scores, "\n".join(lines)

    def attribution(
        self, file: Any, method: str = GRAD_CAM, target: str = PREDICTED, progress: Callable | None = None
    ) -> SaliencyView:
        """Upload -> the saliency map of `method` for `target` (the predicted class by default)."""
        return self.attribution_and_image(file, method, target, progress)[0]

    def attribution_and_image(
        self, file: Any, method: str, target: str, progress: Callable | None = None
    ) -> tuple[SaliencyView, LoadedImage]:
        """The map and the upload as read (so the caller can draw the map without reading the file again)."""
        classifier, image, pixel_values = self._prepare(file)
        method = method or GRAD_CAM
        if method not in METHODS:
            raise InputError(f"Unknown saliency method {method!r}; choose one of: {', '.join(METHODS)}.")
        if target in (None, "", PREDICTED):
            index = None
        elif target in classifier.labels:
            index = classifier.labels.index(target)
        else:
            raise InputError(f"Unknown class {target!r}; choose one of: {', '.join(classifier.labels)}.")
        report = None if progress is None else (lambda fraction, label: progress(fraction, desc=label))
        arguments = (pixel_values, method, index, classifier.black, report)
        if method == GRAD_CAM:
            saliency, index = classifier.explainer.attribute(*arguments)
        else:  # 5-15 s of both cores: at a lower priority, so predictions beside it stay fast
            saliency, index = self.slow_maps.run(classifier.explainer.attribute, *arguments)
        lung_mask = find_lung_region(pixel_values[0]).mask.numpy()
        frame = model_frame(image.model_input(), bool(getattr(classifier.processor, "crop_to_lungs", False)))
        return SaliencyView(saliency, method, classifier.labels[index], lung_mask, frame), image

    def render(
        self, file: Any, view: SaliencyView, opacity: float = DEFAULT_OPACITY, image: LoadedImage | None = None
    ) -> Image.Image:
        """The map drawn over the upload (`image`: the upload already read) at the input's aspect ratio; weak areas
        stay uncoloured."""
        classifier = self.require()
        image = image if image is not None else read_upload_cached(file_path(file))
        if not (isinstance(opacity, (int, float)) and 0.0 <= opacity <= 1.0):
            raise InputError(f"The overlay opacity must be between 0 and 1, got {opacity!r}.")
        return render_overlay(
            image.display_uint8(),
            view.saliency,
            classifier.processor.resize_mode,
            opacity=float(opacity),
            outline=view.lung_mask,
            frame=view.frame,
        )

    def input_image(self, file: Any) -> Image.Image:
        """The upload as the page shows it (windowed, oriented, longer side <= 768 px)."""
        self.require()
        return render_overlay(read_upload_cached(file_path(file)).display_uint8(), None)

    def explanation(self, view: SaliencyView) -> str:
        """A sentence on how to read the map."""
        method, label = view.method, view.label
        if view.saliency is None:
            note = (
                f"The {method} map for **{label}** is zero everywhere for this image (common for an untrained or "
                "saturated model), so the image is shown without an overlay."
            )
        else:
            classifier = self.require()
            rows, columns = classifier.explainer.gradcam_grid
            size = classifier.model.config.image_size
            cell = f"{size // columns}x{size // rows}"
            meaning = {
                GRAD_CAM: f"coloured areas hold the features that raised the score for {label} most (coarse: one "
                f"value per {cell}-pixel cell of the model's input, a {rows}x{columns} grid)",
                INTEGRATED_GRADIENTS: f"coloured pixels changed the score for {label} most, up or down, on the way "
                "from a black image",
                OCCLUSION: f"hiding the coloured areas lowered the probability of {label} most",
            }[method]
            note = f"{method} for **{label}**: {meaning}; red is strongest, uncoloured areas mattered little."
        if view.lung_mask is not None:
            note += " The green line outlines the lung fields that the evidence share is measured in."
        return note + " A saliency map shows what the model used, not where disease is."

    def explain(
        self,
        file: Any,
        method: str = GRAD_CAM,
        target: str = PREDICTED,
        progress: Callable | None = None,
        opacity: float = DEFAULT_OPACITY,
    ) -> tuple[Image.Image, str]:
        """Upload -> (the saliency overlay at the input's aspect ratio, a sentence on how to read it)."""
        view, image = self.attribution_and_image(file, method, target, progress)
        return self.render(file, view, opacity, image), self.explanation(view)

    def prevalence_reading(self, label: str | None, prevalence: float) -> str:
        """PPV/NPV of a `label` call at `prevalence` (0-1) from the checkpoint's test sensitivity and specificity."""
        if not label:
            return ""
        if self.rates is None or label not in self.rates:
            return "_No test report with this model: its predictive values cannot be computed._"
        return reading(label, self.rates[label], prevalence)

    def classify_row(self, name: str, path: Any) -> dict[str, str]:
        """One batch/CLI row: the prediction, or why the file was not read (never raises for a bad file)."""
        labels = self.require().labels
        try:
            prediction = self.classify(path, reader=read_upload)  # no cache: each file is read once
        except InputError as error:
            return result_row(labels, name, error=str(error))
        except (MemoryError, torch.OutOfMemoryError):
            return result_row(labels, name, error="out of memory while reading it; try a smaller image.")
        except Exception as error:  # noqa: BLE001 - one bad file must not stop the batch; the log gets the traceback
            logger.exception("unexpected error on a batch file")
            return result_row(labels, name, error=f"unexpected error ({type(error).__name__}).")
        evidence = prediction.evidence.cell() if prediction.evidence is not None else ""
        return result_row(labels, name, prediction.scores, prediction.warnings, lung_evidence=evidence)

    def predict_batch(self, uploads: Sequence[Any], progress: Callable | None = None) -> list[dict[str, str]]:
        """Files and zips of images/DICOM -> one row per image (cxr_app/batch.py bounds what a zip may cost). Zip
        members are extracted into a private folder that is deleted before this returns."""
        labels = self.require().labels
        named = [path for path in (file_path(upload) for upload in uploads or []) if path]  # shown by base name
        if not named:
            raise InputError("No files were uploaded. Choose chest X-ray images or DICOM files, or a zip of them.")
        if len(named) > MAX_BATCH_UPLOADS:
            raise InputError(
                f"{len(named)} files were uploaded; a batch takes at most {MAX_BATCH_UPLOADS} uploads "
                f"and reads {MAX_BATCH_FILES} X-rays. Split them into smaller batches."
            )
        with tempfile.TemporaryDirectory(prefix="cxr-batch-") as workdir:
            entries = expand_batch(named, Path(workdir))
            rows = []
            for done, entry in enumerate(entries):
                if progress is not None:
                    progress((done, len(entries)), desc="Classifying", unit="files")
                if entry.path is None:
                    rows.append(result_row(labels, entry.name, error=entry.error))
                else:
                    rows.append(self.classify_row(entry.name, entry.path))
        return rows
