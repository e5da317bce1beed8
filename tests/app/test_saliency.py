"""Saliency: each method finds the one region a stand-in model uses, Grad-CAM equals Captum's on the last block,
and the overlay puts the map back where it belongs (stretch and pad, non-square images)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cxr_app.saliency import (
    GRAD_CAM,
    METHODS,
    UNCOLOURED_BELOW,
    Explainer,
    colour_bar_html,
    colourise,
    map_to_image,
    render_overlay,
)
from modeling_cnn_lstm import CnnLstmForImageClassification, CnnLstmLogits


class TopLeftModel(nn.Module):
    """Scores class 0 by what a "trunk" channel sees in the top-left quarter only; a second channel sees everything
    and is ignored by the head. Every faithful method must point at the top-left; a bright bottom-right patch that
    the model ignores must stay dark."""

    def __init__(self, size: int = 32) -> None:
        super().__init__()
        self.config = SimpleNamespace(image_size=size, feature_map_size=size // 4)
        self.gain = nn.Parameter(torch.ones(()))

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # (batch, C, 32, 32) -> (batch, 2, 8, 8): channel 0 masked to the top-left quarter, channel 1 unmasked
        pooled = F.avg_pool2d(pixel_values.mean(dim=1, keepdim=True), 4)
        mask = torch.zeros_like(pooled)
        mask[..., :4, :4] = 1
        return torch.cat([pooled * mask, pooled], dim=1)

    def forward_head(self, feature_map: torch.Tensor) -> torch.Tensor:
        score = feature_map[:, 0].mean(dim=(1, 2)) * self.gain
        return torch.stack([score, torch.zeros_like(score), -score], dim=1)

    def forward(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.forward_head(self.forward_features(pixel_values)))


def two_patch_input() -> torch.Tensor:
    pixels = torch.zeros(1, 3, 32, 32)
    pixels[..., 4:12, 4:12] = 1.0  # top-left: the evidence
    pixels[..., 20:28, 20:28] = 1.0  # bottom-right: ignored by the model
    return pixels


@pytest.mark.parametrize("method", METHODS)
def test_each_method_points_at_the_evidence(method):
    reports = []
    saliency, target = Explainer(TopLeftModel()).attribute(
        two_patch_input(), method, target=None, progress=lambda fraction, label: reports.append((fraction, label))
    )
    assert target == 0 and saliency.shape == (32, 32)
    assert saliency.min() >= 0 and saliency.max() == pytest.approx(1.0)
    top_left, bottom_right = saliency[:16, :16].mean(), saliency[16:, 16:].mean()
    assert top_left > 0.1 and bottom_right < 0.05 * top_left, (top_left, bottom_right)
    if method != "Grad-CAM":
        assert reports[-1] == (pytest.approx(1.0), method)


def test_gradcam_equals_captum_on_the_last_conv_block(tmp_path, monkeypatch, make_checkpoint):
    from captum.attr import LayerAttribution, LayerGradCam

    from modeling_cnn_lstm import fast_inference_cnn_lstm

    # exact fp32 even where the CPU has native bf16 (a bf16 trunk would be ~1e-2 off)
    monkeypatch.setattr(fast_inference_cnn_lstm, "cpu_has_native_bf16", lambda flags=None: True)
    make_checkpoint(tmp_path)  # saliency runs the model's fp32 graph: an exact comparison
    model = CnnLstmForImageClassification.from_pretrained(tmp_path).eval()
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ours, target = Explainer(model).attribute(pixels, "Grad-CAM", target=2)
    reference = LayerGradCam(CnnLstmLogits(model), model.cnn_lstm.encoder.blocks[-1]).attribute(
        pixels, target=2, relu_attributions=True
    )
    reference = LayerAttribution.interpolate(reference, (32, 32), interpolate_mode="bilinear")[0, 0]
    assert target == 2 and reference.max() > 0
    np.testing.assert_allclose(ours, (reference / reference.max()).detach().numpy(), atol=1e-5)
    assert not model.training  # eval mode throughout


def test_predicted_target_is_the_models_answer(tmp_path, make_checkpoint):
    make_checkpoint(tmp_path)
    model = CnnLstmForImageClassification.from_pretrained(tmp_path).eval()
    for seed in range(3):
        pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            expected = int(model(pixel_values=pixels).logits.argmax())
        for method in METHODS:
            assert Explainer(model).attribute(pixels, method)[1] == expected


@pytest.mark.parametrize("resize_mode", ["stretch", "pad"])
def test_overlay_maps_back_to_the_image(resize_mode):
    height, width = 60, 150  # wide: pad mode puts the content in rows 10..22 of a 32x32 input
    saliency = np.zeros((32, 32), np.float32)
    if resize_mode == "stretch":
        saliency[:8, :8] = 1.0  # top-left of the input = top-left of the image
    else:
        box = round(height * 32 / width)  # the processor's centred box: 13 rows
        top = (32 - box) // 2
        saliency[top : top + box // 2, :8] = 1.0
        saliency[:top] = 1.0  # padding: must be cut away, never drawn
    mapped = map_to_image(saliency, height, width, resize_mode)
    assert mapped.shape == (height, width)
    assert mapped[: height // 5, : width // 6].mean() > 0.8 and mapped[:, width // 3 :].max() < 0.05
    grey = np.full((height, width), 100, np.uint8)
    overlay = np.asarray(render_overlay(grey, saliency, resize_mode), np.int16)
    assert overlay.shape == (height, width, 3)
    changed = np.abs(overlay - 100).sum(-1) > 10
    assert changed[: height // 5, : width // 6].mean() > 0.8 and not changed[:, width // 3 :].any()
    plain = np.asarray(render_overlay(grey, None))
    assert (plain == 100).all()


def test_large_images_are_shown_at_most_768_px():
    overlay = render_overlay(np.zeros((2000, 1000), np.uint8), np.ones((32, 32), np.float32))
    assert overlay.size == (384, 768)


def test_weak_areas_stay_uncoloured_and_opacity_scales_the_colour():
    """A ramp from 0 to 1 across the image: below UNCOLOURED_BELOW the pixels are the X-ray's own grey at any opacity;
    at the peak the colour's weight is the opacity (0 = the plain X-ray, 1 = the pure colour)."""
    grey = np.full((40, 200), 90, np.uint8)
    ramp = np.tile(np.linspace(0.0, 1.0, 200, dtype=np.float32), (40, 1))
    values = map_to_image(ramp, 40, 200)
    weak = values < UNCOLOURED_BELOW
    assert 20 < weak[0].sum() < 40  # the first ~15% of the columns
    for opacity in (0.3, 0.65, 1.0):
        overlay = np.asarray(render_overlay(grey, ramp, opacity=opacity), np.float64)
        assert (overlay[weak] == 90).all()
        peak = colourise(np.float32(1.0))
        expected = 90 * (1 - opacity) + peak * opacity
        assert np.abs(overlay[:, -1] - expected).max() <= 1.0
    assert (np.asarray(render_overlay(grey, ramp, opacity=0.0)) == 90).all()
    with pytest.raises(ValueError, match="opacity"):
        render_overlay(grey, ramp, opacity=1.5)


