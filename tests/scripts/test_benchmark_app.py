"""scripts/benchmark_app.py --fairness on a tiny checkpoint: a real `python app.py`, normal users predicting beside
clients looping on Integrated Gradients; the normal users see no errors and the loopers meet the rate limit."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_fairness_mode(tmp_path, make_checkpoint, load_script):
    make_checkpoint(tmp_path / "checkpoint")
    output = tmp_path / "fairness.json"
    result = load_script("scripts/benchmark_app.py").main([
        "--fairness", "--model", str(tmp_path / "checkpoint"), "--normal_clients", "2", "--heavy_clients", "2",
        "--baseline_s", "2", "--duration_s", "8", "--think_s", "0.2", "--gradcam_every", "2",
        "--output_json", str(output),
    ])  # fmt: skip
    assert json.loads(output.read_text()) == json.loads(json.dumps(result))
    assert result["normal_errors"] == []
    assert result["predict"]["baseline"]["n"] > 0 and result["predict"]["under load"]["n"] > 0
    assert result["gradcam"]["under load"]["n"] > 0
    heavy = result["heavy"]
    assert heavy["other_errors"] == [] and heavy["refused_in_queue"] == 0
    assert 1 <= heavy["served"] <= 6  # at most 3 per client in any 2 minutes
    assert heavy["served"] < 6 or heavy["rate_limited"] > 0
