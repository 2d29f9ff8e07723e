"""Fixtures of the training tests."""

from __future__ import annotations

import pytest

from .helpers import make_trainer


@pytest.fixture(scope="package")
def packed_and_padded(tiny_model, tmp_path_factory):
    """Two Trainers on the same examples: one padding-free row per micro-batch, and padded batches."""
    packed, _ = make_trainer(tiny_model, tmp_path_factory.mktemp("packed"), padding_free=True)
    padded, _ = make_trainer(tiny_model, tmp_path_factory.mktemp("padded"), padding_free=False)
    return packed, padded
