"""Predictive values against hand-worked values, and the shipped report read as the page would."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from cxr_app.prevalence import ClassRates, class_rates, predictive_values, reading

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("sensitivity", "specificity", "prevalence", "ppv", "npv"),
    [
        # 0.9*0.1 = 0.09 true positives, 0.2*0.9 = 0.18 false positives -> 0.09/0.27; 0.72/(0.72+0.01)
        (0.9, 0.8, 0.1, 1 / 3, 0.72 / 0.73),
        # 0.5*0.5 = 0.25, 0.05*0.5 = 0.025 -> 0.25/0.275; 0.475/(0.475+0.25)
        (0.5, 0.95, 0.5, 0.25 / 0.275, 0.475 / 0.725),
        # a perfect test: both 1 at any prevalence strictly between 0 and 1
        (1.0, 1.0, 0.3, 1.0, 1.0),
        # 0.99*0.01 = 0.0099 vs 0.01*0.99 = 0.0099: a 99%/99% test at 1% prevalence is right half the time
        (0.99, 0.99, 0.01, 0.5, 0.9801 / (0.9801 + 0.0001)),
    ],
)
def test_hand_worked_values(sensitivity, specificity, prevalence, ppv, npv):
    assert predictive_values(sensitivity, specificity, prevalence) == pytest.approx((ppv, npv), abs=1e-12)


def test_undefined_and_invalid_values():
    ppv, npv = predictive_values(0.0, 1.0, 0.2)  # never called: PPV undefined
    assert math.isnan(ppv) and npv == pytest.approx(0.8)
    for bad in (-0.1, 1.5, float("nan"), "0.5", None):
        with pytest.raises(ValueError, match="must be a number in"):
            predictive_values(0.9, 0.9, bad)


def test_shipped_report_gives_the_rates_and_a_sentence(tmp_path):
    rates = class_rates(REPO_ROOT / "checkpoints" / "cnn-lstm-cxr3")
    assert set(rates) == {"COVID-19", "Normal", "Pneumonia"}
    covid = rates["COVID-19"]
    assert covid == ClassRates(pytest.approx(0.9028, abs=1e-4), pytest.approx(0.6861, abs=1e-4))  # 65/72, 94/137
    text = reading("COVID-19", covid, 0.05)
    ppv, npv = predictive_values(covid.sensitivity, covid.specificity, 0.05)
    assert f"right about {ppv:.0%}" in text and f"about {npv:.0%} (NPV)" in text and "5% prevalence" in text
    assert class_rates(tmp_path) is None  # no report: the page says so instead
