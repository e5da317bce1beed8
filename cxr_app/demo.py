"""The Gradio app: model loading with plain messages, the `predict` and `explain` functions, and the UI.

`CxrDemo.predict` / `CxrDemo.explain` are what the UI and the `/predict` and `/explain` API endpoints call (and what
the tests and scripts/benchmark_app.py time). Every failure reaches the user as a `gr.Error` with a sentence, never
as a traceback, and the server keeps serving. Without a trained checkpoint the app starts and says how to get one.
For a public deployment, `build_demo` adds per-client limits (cxr_app/limits.py) and deletes uploads on a schedule
(cxr_app/retention.py); the page says both beside the upload box.

Where the default checkpoint and the example X-rays are: under the app's home folder, the one that holds
`checkpoints/` and `examples/`. `app.py` passes its own folder; without one the current directory is used, so an
installed (non-editable) copy of this package never looks inside site-packages for them.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import torch
from PIL import Image

from modeling_cnn_lstm.fast_inference_cnn_lstm import CnnLstmFastInference
from modeling_cnn_lstm.image_processing_cnn_lstm import CnnLstmImageProcessor
from modeling_cnn_lstm.lung_region_cnn_lstm import find_lung_region

from . import guardrails
from .batch import MAX_BATCH_FILES, expand_batch
from .limits import (
    BATCH,
    GRAD_CAM_MAP,
    PREDICT,
    SLOW_MAP,
    FairUse,
    LowPriorityWorker,
    RateLimited,
    limit_waiting_per_client,
)
from .lung_evidence import WARNING as LUNG_EVIDENCE_WARNING
from .lung_evidence import LungEvidence, measure, model_frame, threshold_from_report
from .prevalence import ClassRates, rates_from_metrics, reading
from .report_view import ModelReport, load_report, report_folder
from .results import columns, result_row, rows_csv
from .retention import delete_cache_setting, protect_build_time_files, remove_older_than, retention_text
from .saliency import (
    DEFAULT_OPACITY,
    GRAD_CAM,
    INTEGRATED_GRADIENTS,
    METHODS,
    OCCLUSION,
    Explainer,
    SaliencySettings,
    render_overlay,
)
from .uploads import ACCEPTED_SUFFIXES, InputError, LoadedImage, read_upload, read_upload_cached

logger = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = Path("checkpoints") / "cnn-lstm-cxr3"  # the trained model, relative to the app's home
EXAMPLES_SUBDIR = Path("examples")
ENV_MODEL, ENV_REVISION, ENV_DEVICE = "CNN_LSTM_MODEL", "CNN_LSTM_REVISION", "CNN_LSTM_DEVICE"
PREDICTED = "Predicted class"
TRAIN_COMMAND = (  # the CPU recipe (about 2 hours on 2 cores); train/configs/paper.json is the GPU one
    "python train/run.py --config train/configs/paper_cpu.json --data_dir ../shared/data/cxr3 "
    "--output_dir runs/cnn-lstm-cxr3-cpu --final_model_dir checkpoints/cnn-lstm-cxr3"
)
DISCLAIMER = (
    "**Research use only — not for diagnosis.** This demo and its model are not medical devices. The model was "
    "trained on a small public collection whose classes differ by source and patient age, so it can be right for the "
    "wrong reasons. Never use its output for clinical decisions."
)
MAX_BATCH_UPLOADS = 4 * MAX_BATCH_FILES  # uploads per batch: room for a few unreadable ones, bounded rows
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelUnavailable(RuntimeError):
    """No usable model; the message tells the user what to do."""


def no_model_message(reason: str) -> str:
    return (
        f"**No trained model is installed.** {reason}\n\n"
        f"Train one: `{TRAIN_COMMAND}` (writes `checkpoints/cnn-lstm-cxr3`, the folder this app serves by default), "
        f"or point the app to a checkpoint: `python app.py --model PATH_OR_HUB_ID`, or set `{ENV_MODEL}` "
        f"(and `{ENV_REVISION}` for a Hub revision)."
    )


def app_home(home: str | Path | None = None) -> Path:
    """The folder holding `checkpoints/` and `examples/`: `home` when given (app.py passes its own folder), else the
    current directory."""
    return Path(home).resolve() if home is not None else Path.cwd()


def default_checkpoint(home: str | Path | None = None) -> Path:
    return app_home(home) / CHECKPOINT_SUBDIR


def resolve_source(
    model: str | None = None, revision: str | None = None, home: str | Path | None = None
) -> tuple[str, str | None]:
    """`--model` beats the environment, which beats the checkpoint folder under the app's home."""
    source = model or os.environ.get(ENV_MODEL) or str(default_checkpoint(home))
    return source, revision or os.environ.get(ENV_REVISION) or None


