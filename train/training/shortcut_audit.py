"""The shortcut audit: does a checkpoint read the lungs, or the collection a film comes from?

Run for every checkpoint (at the end of training on the test split, by `scripts/shortcut_audit.py` on any split)
and stored in `report/metrics.json` under `shortcut_audit`, with its own Markdown section (`markdown`) that the
report, the card and the app's report tab show as they are. Five parts, all on the same images:

1. **Conditions.** The images as they are, with the lung fields hidden, and with only the lung fields visible. The
   lung fields are found per image on the model's input (`modeling_cnn_lstm/lung_region_cnn_lstm.py`, the same
   rule the app and the training augmentation use); hidden pixels take each image's own mean per channel. Per class:
   sensitivity, specificity and one-vs-rest AUC. A class that the model still separates from the others with the
   lungs hidden (AUC >= 0.70, or sensitivity + specificity - 1 >= 0.25) is recognised by what surrounds the lungs:
   a class-level shortcut, whatever the overall accuracy says. The gate of issue 17: lungs hidden, accuracy at most
   chance + 0.07 and COVID-19 sensitivity at most 0.40.
2. **Source probe.** Within each class, a logistic regression on the penultimate features (the dense layer's ReLU
   output) predicts each image's `source`, scored by patient-grouped cross-validation against the majority
   baseline, on the images as they are and with the lungs hidden. A model that does not encode the collection
   cannot name it.
3. **Attribution inside the lungs.** The share of each image's Grad-CAM mass (for the predicted class) inside its
   lung fields, per class and correct/incorrect, beside the fields' share of the image area (what a map that ignored
   anatomy would give). Integrated Gradients (|attribution| summed over channels) on a class-balanced subset.
4. **Per-source confusion matrices.**
5. **One sentence** that says what the numbers mean.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from modeling_cnn_lstm.lung_region_cnn_lstm import evidence_share, find_lung_region
from train.metrics.cxr_metrics.cxr_metrics import compute_classification_metrics

logger = logging.getLogger(__name__)
CONDITIONS = ("original", "lungs_hidden", "lungs_only")
CONDITION_TITLES = {"original": "as is", "lungs_hidden": "lungs hidden", "lungs_only": "only the lungs"}
SHORTCUT_AUC = 0.70  # a class separated this well with the lungs hidden is found without them ...
SHORTCUT_YOUDEN = 0.25  # ... or called this far above its false-alarm rate (sensitivity + specificity - 1)
GATE_ACCURACY_MARGIN = 0.07  # issue 17: lungs hidden, accuracy <= chance + 0.07 ...
GATE_COVID_SENSITIVITY = 0.40  # ... and COVID-19 sensitivity <= 0.40
PROBE_MIN_IMAGES = 4  # a source needs this many images within a class to take part in the probe
REGION_DESCRIPTION = (
    "Lung fields found per image on the model's input (intensity and anatomy, modeling_cnn_lstm/"
    "lung_region_cnn_lstm.py: the same rule as the app and the training augmentation); hidden pixels take each "
    "image's own mean per channel."
)


@dataclass(frozen=True)
class AuditSettings:
    batch_size: int = 16
    ig_per_class: int = 4  # Integrated Gradients on this many images per class (0: skip)
    ig_steps: int = 16
    probe_folds: int = 5
    seed: int = 0


def hide(pixel_values: torch.Tensor, masks: torch.Tensor, condition: str) -> torch.Tensor:
    """(N, C, H, W) -> a copy with the lungs (`lungs_hidden`) or everything else (`lungs_only`) set to each image's
    per-channel mean; `original` is a copy. `masks` (N, H, W) is True inside the lung fields."""
    if condition == "original":
        return pixel_values.clone()
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; expected one of {CONDITIONS}")
    hidden = (masks if condition == "lungs_hidden" else ~masks)[:, None]  # (N, 1, H, W)
    fill = pixel_values.mean(dim=(-2, -1), keepdim=True).expand_as(pixel_values)
    return torch.where(hidden, fill, pixel_values)


def _penultimate(model: torch.nn.Module) -> tuple[list[torch.Tensor], Any]:
    store: list[torch.Tensor] = []
    handle = model.head.activation.register_forward_hook(lambda _m, _i, output: store.append(output.detach()))
    return store, handle


def gradcam_maps(model: torch.nn.Module, pixel_values: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al.) on the trunk's last feature map, for `targets`, upsampled to the input: (N, H, W).
    The same quantity as the app's Captum `LayerGradCam` on that map (tests/training/test_shortcut_audit.py)."""
    with torch.no_grad():
        feature_map = model.forward_features(pixel_values)
    feature_map = feature_map.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model.forward_head(feature_map)
        (gradients,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), feature_map)
    weights = gradients.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * feature_map).sum(dim=1, keepdim=True)).detach()
    cam = torch.nn.functional.interpolate(cam, size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)
    return cam[:, 0]


