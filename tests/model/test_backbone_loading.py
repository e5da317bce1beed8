"""Loading a checkpoint never downloads timm backbone weights, even when its config.json asks for them
(`backbone_pretrained: true`): the checkpoint's own weights replace them, so the download would be wasted, and offline
it would fail. A new model (no checkpoint) still gets the pretrained weights it asks for."""

from __future__ import annotations

import json

import pytest
import torch

from modeling_cnn_lstm import CnnLstmConfig, CnnLstmForImageClassification

timm = pytest.importorskip("timm")


@pytest.fixture
def no_downloads(monkeypatch):
    """Every way timm fetches pretrained weights fails the test (and HF_HUB_OFFLINE is set by tests/conftest.py)."""
    import timm.models._builder as builder

    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("timm tried to fetch pretrained weights")

    for name in ("load_pretrained", "load_state_dict_from_hf", "load_state_dict_from_url", "download_cached_file"):
        monkeypatch.setattr(builder, name, refuse)
    return calls


def test_from_pretrained_builds_the_backbone_without_pretrained_weights(tmp_path, no_downloads):
    config = CnnLstmConfig(backbone="resnet10t", image_size=64, lstm_hidden_size=8, fc_size=8)
    model = CnnLstmForImageClassification(config).eval()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["backbone_pretrained"] is False  # what the project itself saves
    saved["backbone_pretrained"] = True  # a hand-edited or foreign config
    (tmp_path / "config.json").write_text(json.dumps(saved))

    loaded = CnnLstmForImageClassification.from_pretrained(tmp_path).eval()
    assert no_downloads == []
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    from transformers import AutoModelForImageClassification

    AutoModelForImageClassification.from_pretrained(tmp_path)  # the Auto class goes through the same method
    assert no_downloads == []
    pixels = torch.zeros(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(pixels).logits, model(pixels).logits)


def test_a_new_model_still_asks_for_pretrained_weights(no_downloads):
    config = CnnLstmConfig(backbone="resnet10t", image_size=64, backbone_pretrained=True)
    with pytest.raises(AssertionError, match="pretrained weights"):
        CnnLstmForImageClassification(config)
    assert no_downloads
