"""Source-adversarial training: a gradient-reversal head that tries to name each image's collection.

Why: every COVID-19 film of the corpus comes from other collections than most normal and pneumonia films, so the
collection itself predicts the label (README, Data). A head reads the network's penultimate features (the dense
layer's ReLU output, the features just before the classifier) together with the true class, and is trained to
predict the image's `source`; the gradient it sends back into the network is reversed (Ganin & Lempitsky 2015), so
the network is pushed to make the collection unreadable *within each class*. Conditioning on the class matters: the
class is allowed to be readable, only the source beyond it is not (Trivedi et al., PLoS ONE 2022, penalise source
features the same way).

The head is used only in training: it is not part of the model, not saved, and the Hub model keeps the paper's head
and parameter count. Its strength ramps up as in Ganin et al. (2 / (1 + exp(-10 p)) - 1 of the weight at training
progress p), so that the first steps learn the task before the reversal bites.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, features: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return features.view_as(features)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.scale * grad_output, None


class SourceAdversary(nn.Module):
    """MLP (penultimate features + one-hot class -> source logits) behind a gradient-reversal layer."""

    def __init__(self, config: Any, num_sources: int, weight: float, hidden_size: int = 64) -> None:
        super().__init__()
        if num_sources < 2:
            raise ValueError(f"the source adversary needs at least 2 training sources, got {num_sources}")
        self.num_labels, self.weight = config.num_labels, float(weight)
        self.layers = nn.Sequential(
            nn.Linear(config.fc_size + config.num_labels, hidden_size), nn.ReLU(), nn.Linear(hidden_size, num_sources)
        )
        self._features: torch.Tensor | None = None

    @contextlib.contextmanager
    def watch(self, model: nn.Module) -> Iterator[None]:
        """Keep the penultimate features of the forward passes made inside the block (a hook on the head's ReLU)."""
        module = getattr(model, "module", model).head.activation
        handle = module.register_forward_hook(lambda _module, _inputs, output: setattr(self, "_features", output))
        try:
            yield
        finally:
            handle.remove()

    def ramp(self, progress: float) -> float:
        return self.weight * (2.0 / (1.0 + math.exp(-10.0 * min(max(progress, 0.0), 1.0))) - 1.0)

    def loss(self, labels: torch.Tensor, source_ids: torch.Tensor, progress: float) -> torch.Tensor:
        """The weighted adversary loss for the features seen last in `watch` (images of unknown source ignored)."""
        features, self._features = self._features, None
        if features is None:
            raise RuntimeError("SourceAdversary.loss called without a forward pass inside SourceAdversary.watch")
        scale = self.ramp(progress)
        reversed_features = _ReverseGradient.apply(features.float(), 1.0)
        classes = F.one_hot(labels, self.num_labels).to(reversed_features.dtype)
        logits = self.layers(torch.cat([reversed_features, classes], dim=1))
        known = source_ids >= 0
        if not known.any():
            return logits.sum() * 0.0
        return scale * F.cross_entropy(logits[known], source_ids[known])