def share_inside(maps: torch.Tensor, masks: torch.Tensor) -> np.ndarray:
    """Per image, the share of a map's positive mass inside the lung mask (NaN where the map is all zero)."""
    return evidence_share(maps, masks).cpu().numpy()


def _integrated_gradients(model: torch.nn.Module, pixel_values: torch.Tensor, targets: torch.Tensor, steps: int):
    from captum.attr import IntegratedGradients

    def logits_of(inputs: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=inputs).logits

    attributions = IntegratedGradients(logits_of).attribute(
        pixel_values, baselines=torch.zeros_like(pixel_values), target=targets, n_steps=steps, internal_batch_size=8
    )
    return attributions.abs().sum(dim=1)  # (N, H, W)


@dataclass
class _Collected:
    logits: dict[str, np.ndarray]
    features: dict[str, np.ndarray]
    gradcam_share: np.ndarray
    area: np.ndarray
    fallback: np.ndarray
    ig_share: dict[int, float]


def _collect(
    model: torch.nn.Module, processor: Any, images: Sequence[Any], labels: np.ndarray, settings: AuditSettings
) -> _Collected:
    device = next(model.parameters()).device
    logits: dict[str, list[np.ndarray]] = {name: [] for name in CONDITIONS}
    features: dict[str, list[np.ndarray]] = {name: [] for name in CONDITIONS}
    shares, areas, fallbacks, ig_share = [], [], [], {}
    rng = np.random.default_rng(settings.seed)
    ig_indices = set()
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        ig_indices.update(rng.choice(members, min(settings.ig_per_class, len(members)), replace=False).tolist())
    for start in range(0, len(images), settings.batch_size):
        batch = processor(images=list(images[start : start + settings.batch_size]), return_tensors="pt")
        pixel_values = batch["pixel_values"].to(device)
        regions = [find_lung_region(image) for image in pixel_values.cpu()]
        masks = torch.stack([region.mask for region in regions]).to(device)
        areas += [region.area_fraction for region in regions]
        fallbacks += [any(region.fallback) for region in regions]
        for name in CONDITIONS:
            store, handle = _penultimate(model)
            try:
                with torch.inference_mode():
                    batch_logits = model(pixel_values=hide(pixel_values, masks, name)).logits
            finally:
                handle.remove()
            logits[name].append(batch_logits.float().cpu().numpy())
            features[name].append(store[-1].float().cpu().numpy())
        predicted = torch.as_tensor(logits["original"][-1].argmax(axis=1), device=device)
        shares.append(share_inside(gradcam_maps(model, pixel_values, predicted), masks))
        chosen = [i for i in range(len(pixel_values)) if start + i in ig_indices]
        if chosen:
            index = torch.as_tensor(chosen, device=device)
            ig = _integrated_gradients(model, pixel_values[index], predicted[index], settings.ig_steps)
            for position, value in zip(chosen, share_inside(ig, masks[index]), strict=True):
                ig_share[start + position] = float(value)
        logger.info("audited %d / %d images", min(start + settings.batch_size, len(images)), len(images))
    return _Collected(
        logits={name: np.concatenate(chunks).astype(np.float64) for name, chunks in logits.items()},
        features={name: np.concatenate(chunks) for name, chunks in features.items()},
        gradcam_share=np.concatenate(shares),
        area=np.asarray(areas),
        fallback=np.asarray(fallbacks),
        ig_share=ig_share,
    )


