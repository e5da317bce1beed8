"""train/training/shortcut_audit.py: conditions, the gate and class-shortcut rules, the source probe, Grad-CAM equal
to the app's, and a whole audit of a tiny model on real X-rays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from train.training import shortcut_audit as audit

NAMES = ["COVID-19", "Normal", "Pneumonia"]


def condition(accuracy: float, sensitivity: tuple, specificity: tuple = (0.5, 0.5, 0.5), auc: tuple = (0.5,) * 3):
    return {
        "accuracy": accuracy,
        "macro_f1": accuracy,
        "sensitivity": dict(zip(NAMES, sensitivity, strict=True)),
        "specificity": dict(zip(NAMES, specificity, strict=True)),
        "auc": dict(zip(NAMES, auc, strict=True)),
    }


def test_hide_changes_exactly_the_chosen_pixels():
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(2, 3, 16, 16, generator=generator)
    masks = torch.zeros(2, 16, 16, dtype=torch.bool)
    masks[0, 4:10, 2:7] = True
    masks[1, 8:, 8:] = True
    mean = pixel_values.mean(dim=(-2, -1), keepdim=True).expand_as(pixel_values)
    for name, hidden in (("lungs_hidden", masks), ("lungs_only", ~masks)):
        out = audit.hide(pixel_values, masks, name)
        region = hidden[:, None].expand_as(pixel_values)
        assert torch.equal(out[region], mean[region]) and torch.equal(out[~region], pixel_values[~region])
    assert torch.equal(audit.hide(pixel_values, masks, "original"), pixel_values)
    with pytest.raises(ValueError, match="unknown condition"):
        audit.hide(pixel_values, masks, "lungs")


def test_the_shipped_models_case_is_a_class_shortcut_and_fails_the_gate():
    """Overall accuracy near chance with the lungs hidden, yet COVID-19 still found (the v1 model's audit): the
    sentence names the class, whatever the overall accuracy says."""
    conditions = {
        "original": condition(0.73, (0.90, 0.65, 0.64), auc=(0.92, 0.88, 0.82)),
        "lungs_hidden": condition(0.445, (0.82, 0.49, 0.03), (0.55, 0.7, 0.99), auc=(0.80, 0.6, 0.55)),
        "lungs_only": condition(0.34, (0.99, 0.02, 0.0)),
    }
    found = audit.class_shortcuts(conditions, NAMES)
    assert [item["class"] for item in found] == ["COVID-19"]
    gate = audit.gate(conditions, NAMES)
    assert not gate["passed"] and gate["excess"] == pytest.approx(0.42)
    report = {"label_names": NAMES, "conditions": conditions, "class_shortcuts": found, "gate": gate,
              "attribution": {"gradcam_share": 0.3, "area_share": 0.37}}  # fmt: skip
    text = audit.interpret(report)
    assert "SHORTCUT: COVID-19" in text and "82%" in text and "fails the lungs-hidden gate" in text
    assert "30% of its Grad-CAM evidence" in text


def test_a_model_that_reads_the_lungs_passes():
    conditions = {
        "original": condition(0.82, (0.9, 0.8, 0.75), auc=(0.95, 0.9, 0.88)),
        "lungs_hidden": condition(0.36, (0.3, 0.4, 0.38), auc=(0.6, 0.55, 0.5)),
        "lungs_only": condition(0.74, (0.85, 0.7, 0.66)),
    }
    found = audit.class_shortcuts(conditions, NAMES)
    gate = audit.gate(conditions, NAMES)
    assert found == [] and gate["passed"] and gate["excess"] == 0.0
    report = {"label_names": NAMES, "conditions": conditions, "class_shortcuts": found, "gate": gate,
              "attribution": {"gradcam_share": None}}  # fmt: skip
    text = audit.interpret(report)
    assert "No class is separated" in text and "passes the lungs-hidden gate" in text
    assert "keeps most of its accuracy" in text
    near_chance = dict(conditions, original=condition(0.36, (0.3, 0.4, 0.38)))
    assert "near chance" in audit.interpret(dict(report, conditions=near_chance))


def test_source_probe_names_an_encoded_source_and_not_a_hidden_one():
    rng = np.random.default_rng(0)
    sources = ["a"] * 30 + ["b"] * 30 + ["rare"] * 2  # a source with < 4 images is left out
    groups = [f"p{i}" for i in range(62)]
    encoded = rng.normal(size=(62, 8))
    encoded[:30, 0] += 4.0  # the first feature names the source
    found = audit._probe(encoded, sources, groups, folds=5, seed=0)
    assert found["n"] == 60 and found["sources"] == {"a": 30, "b": 30}
    assert found["majority_baseline"] == 0.5 and found["accuracy"] > 0.9
    blind = audit._probe(rng.normal(size=(62, 8)), sources, groups, folds=5, seed=0)
    assert blind["accuracy"] < 0.75
    one = audit._probe(encoded[:30], sources[:30], groups[:30], folds=5, seed=0)
    assert one["accuracy"] is None  # one source: nothing to tell apart
    none = audit._probe(encoded[:0], [], [], folds=5, seed=0)  # a class absent from the split
    assert none["n"] == 0 and none["accuracy"] is None


def test_gradcam_equals_the_apps_captum_gradcam(make_checkpoint, tmp_path):
    """The audit's batched Grad-CAM and the app's Captum LayerGradCam give the same map (so the audit's share and
    the share shown beside each prediction measure the same thing)."""
    from cxr_app.saliency import Explainer
    from modeling_cnn_lstm import CnnLstmForImageClassification

    folder = tmp_path / "tiny"
    make_checkpoint(folder)
    model = CnnLstmForImageClassification.from_pretrained(folder).eval()
    pixel_values = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([0, 2, 1])
    ours = audit.gradcam_maps(model, pixel_values, targets)
    explainer = Explainer(model)
    for index in range(3):
        _, cam, target = explainer.gradcam_with_logits(pixel_values[index : index + 1], int(targets[index]))
        assert target == int(targets[index])
        assert torch.allclose(ours[index], cam, atol=1e-5, rtol=1e-4)


@pytest.mark.shared_data
def test_whole_audit_of_a_tiny_model_on_real_xrays(make_checkpoint, xray_paths, tmp_path):
    from PIL import Image

    from modeling_cnn_lstm import CnnLstmForImageClassification, CnnLstmImageProcessor

    folder = tmp_path / "tiny"
    make_checkpoint(folder)
    model = CnnLstmForImageClassification.from_pretrained(folder).eval()
    processor = CnnLstmImageProcessor.from_model_config(model.config)
    paths = [path for label in ("covid19", "normal", "pneumonia") for path in xray_paths[label]]
    images = [Image.open(path) for path in paths]
    labels = np.repeat([0, 1, 2], 4)
    sources = [path.name.split("_")[0] for path in paths]
    result = audit.run_audit(model, processor, images, labels, sources, [p.name for p in paths], NAMES, "x",
                             audit.AuditSettings(batch_size=5, ig_per_class=1, ig_steps=4))  # fmt: skip
    assert set(result["conditions"]) == set(audit.CONDITIONS) and result["num_samples"] == 12
    assert 0.1 < result["region_area_share"] < 0.7
    attribution = result["attribution"]
    assert attribution["integrated_gradients"]["n"] == 3 and len(attribution["shares"]) == 12
    assert set(result["source_probe"]) == {"original", "lungs_hidden"}
    assert set(result["per_source_confusion"]) == set(sources)
    assert sum(np.sum(matrix) for matrix in result["per_source_confusion"].values()) == 12
    markdown = result["markdown"]
    assert "| lungs hidden |" in markdown and "Source probe" in markdown and "Per-source confusion" in markdown
    assert result["interpretation"] in markdown
