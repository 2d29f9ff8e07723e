"""The training folder: a checkpoint is resumed only on the base model and data it was trained on."""

from __future__ import annotations

import json

import pytest

from deepred.errors import DeepRedError
from deepred.train.run_dir import check_checkpoint_matches, latest_checkpoint


def test_checkpoint_from_another_base_model_is_refused(trained_run):
    checkpoint = latest_checkpoint(trained_run)
    with pytest.raises(DeepRedError, match="was trained on base model"):
        check_checkpoint_matches(checkpoint, trained_run, "Qwen/Qwen2.5-7B-Instruct", "0" * 64)
    recorded = json.loads((trained_run / "run_config.json").read_text())
    with pytest.raises(DeepRedError, match="different dataset"):
        check_checkpoint_matches(checkpoint, trained_run, recorded["base_model"], "0" * 64)