def _conditions(logits: dict[str, np.ndarray], labels: np.ndarray, names: list[str]) -> dict[str, Any]:
    result = {}
    for condition, values in logits.items():
        metrics = compute_classification_metrics(values, labels, names, input_type="logits")
        result[condition] = {
            "accuracy": metrics["accuracy"],
            "macro_f1": metrics["macro_f1"],
            **{key: {name: metrics["per_class"][name][key] for name in names}
               for key in ("sensitivity", "specificity", "auc")},
        }  # fmt: skip
    return result


def _probe(features: np.ndarray, sources: Sequence[str], groups: Sequence[str], folds: int, seed: int) -> dict:
    """Patient-grouped CV accuracy of a logistic regression naming the source, against the majority baseline."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    counts = Counter(sources)
    kept = np.asarray([counts[source] >= PROBE_MIN_IMAGES for source in sources], dtype=bool)
    sources_kept = np.asarray(sources)[kept]
    if len(set(sources_kept)) < 2:
        return {"n": int(kept.sum()), "sources": dict(counts), "accuracy": None, "majority_baseline": None}
    x, y, g = features[kept], sources_kept, np.asarray(groups)[kept]
    splits = min(folds, min(Counter(y).values()), len(set(g)))
    if splits < 2:
        return {"n": int(len(y)), "sources": dict(Counter(y)), "accuracy": None, "majority_baseline": None}
    predicted = np.empty(len(y), dtype=object)
    for train, test in StratifiedGroupKFold(splits, shuffle=True, random_state=seed).split(x, y, g):
        if len(set(y[train])) < 2:
            predicted[test] = y[train][0]
            continue
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
        predicted[test] = probe.fit(x[train], y[train]).predict(x[test])
    majority = max(Counter(y).values()) / len(y)
    per_source = {source: float(np.mean(predicted[y == source] == source)) for source in sorted(set(y))}
    return {
        "n": int(len(y)),
        "sources": dict(sorted(Counter(y).items())),
        "accuracy": float(np.mean(predicted == y)),
        "majority_baseline": float(majority),
        "balanced_accuracy": float(np.mean(list(per_source.values()))),
        "chance_balanced": 1.0 / len(per_source),
        "folds": int(splits),
    }


def _source_probe(collected: _Collected, labels, sources, groups, names, settings: AuditSettings) -> dict[str, Any]:
    result = {}
    for condition in ("original", "lungs_hidden"):
        per_class = {}
        for index, name in enumerate(names):
            members = np.flatnonzero(labels == index)
            per_class[name] = _probe(
                collected.features[condition][members],
                [sources[i] for i in members],
                [groups[i] for i in members],
                settings.probe_folds,
                settings.seed,
            )
        result[condition] = per_class
    return result


def _mean(values: np.ndarray) -> float | None:
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else None


def _attribution(collected: _Collected, labels: np.ndarray, names: list[str]) -> dict[str, Any]:
    predicted = collected.logits["original"].argmax(axis=1)
    correct = predicted == labels
    share, area = collected.gradcam_share, collected.area
    per_class = {}
    for index, name in enumerate(names):
        members = labels == index
        per_class[name] = {
            outcome: {"n": int((members & chosen).sum()), "gradcam_share": _mean(share[members & chosen]),
                      "area_share": _mean(area[members & chosen])}
            for outcome, chosen in (("correct", correct), ("incorrect", ~correct))
        }  # fmt: skip
    ig_index = np.asarray(sorted(collected.ig_share), dtype=np.int64)
    ig_values = np.asarray([collected.ig_share[i] for i in ig_index], dtype=np.float64)
    return {
        "gradcam_share": _mean(share),
        "area_share": _mean(area),
        "per_class": per_class,
        "integrated_gradients": {
            "n": int(len(ig_index)),
            "share": _mean(ig_values),
            "area_share": _mean(area[ig_index]) if len(ig_index) else None,
        },
        "shares": [None if not math.isfinite(value) else round(float(value), 4) for value in share],
    }


def _per_source_confusion(logits: np.ndarray, labels: np.ndarray, sources: Sequence[str], names: list[str]):
    predicted = logits.argmax(axis=1)
    result = {}
    for source in sorted(set(sources)):
        members = np.asarray([s == source for s in sources])
        matrix = np.zeros((len(names), len(names)), dtype=int)
        np.add.at(matrix, (labels[members], predicted[members]), 1)
        result[source] = matrix.tolist()
    return result


def class_shortcuts(conditions: dict[str, Any], names: list[str]) -> list[dict[str, Any]]:
    """Classes still separated from the others with the lungs hidden: one-vs-rest AUC >= SHORTCUT_AUC, or Youden's
    J (sensitivity + specificity - 1) >= SHORTCUT_YOUDEN, i.e. found far more often than it is wrongly called."""
    hidden, original = conditions["lungs_hidden"], conditions["original"]
    found = []
    for name in names:
        auc, sensitivity = hidden["auc"].get(name), hidden["sensitivity"].get(name)
        specificity = hidden.get("specificity", {}).get(name)
        youden = None if sensitivity is None or specificity is None else sensitivity + specificity - 1.0
        if (auc is not None and auc >= SHORTCUT_AUC) or (youden is not None and youden >= SHORTCUT_YOUDEN):
            found.append({
                "class": name, "auc_hidden": auc, "sensitivity": original["sensitivity"].get(name),
                "sensitivity_hidden": hidden["sensitivity"].get(name),
            })  # fmt: skip
    return found


def gate(conditions: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """Issue 17's pass rule on the lungs-hidden condition (COVID-19 is the first class)."""
    chance = 1.0 / len(names)
    hidden = conditions["lungs_hidden"]
    covid = hidden["sensitivity"].get(names[0])
    accuracy_ok = hidden["accuracy"] <= chance + GATE_ACCURACY_MARGIN
    covid_ok = covid is not None and covid <= GATE_COVID_SENSITIVITY
    return {
        "accuracy_hidden": hidden["accuracy"],
        "accuracy_limit": chance + GATE_ACCURACY_MARGIN,
        f"sensitivity_hidden_{names[0]}": covid,
        "sensitivity_limit": GATE_COVID_SENSITIVITY,
        "passed": bool(accuracy_ok and covid_ok),
        # how far from passing, 0 when it passes: the larger of the two excesses
        "excess": float(max(0.0, hidden["accuracy"] - chance - GATE_ACCURACY_MARGIN,
                            (covid or 0.0) - GATE_COVID_SENSITIVITY)),
    }  # fmt: skip