@dataclass
class LoadedClassifier:
    model: torch.nn.Module
    processor: CnnLstmImageProcessor
    explainer: Explainer
    labels: list[str]
    source: str
    black: torch.Tensor  # the processor's output for a black image: the IG baseline
    runner: CnnLstmFastInference | None = None  # the opt-in fast CPU path for Occlusion; None on a GPU

    @property
    def temperature(self) -> float:
        return float(self.model.config.calibration_temperature)


def load_classifier(source: str, revision: str | None = None, settings: SaliencySettings | None = None):
    """A local checkpoint folder or Hub id -> `LoadedClassifier`; `ModelUnavailable` with a user message otherwise.
    Our own classes load it (never remote code): the app runs only the code it ships with."""
    from transformers import AutoConfig

    from modeling_cnn_lstm.modeling_cnn_lstm import CnnLstmForImageClassification

    path = Path(source).expanduser()
    if path.parts[-2:] == CHECKPOINT_SUBDIR.parts and not path.is_dir():
        raise ModelUnavailable(no_model_message("The default folder `checkpoints/cnn-lstm-cxr3` is not there yet."))
    if path.exists() and not (path / "config.json").is_file():
        raise ModelUnavailable(no_model_message(f"`{source}` has no config.json: it is not a checkpoint folder."))
    if not path.exists() and not _HUB_ID.match(source):
        raise ModelUnavailable(no_model_message(f"`{source}` is neither a folder nor a Hub id (owner/name)."))
    at = f" at revision {revision}" if revision else ""
    try:
        config = AutoConfig.from_pretrained(source, revision=revision)
        if config.model_type != "cnn_lstm":
            raise ModelUnavailable(no_model_message(f"`{source}` is a {config.model_type} model, not a CNN-LSTM."))
        model = CnnLstmForImageClassification.from_pretrained(source, revision=revision)
    except ModelUnavailable:
        raise
    except Exception as error:  # noqa: BLE001 - offline, missing repo, damaged weights: say which, keep running
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelUnavailable(no_model_message(f"Loading `{source}`{at} failed: {first_line}")) from None
    try:
        processor = CnnLstmImageProcessor.from_pretrained(source, revision=revision)
    except Exception:  # noqa: BLE001 - a folder without preprocessor_config.json: the config has what is needed
        processor = CnnLstmImageProcessor.from_model_config(model.config)
    if (processor.size["height"], processor.size["width"]) != (model.config.image_size,) * 2:
        raise ModelUnavailable(
            no_model_message(
                f"`{source}`{at} is inconsistent: its processor resizes to {processor.size['height']}x"
                f"{processor.size['width']} but the model takes {model.config.image_size}x{model.config.image_size}."
            )
        )
    device = os.environ.get(ENV_DEVICE) or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = model.to(device).eval()
        explainer = Explainer(model, settings)
        black = processor(np.zeros((8, 8, 1), np.float32), return_tensors="pt")["pixel_values"][:, :, :1, :1]
        size = processor.size
        black = black.expand(1, -1, size["height"], size["width"]).contiguous()
        runner = None
        if torch.device(device).type == "cpu":  # Occlusion's 49 forwards; gradient maps keep the fp32 graph
            runner = model.fast_cpu_inference()  # checks and times the candidates: the app's warm-up
            explainer.no_grad_logits = runner  # Occlusion needs no gradients: the faster path
            # predictions need the Grad-CAM of their class (the lung-evidence share): one eager fp32 pass gives both
            logger.info("Occlusion runs on %s: %s; predictions: eager fp32 with their Grad-CAM", runner.backend,
                        runner.reason)  # fmt: skip
        else:
            with torch.inference_mode():  # warm-up: first-call allocations before users come
                model(pixel_values=black.to(device))
    except Exception as error:  # noqa: BLE001 - a bad device setting or a broken checkpoint: say so, keep running
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        reason = f"Preparing `{source}`{at} on {device} failed: {first_line}"
        raise ModelUnavailable(no_model_message(reason)) from None
    labels = [model.config.id2label[index] for index in range(model.config.num_labels)]
    logger.info("serving %s%s on %s", source, at, device)
    return LoadedClassifier(model, processor, explainer, labels, f"{source}{at}", black, runner)


def _as_user_error(action: str) -> Callable:
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


