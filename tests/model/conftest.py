"""Fixtures of the model tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest


@pytest.fixture
def tiny_model(tiny_config: Callable, seeded_model: Callable):
    """A fresh tiny model (32x32 inputs, two blocks) with seeded weights, in eval mode: tests may change it."""
    return seeded_model(tiny_config())