def interpret(audit: dict[str, Any]) -> str:
    names = audit["label_names"]
    conditions = audit["conditions"]
    chance = 1.0 / len(names)
    original, hidden, only = (conditions[name]["accuracy"] for name in CONDITIONS)
    facts = (
        f"Accuracy {100 * original:.1f}% as is, {100 * hidden:.1f}% with the lung fields hidden, {100 * only:.1f}% "
        f"with only the lung fields visible (chance {100 * chance:.0f}%)."
    )
    if original < chance + 0.15:
        return f"{facts} The model itself is near chance on these images: the audit cannot tell what it relies on."
    sentences = [facts]
    shortcuts = audit["class_shortcuts"]
    if shortcuts:
        listed = "; ".join(
            f"{item['class']} (AUC {100 * item['auc_hidden']:.0f}% without the lungs, sensitivity "
            f"{100 * item['sensitivity']:.0f}% -> {100 * item['sensitivity_hidden']:.0f}%)"
            for item in shortcuts
        )
        sentences.append(
            f"SHORTCUT: {listed} - still found with the lung fields hidden, so recognised from what surrounds the "
            "lungs (markers, borders, text, collection-specific processing, age), not from the lungs."
        )
    else:
        sentences.append("No class is separated from the others with the lungs hidden (all AUCs < 70%).")
    if only >= 0.8 * original and only > chance + 0.1:
        sentences.append("With only the lungs visible it keeps most of its accuracy: the lungs carry its decisions.")
    elif only <= chance + 0.07:
        sentences.append("With only the lungs visible it is at chance: the lungs alone do not carry its decisions.")
    passed = audit["gate"]["passed"]
    sentences.append(
        "It passes the lungs-hidden gate (accuracy <= chance + 7 points, COVID-19 sensitivity <= 40%)."
        if passed
        else "It fails the lungs-hidden gate (accuracy <= chance + 7 points, COVID-19 sensitivity <= 40%)."
    )
    attribution = audit["attribution"]
    if attribution["gradcam_share"] is not None:
        sentences.append(
            f"On average {100 * attribution['gradcam_share']:.0f}% of its Grad-CAM evidence lies inside the lung "
            f"fields, which cover {100 * attribution['area_share']:.0f}% of the image."
        )
    return " ".join(sentences)