def _file_path(file: Any) -> str | None:
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
    ) -> None:
        self.classifier = classifier
        self.status = status
        self.home = app_home(home)
        self.report = report  # the checkpoint's own test report (report/metrics.json), None without one
        self.rates: dict[str, ClassRates] | None = rates_from_metrics(report.data) if report else None
        self.lung_threshold = threshold_from_report(report.data if report else None)
        self.slow_maps = LowPriorityWorker()  # IG, Occlusion and batches ($CNN_LSTM_SLOW_MAP_NICE)

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
        return cls(classifier, f"Model: `{shown}`.", home, report)

    def _require(self) -> LoadedClassifier:
        if self.classifier is None:
            raise ModelUnavailable(self.status)
        return self.classifier

    def _prepare(
        self, file: Any, reader: Callable[[Any], LoadedImage] = read_upload_cached
    ) -> tuple[LoadedClassifier, LoadedImage, torch.Tensor]:
        classifier = self._require()
        image = reader(_file_path(file))
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
        classifier = self._require()
        prediction = self.classify(file)
        scores, warnings, image = prediction.astuple()
        top_label = max(scores, key=scores.get)
        for warning in warnings:
            gr.Warning(warning)
        calibrated = (
            f"calibrated with temperature {classifier.temperature:.2f}" if classifier.temperature != 1.0
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
        return self._attribution(file, method, target, progress)[0]

    def _attribution(
        self, file: Any, method: str, target: str, progress: Callable | None
    ) -> tuple[SaliencyView, LoadedImage]:
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
        classifier = self._require()
        image = image if image is not None else read_upload_cached(_file_path(file))
        if not (isinstance(opacity, (int, float)) and 0.0 <= opacity <= 1.0):
            raise InputError(f"The overlay opacity must be between 0 and 1, got {opacity!r}.")
        return render_overlay(image.display_uint8(), view.saliency, classifier.processor.resize_mode,
                              opacity=float(opacity), outline=view.lung_mask, frame=view.frame)

    def input_image(self, file: Any) -> Image.Image:
        """The upload as the page shows it (windowed, oriented, longer side <= 768 px)."""
        self._require()
        return render_overlay(read_upload_cached(_file_path(file)).display_uint8(), None)

    def explanation(self, view: SaliencyView) -> str:
        """A sentence on how to read the map."""
        method, label = view.method, view.label
        if view.saliency is None:
            note = (
                f"The {method} map for **{label}** is zero everywhere for this image (common for an untrained or "
                "saturated model), so the image is shown without an overlay."
            )
        else:
            config = self._require().model.config
            cell = config.image_size // max(1, config.feature_map_size)
            meaning = {
                GRAD_CAM: f"coloured areas hold the features that raised the score for {label} most (coarse: one "
                f"value per {cell}x{cell}-pixel cell of the model's input)",
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
        view, image = self._attribution(file, method, target, progress)
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
        labels = self._require().labels
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
        labels = self._require().labels
        named = [path for path in (_file_path(upload) for upload in uploads or []) if path]  # shown by base name
        if not named:
            raise InputError("No files were uploaded. Choose chest X-ray images or DICOM files, or a zip of them.")
        if len(named) > MAX_BATCH_UPLOADS:
            raise InputError(f"{len(named)} files were uploaded; a batch takes at most {MAX_BATCH_UPLOADS} uploads "
                             f"and reads {MAX_BATCH_FILES} X-rays. Split them into smaller batches.")
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
    as a sentence (`_as_user_error`). The `*_ui` variants are the page's private events."""

    def __init__(self, app: CxrDemo, fair_use: FairUse, limiter: Any, batch_dir: Path) -> None:
        self.app, self.fair_use, self.limiter, self.batch_dir = app, fair_use, limiter, batch_dir

    @_as_user_error("reading the image and predicting")
    def predict(self, file: str, request: gr.Request) -> tuple[dict[str, float], str]:
        with self.limiter.slot(self.fair_use.key(request), PREDICT):
            return self.app.predict(file)

    @_as_user_error("computing the saliency map")
    def explain(
        self, file: str, method: str, target: str, opacity: float, request: gr.Request,
        progress=gr.Progress(),  # noqa: B008
    ) -> tuple[Image.Image, str, SaliencyView]:
        kind = GRAD_CAM_MAP if method in (None, "", GRAD_CAM) else SLOW_MAP
        opacity = DEFAULT_OPACITY if opacity is None else opacity
        with self.limiter.slot(self.fair_use.key(request), kind):
            view, image = self.app._attribution(file, method, target, progress)
        return self.app.render(file, view, opacity, image), self.app.explanation(view), view

    @_as_user_error("classifying the batch")
    def predict_batch(
        self, files: list[str] | None, request: gr.Request, progress=gr.Progress()  # noqa: B008
    ) -> tuple[Any, str]:
        import pandas as pd

        with self.limiter.slot(self.fair_use.key(request), BATCH):
            rows = self.app.slow_maps.run(self.app.predict_batch, files, progress)
        return pd.DataFrame(rows, columns=columns(self.app._require().labels)), self._write_csv(rows)

    def _write_csv(self, rows: list[dict[str, str]]) -> str:
        """The batch's CSV in a fresh folder of the app's own; gradio copies it into its cache (deleted on the
        retention schedule), and folders older than a minute are removed here."""
        remove_older_than(self.batch_dir, 60.0)  # older folders: gradio has copied their CSV into its cache
        folder = Path(tempfile.mkdtemp(dir=self.batch_dir))
        path = folder / "cxr_predictions.csv"
        path.write_text(rows_csv(rows, self.app._require().labels), encoding="utf-8")
        return str(path)

    def predict_ui(self, file: str | None, request: gr.Request):
        if file is None:
            return None, "", None
        scores, summary = self.predict(file, request)
        return scores, summary, self._input_image(file)

    @_as_user_error("showing the image")
    def _input_image(self, file: str) -> Image.Image:
        return self.app.input_image(file)

    def explain_ui(self, file: str | None, method: str, target: str, opacity: float, request: gr.Request,
                   progress=gr.Progress()):  # noqa: B008
        return (None, "", None) if file is None else self.explain(file, method, target, opacity, request, progress)

    @_as_user_error("drawing the saliency map")
    def redraw_ui(self, file: str | None, view: SaliencyView | None, opacity: float):
        """Another opacity: the kept map drawn again, nothing recomputed."""
        return gr.skip() if file is None or view is None else self.app.render(file, view, opacity)

    @_as_user_error("computing the predictive values")
    def reading_ui(self, scores: dict[str, float] | None, prevalence_percent: float) -> str:
        label = max(scores, key=scores.get) if isinstance(scores, dict) and scores else None
        return self.app.prevalence_reading(label, float(prevalence_percent) / 100)


def _analyse_tab(app: CxrDemo, endpoints: Endpoints, labels: list[str], upload_text: str) -> None:
    from .prevalence import DEFAULT_PREVALENCE
    from .saliency import colour_bar_html

    with gr.Row():
        with gr.Column(scale=1):
            file = gr.File(label="Frontal chest X-ray: PNG, JPEG, BMP, TIFF or DICOM",
                           file_types=list(ACCEPTED_SUFFIXES), type="filepath", elem_id="xray-file")
            gr.Markdown(upload_text, elem_id="upload-note")
            analyse = gr.Button("Analyse", variant="primary")
            examples = sorted(p for p in app.examples_dir.glob("*") if p.suffix.lower() in ACCEPTED_SUFFIXES)
            if examples:
                gr.Examples([[str(path)] for path in examples], inputs=[file],
                            label="Examples (public X-rays; credits in examples/CREDITS.md)")
        with gr.Column(scale=1):
            label = gr.Label(num_top_classes=len(labels), label="Probabilities")
            summary = gr.Markdown(label="Summary", elem_id="summary")
            prevalence = gr.Slider(
                0.5, 50, value=100 * DEFAULT_PREVALENCE, step=0.5, label="Prevalence of the predicted class (%)",
                info="How common this class is among the films where you would use the model (default 5%).",
                elem_id="prevalence",
            )
            reading_text = gr.Markdown(elem_id="prevalence-reading")
    with gr.Row():
        method = gr.Radio(list(METHODS), value=GRAD_CAM, label="Saliency method",
                          info="Grad-CAM: fast, coarse. Integrated Gradients and Occlusion: finer, ~10-20 s.")
        target = gr.Dropdown([PREDICTED, *labels], value=PREDICTED, label="Explain the score of")
        opacity = gr.Slider(0.0, 1.0, value=DEFAULT_OPACITY, step=0.05, label="Overlay opacity",
                            elem_id="opacity")
    with gr.Row():
        original = gr.Image(format="png", type="pil", label="Your image", interactive=False, elem_id="input-image")
        with gr.Column():
            overlay = gr.Image(format="png", type="pil", label="Saliency overlay", interactive=False,
                               elem_id="overlay")
            gr.HTML(colour_bar_html(), elem_id="colour-bar")
    note = gr.Markdown(label="How to read the map", elem_id="explain-note")
    view = gr.State(None)

    # Separate queues: a prediction never waits behind a saliency map. Two predictions at a time (~0.15 s each).
    # Maps: three at a time, but the slow ones (5-20 s) run one by one in the low-priority worker, so a Grad-CAM
    # map (~0.5 s) waits behind them only when three clients ask for slow maps at once (each may have one).
    fast = {"concurrency_limit": 2, "concurrency_id": "predict"}
    maps = {"concurrency_limit": 3, "concurrency_id": "explain"}
    private = {"api_visibility": "private"}
    map_inputs, map_outputs = [file, method, target, opacity], [overlay, note, view]
    analyse.click(endpoints.predict, [file], [label, summary], api_name="predict", **fast).success(
        endpoints.explain, map_inputs, map_outputs, api_name="explain", **maps
    )
    upload = file.change(endpoints.predict_ui, [file], [label, summary, original], **private, **fast)
    upload.success(endpoints.explain_ui, map_inputs, map_outputs, **private, **maps)
    gr.on([label.change, prevalence.change], endpoints.reading_ui, [label, prevalence], [reading_text],
          **private, **fast)
    gr.on([method.change, target.change], endpoints.explain_ui, map_inputs, map_outputs, **private, **maps)
    opacity.change(endpoints.redraw_ui, [file, view, opacity], [overlay], trigger_mode="always_last", **private,
                   **fast)


def _batch_tab(endpoints: Endpoints, labels: list[str]) -> None:
    gr.Markdown(
        f"Classify up to {MAX_BATCH_FILES} X-rays at once: choose several files, or a zip of PNG, JPEG, BMP, TIFF, "
        "WebP or DICOM "
        "files (each file up to the single-upload limit; zips are unpacked on the server into a private folder "
        "that is deleted as soon as the batch is done). A file that cannot be read gets its reason in its row; "
        "the others still run. Also an API endpoint: `/predict_batch`."
    )
    # No file_types: gradio would refuse the whole batch for one file of another type; here it gets its own row.
    files = gr.File(label="X-rays, DICOM files or a zip", file_count="multiple", type="filepath",
                    elem_id="batch-files")
    run = gr.Button("Classify all", variant="primary", elem_id="batch-run")
    table = gr.Dataframe(headers=columns(labels), interactive=False, wrap=True, label="Results",
                         elem_id="batch-table")
    csv_file = gr.File(label="Results as CSV", interactive=False, elem_id="batch-csv")
    run.click(endpoints.predict_batch, [files], [table, csv_file], api_name="predict_batch",
              concurrency_limit=1, concurrency_id="batch")


def _report_tab(app: CxrDemo) -> None:
    from . import report_view

    report = app.report
    if report is None:
        gr.Markdown(report_view.no_report_markdown(app.classifier.source if app.classifier else "none"),
                    elem_id="report-missing")
        return
    gr.Markdown(report_view.summary_markdown(report), elem_id="report-summary")
    figures = report.figures()
    with gr.Row():
        gr.Markdown(report_view.confusion_markdown(report))
        for path, caption in figures[:2]:
            gr.Image(str(path), label=caption, show_label=False, interactive=False, buttons=["fullscreen"])
    gr.Markdown(report_view.calibration_markdown(report))
    for path, caption in figures[2:]:
        gr.Image(str(path), label=caption, show_label=False, interactive=False, buttons=["fullscreen"],
                 height=420)
    gr.Markdown(report_view.sources_markdown(report), elem_id="report-sources")
    gr.Markdown(report_view.audit_markdown(report), elem_id="report-audit")


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
    demo.cxr_app = app  # for tests and scripts
    demo.fair_use, demo.limiter, demo.batch_dir = fair_use, limiter, endpoints.batch_dir
    return demo


def launch(demo: Any, port: int | None = None, host: str | None = None, **kwargs: Any) -> Any:
    """Launch with the app's settings: no SSR, upload size limit, examples folder allowed, and the sweep of
    abandoned partial uploads on the `delete_cache` schedule (cxr_app/retention.py)."""
    from .retention import lifespan
    from .uploads import MAX_FILE_BYTES

    app_kwargs = dict(kwargs.pop("app_kwargs", None) or {})
    if demo.delete_cache and "lifespan" not in app_kwargs:
        app_kwargs["lifespan"] = lifespan(lambda: demo.GRADIO_CACHE, demo.delete_cache)
    return demo.launch(
        server_name=host or os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1",
        server_port=port,
        ssr_mode=False,
        max_file_size=MAX_FILE_BYTES,
        allowed_paths=[str(demo.cxr_app.examples_dir)],
        footer_links=["api"],
        app_kwargs=app_kwargs,
        **kwargs,
    )


__all__ = ["CxrDemo", "DISCLAIMER", "ModelUnavailable", "build_demo", "launch", "load_classifier", "resolve_source",
           "default_checkpoint", "app_home"]
