"""Tiny CNN-LSTM configs and checkpoints with seeded weights, shared by the model, training and app tests."""

from __future__ import annotations

from pathlib import Path

import torch

from modeling_cnn_lstm import CnnLstmConfig, CnnLstmForImageClassification, CnnLstmImageProcessor


def tiny_config(**overrides: object) -> CnnLstmConfig:
    """32x32 inputs, two blocks of widths 8 and 16: a 8x8x16 map read as a 64-step sequence."""
    settings = {"block_widths": [[8], [16, 16]], "image_size": 32, "lstm_hidden_size": 12, "fc_size": 10}
    settings.update(overrides)
    return CnnLstmConfig(**settings)


def seeded_model(config: CnnLstmConfig, scale: float = 1.0) -> CnnLstmForImageClassification:
    """Weights from a private seeded generator scaled by fan-in: independent of init code and global RNG state."""
    model = CnnLstmForImageClassification(config).eval()
    generator = torch.Generator().manual_seed(20200627)
    with torch.no_grad():
        for _, tensor in sorted(model.state_dict().items()):
            if tensor.is_floating_point():
                fan_in = tensor[0].numel() if tensor.ndim > 1 else tensor.numel()
                values = torch.randn(tensor.shape, generator=generator, dtype=torch.float64)
                tensor.copy_(values * scale / fan_in**0.5)
    return model


def save_tiny_checkpoint(folder: Path, scale: float = 1.0, **overrides: object) -> CnnLstmForImageClassification:
    """A seeded tiny model saved with its processor: a real checkpoint folder in a fraction of a second."""
    config = tiny_config(**overrides)
    model = seeded_model(config, scale)
    model.save_pretrained(folder)
    CnnLstmImageProcessor.from_model_config(config).save_pretrained(folder)
    return model