EVIDENCE_QUANTILE = 0.10  # the app warns below this quantile of the validation shares ...
EVIDENCE_CAP = 0.5  # ... but never above one half: its sentence says "most of the evidence lies outside"


def evidence_shares(model: torch.nn.Module, processor: Any, images: Sequence[Any], batch_size: int = 16) -> np.ndarray:
    """The share of each image's Grad-CAM evidence (predicted class) inside its lung fields: what the app shows."""
    device = next(model.parameters()).device
    shares = []
    for start in range(0, len(images), batch_size):
        pixel_values = processor(images=list(images[start : start + batch_size]), return_tensors="pt")["pixel_values"]
        pixel_values = pixel_values.to(device)
        masks = torch.stack([find_lung_region(image).mask for image in pixel_values.cpu()]).to(device)
        with torch.no_grad():
            predicted = model(pixel_values=pixel_values).logits.argmax(dim=1)
        shares.append(share_inside(gradcam_maps(model, pixel_values, predicted), masks))
    return np.concatenate(shares) if shares else np.zeros(0)


def evidence_threshold(shares: Sequence[float | None], split: str = "validation") -> dict[str, Any]:
    """The app's warning threshold from a split's lung-evidence shares (`report["lung_evidence"]`)."""
    values = np.asarray([value for value in shares if value is not None and math.isfinite(value)], dtype=np.float64)
    if not len(values):
        return {"threshold": EVIDENCE_CAP, "quantile": EVIDENCE_QUANTILE, "split": split, "n": 0}
    quantile = float(np.quantile(values, EVIDENCE_QUANTILE))
    return {
        "threshold": min(EVIDENCE_CAP, quantile),
        "quantile": EVIDENCE_QUANTILE,
        "quantile_value": quantile,
        "median": float(np.median(values)),
        "split": split,
        "n": int(len(values)),
        "rule": f"min({EVIDENCE_CAP}, the {EVIDENCE_QUANTILE:.0%} quantile of the {split} shares)",
    }


def run_audit(
    model: torch.nn.Module,
    processor: Any,
    images: Sequence[Any],
    labels: np.ndarray,
    sources: Sequence[str],
    groups: Sequence[str],
    label_names: list[str],
    split: str,
    settings: AuditSettings | None = None,
) -> dict[str, Any]:
    """The whole audit of one model on one set of images (eval mode, float32); a JSON-ready dict with `markdown`."""
    settings = settings or AuditSettings()
    labels = np.asarray(labels, dtype=np.int64)
    model.eval()
    collected = _collect(model, processor, images, labels, settings)
    conditions = _conditions(collected.logits, labels, label_names)
    audit: dict[str, Any] = {
        "split": split,
        "num_samples": int(len(labels)),
        "label_names": list(label_names),
        "region": REGION_DESCRIPTION,
        "region_area_share": float(collected.area.mean()),
        "region_fallback_share": float(collected.fallback.mean()),
        "conditions": conditions,
        "class_shortcuts": class_shortcuts(conditions, label_names),
        "gate": gate(conditions, label_names),
        "source_probe": _source_probe(collected, labels, sources, groups, label_names, settings),
        "attribution": _attribution(collected, labels, label_names),
        "per_source_confusion": _per_source_confusion(collected.logits["original"], labels, sources, label_names),
    }
    audit["interpretation"] = interpret(audit)
    audit["markdown"] = render_markdown(audit)
    return audit


