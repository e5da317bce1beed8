"""Prevalence-aware reading of a prediction: the model's test sensitivity and specificity for a class turned into
positive and negative predictive values at a prevalence the user chooses (Bayes' rule, computed, not looked up).

Why: "COVID-19, 90% sensitive" says little on its own. At 5% prevalence a class called with sensitivity 0.90 and
specificity 0.81 is right only ~20% of the times it is called (PPV), while a "not this class" answer is right ~99%
of the time (NPV). The numbers come from the served checkpoint's own report (report/metrics.json, test split).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PREVALENCE = 0.05  # a documented, deliberately modest default; the user sets their own setting's value


@dataclass(frozen=True)
class ClassRates:
    sensitivity: float
    specificity: float


def predictive_values(sensitivity: float, specificity: float, prevalence: float) -> tuple[float, float]:
    """(PPV, NPV) = (P(class | called), P(not class | not called)) at `prevalence`; ValueError on values outside
    [0, 1]. Where nothing is ever called (or never not called) the undefined value is NaN."""
    for name, value in (("sensitivity", sensitivity), ("specificity", specificity), ("prevalence", prevalence)):
        if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
            raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    true_positive = sensitivity * prevalence
    false_positive = (1.0 - specificity) * (1.0 - prevalence)
    true_negative = specificity * (1.0 - prevalence)
    false_negative = (1.0 - sensitivity) * prevalence
    called, not_called = true_positive + false_positive, true_negative + false_negative
    ppv = true_positive / called if called > 0 else math.nan
    npv = true_negative / not_called if not_called > 0 else math.nan
    return ppv, npv


def class_rates(checkpoint: str | Path) -> dict[str, ClassRates] | None:
    """Per-class test sensitivity/specificity from `<checkpoint>/report/metrics.json`, or None without a report."""
    from .report_view import REPORT_SUBDIR, load_report

    report = load_report(Path(checkpoint) / REPORT_SUBDIR if (Path(checkpoint) / REPORT_SUBDIR).is_dir() else None)
    return rates_from_metrics(report.data) if report else None


def rates_from_metrics(data: dict) -> dict[str, ClassRates] | None:
    """Per-class sensitivity/specificity from a loaded metrics.json, or None when it lacks them."""
    try:
        per_class = data["metrics"]["per_class"]
        return {label: ClassRates(float(rates["sensitivity"]), float(rates["specificity"]))
                for label, rates in per_class.items()}
    except (KeyError, TypeError, ValueError):
        return None


def percent_text(fraction: float) -> str:
    """0.05 -> "5%", 0.005 -> "0.5%", NaN -> "n/a" (a prevalence slider goes below 1%)."""
    return "n/a" if math.isnan(fraction) else f"{100 * fraction:.2g}%" if fraction < 0.1 else f"{100 * fraction:.0f}%"


def reading(label: str, rates: ClassRates, prevalence: float) -> str:
    """One sentence for the page next to the prediction."""
    ppv, npv = predictive_values(rates.sensitivity, rates.specificity, prevalence)
    return (
        f"At a {percent_text(prevalence)} prevalence of {label}, a {label} call by this model is right about "
        f"{percent_text(ppv)} of the time (PPV) and a not-{label} call about {percent_text(npv)} (NPV), from its "
        f"test sensitivity {percent_text(rates.sensitivity)} and specificity {percent_text(rates.specificity)}."
    )