def test_colour_bar_shows_the_overlays_colours_and_says_what_uncoloured_means():
    html = colour_bar_html("how much each area raised the score")
    low = "rgb({},{},{}) 0%".format(*np.rint(colourise(np.float32(UNCOLOURED_BELOW))).astype(int))
    high = "rgb({},{},{}) 100%".format(*np.rint(colourise(np.float32(1.0))).astype(int))
    assert low in html and high in html
    assert "how much each area raised the score" in html and f"below {UNCOLOURED_BELOW:.0%}" in html


def test_occlusion_uses_the_given_no_grad_path_and_gives_the_same_map(tmp_path, make_checkpoint):
    """The app hands Occlusion its opt-in CPU runner (here ONNX Runtime, explicit): same map, and it is really used."""
    make_checkpoint(tmp_path)
    model = CnnLstmForImageClassification.from_pretrained(tmp_path).eval()
    size = model.config.image_size
    pixel_values = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    runner = model.fast_cpu_inference("onnxruntime")
    assert runner.backend == "onnxruntime", runner.reason
    calls = []

    def counted(inputs: torch.Tensor) -> torch.Tensor:
        calls.append(inputs.shape[0])
        return runner(inputs)

    plain, _ = Explainer(model).attribute(pixel_values, "Occlusion", 0, None)
    fast, _ = Explainer(model, no_grad_logits=counted).attribute(pixel_values, "Occlusion", 0, None)
    assert calls and sum(calls) > 1  # the patches went through the runner
    assert plain is not None and plain.max() > 0
    np.testing.assert_allclose(fast, plain, atol=1e-3)


def test_gradcam_sentence_names_the_trunks_real_grid(tmp_path, make_checkpoint, example_xrays):
    """The cell size in the Grad-CAM sentence comes from the trunk's real output map, not the paper's formula:
    a timm resnet18 at 64 px ends in a 2x2 map (32-pixel cells) where the paper formula would say 16x16."""
    from cxr_app.service import CxrDemo, SaliencyView

    make_checkpoint(tmp_path / "resnet", backbone="resnet18", image_size=64)
    app = CxrDemo.from_source(str(tmp_path / "resnet"))
    assert app.classifier.model.config.feature_map_size == 16  # what the old sentence used
    view = app.attribution(str(example_xrays["normal"][0]))  # a real Grad-CAM run through the resnet trunk
    note = app.explanation(SaliencyView(np.ones((64, 64)), GRAD_CAM, view.label))  # as if the map were not zero
    assert "one value per 32x32-pixel cell of the model's input, a 2x2 grid" in note, note
    make_checkpoint(tmp_path / "paper-like")
    app = CxrDemo.from_source(str(tmp_path / "paper-like"))
    _, note = app.explain(str(example_xrays["normal"][0]))
    assert "4x4-pixel cell of the model's input, a 8x8 grid" in note, note  # tiny config: 32 px, two pools