def _percent(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def render_markdown(audit: dict[str, Any]) -> str:
    """The audit's own Markdown section (the report, the card and the app's report tab show it as it is)."""
    names = audit["label_names"]
    lines = [
        f"{audit['num_samples']} `{audit['split']}` images. {audit['region']} The lung fields cover "
        f"{_percent(audit['region_area_share'])}% of the input on average; "
        f"{_percent(audit['region_fallback_share'])}% of images used the fixed-ellipse fallback on at least one side.",
        "",
        audit["interpretation"],
        "",
        "| Condition | Accuracy | Macro F1 | " + " | ".join(f"Sens. / AUC {name}" for name in names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for condition, values in audit["conditions"].items():
        cells = " | ".join(f"{_percent(values['sensitivity'][n])} / {_percent(values['auc'][n])}" for n in names)
        lines.append(
            f"| {CONDITION_TITLES.get(condition, condition)} | {_percent(values['accuracy'])} | "
            f"{_percent(values['macro_f1'])} | {cells} |"
        )
    lines += [
        "",
        "**Source probe** (logistic regression on the penultimate features naming each image's collection, within "
        "each class, patient-grouped cross-validation; sources with at least "
        f"{PROBE_MIN_IMAGES} images in the class):",
        "",
        "| Class | Sources (images) | Majority baseline | Probe, as is | Probe, lungs hidden | Balanced accuracy "
        "(chance), as is / lungs hidden |",
        "|---|---|---|---|---|---|",
    ]
    probe = audit["source_probe"]
    for name in names:
        as_is, hidden = probe["original"][name], probe["lungs_hidden"][name]
        listed = ", ".join(f"{source} ({count})" for source, count in as_is["sources"].items())
        lines.append(
            f"| {name} | {listed} | {_percent(as_is['majority_baseline'])} | {_percent(as_is['accuracy'])} | "
            f"{_percent(hidden['accuracy'])} | {_percent(as_is.get('balanced_accuracy'))} / "
            f"{_percent(hidden.get('balanced_accuracy'))} ({_percent(as_is.get('chance_balanced'))}) |"
        )
    attribution = audit["attribution"]
    lines += [
        "",
        "**Evidence inside the lung fields** (share of the attribution mass inside the fields; the fields' share of "
        "the image area is what a map blind to anatomy would give):",
        "",
        "| Class | Correct: n, Grad-CAM share, area share | Incorrect: n, Grad-CAM share, area share |",
        "|---|---|---|",
    ]
    for name in names:
        cells = [
            f"{item['n']}, {_percent(item['gradcam_share'])}%, {_percent(item['area_share'])}%"
            for item in (attribution["per_class"][name]["correct"], attribution["per_class"][name]["incorrect"])
        ]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    ig = attribution["integrated_gradients"]
    lines += [
        "",
        f"All images: Grad-CAM share {_percent(attribution['gradcam_share'])}% (area "
        f"{_percent(attribution['area_share'])}%). Integrated Gradients on {ig['n']} images: share "
        f"{_percent(ig['share'])}% (area {_percent(ig['area_share'])}%).",
        "",
        "**Per-source confusion matrices** (rows: true class, columns: predicted; order " + ", ".join(names) + "):",
        "",
        "| Source | Confusion matrix |",
        "|---|---|",
    ]
    for source, matrix in audit["per_source_confusion"].items():
        lines.append(f"| {source} | " + " / ".join(" ".join(str(v) for v in row) for row in matrix) + " |")
    return "\n".join(lines) + "\n"
