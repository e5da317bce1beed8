"""scripts/shortcut_audit.py: the fixed lung mask changes exactly the pixels it should; three conditions reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

LABEL_NAMES = ["COVID-19", "Normal", "Pneumonia"]


@pytest.fixture(scope="module")
def audit(load_script):
    return load_script("scripts/shortcut_audit.py")


def test_lung_mask_geometry(audit):
    mask = audit.lung_mask(224, 224)
    assert mask.shape == (224, 224) and mask.dtype == torch.bool
    assert mask[int(0.48 * 224), int(0.30 * 224)] and mask[int(0.48 * 224), int(0.70 * 224)]  # lung centres
    assert not mask[int(0.48 * 224), 112]  # mediastinum between the two ellipses
    assert not mask[:20].any() and not mask[-20:].any() and not mask[:, :20].any() and not mask[:, -20:].any()
    assert torch.equal(mask, mask.flip(-1))  # left-right symmetric
    assert 0.2 < mask.float().mean() < 0.4


@pytest.mark.parametrize("condition", ["lungs_masked", "lungs_only"])
def test_mask_changes_only_its_pixels(audit, condition: str):
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(2, 3, 32, 32, generator=generator)
    masked = audit.apply_condition(pixel_values, condition)
    inside = audit.lung_mask(32, 32)
    hidden = inside if condition == "lungs_masked" else ~inside
    mean = pixel_values.mean(dim=(-2, -1), keepdim=True).expand_as(pixel_values)
    assert torch.equal(masked[..., ~hidden], pixel_values[..., ~hidden])  # untouched elsewhere
    assert torch.equal(masked[..., hidden], mean[..., hidden])  # each image's own per-channel mean
    assert not torch.equal(masked, pixel_values)
    assert torch.equal(audit.apply_condition(pixel_values, "original"), pixel_values)
    with pytest.raises(ValueError, match="unknown condition"):
        audit.apply_condition(pixel_values, "lungs")


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory, run_main, tiny_args) -> Path:
    output_dir = tmp_path_factory.mktemp("audit-tiny-run")
    return run_main(tiny_args(tiny_corpus, output_dir, "--bootstrap_samples", "0"))


@pytest.mark.shared_data
def test_audit_reports_three_conditions_on_real_images(
    audit, tiny_checkpoint: Path, tiny_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    result = audit.main(["--model", str(tiny_checkpoint), "--data_dir", str(tiny_corpus), "--output_dir",
                         str(tmp_path)])  # fmt: skip
    printed = json.loads(capsys.readouterr().out)  # stdout is one JSON object
    assert printed == json.loads(json.dumps(result))
    assert set(printed["conditions"]) == {"original", "lungs_masked", "lungs_only"}
    for values in printed["conditions"].values():
        assert 0.0 <= values["accuracy"] <= 1.0 and 0.0 <= values["macro_f1"] <= 1.0
        assert set(values["sensitivity"]) == set(LABEL_NAMES)
    assert printed["num_samples"] > 0 and "ellipses" in printed["mask"] and printed["interpretation"]
    assert json.loads((tmp_path / "shortcut_audit.json").read_text()) == printed
    assert "| lungs_masked |" in (tmp_path / "shortcut_audit.md").read_text()
    with Image.open(tmp_path / "shortcut_audit_mask.png") as image:
        image.verify()


def test_interpretation_flags_a_shortcut(audit):
    def condition(accuracy: float) -> dict:
        return {"accuracy": accuracy}

    shortcut = {"original": condition(0.9), "lungs_masked": condition(0.85), "lungs_only": condition(0.6)}
    assert "shortcut" in audit.interpret(shortcut, 3)
    honest = {"original": condition(0.9), "lungs_masked": condition(0.35), "lungs_only": condition(0.7)}
    assert "depends on the lung fields" in audit.interpret(honest, 3)
    untrained = {"original": condition(0.34), "lungs_masked": condition(0.34), "lungs_only": condition(0.34)}
    assert "near chance" in audit.interpret(untrained, 3)
    assert "class-level shortcut" not in audit.interpret(honest, 3)


def test_interpretation_flags_a_class_that_needs_no_lungs(audit):
    """Overall accuracy near chance with the lungs masked, but one class still found: the shipped model's case."""
    def condition(accuracy: float, covid: float, normal: float, pneumonia: float) -> dict:
        return {"accuracy": accuracy, "sensitivity": {"COVID-19": covid, "Normal": normal, "Pneumonia": pneumonia}}

    conditions = {
        "original": condition(0.73, 0.90, 0.65, 0.64),
        "lungs_masked": condition(0.445, 0.82, 0.49, 0.03),
        "lungs_only": condition(0.34, 0.99, 0.02, 0.0),
    }
    text = audit.interpret(conditions, 3)
    assert "class-level shortcut" in text and "COVID-19 90% -> 82%" in text and "Normal" not in text.split("(")[2]
    conditions["lungs_masked"] = condition(0.40, 0.50, 0.49, 0.20)  # every class falls: no class-level shortcut
    assert "class-level shortcut" not in audit.interpret(conditions, 3)
