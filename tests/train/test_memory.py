"""The GPU memory probe: it finds the largest token budget that fits (a memory limit simulated around the real
probe pass), leaves no gradients and no change to training's random numbers, and records the plan it chose."""

from __future__ import annotations

import pytest
import torch

from deepred.config import TrainConfig
from deepred.train.callbacks import MemoryProbe
from deepred.train.hardware import Hardware
from deepred.train.memory import choose_token_budget, probe_pass, worst_pass_tokens
from deepred.train.plan import plan_batches


def test_memory_probe_finds_the_budget_under_a_memory_limit(packed_and_padded):
    """A CPU has no GPU memory to run out of: the limit is simulated around the real probe pass."""
    packed, _ = packed_and_padded
    lengths = [300, 280, 250, 120, 90, 60]
    tried = []

    def limited(limit):
        def try_pass(tokens):
            tried.append(tokens)
            if tokens > limit:
                raise torch.OutOfMemoryError(f"CUDA out of memory (simulated limit {limit} tokens)")
            probe_pass(packed, tokens, max(lengths))
        return try_pass

    worst = worst_pass_tokens(lengths, 4)
    assert worst == 300 + 280 + 250 + 120
    rng = torch.get_rng_state()
    assert choose_token_budget(worst, 300, limited(10_000)) is None and tried == [950]
    assert torch.equal(torch.get_rng_state(), rng)  # training's random stream is untouched
    tried.clear()
    assert choose_token_budget(worst, 300, limited(480)) == 475 and tried == [950, 475]
    tried.clear()
    assert choose_token_budget(worst, 300, limited(300)) == 300 and tried == [950, 475, 300]  # on the limit
    with pytest.raises(torch.OutOfMemoryError):
        choose_token_budget(worst, 300, limited(299))
    assert all(p.grad is None for p in packed.model.parameters())  # the probe leaves no gradients behind

    # as training begins (on a GPU): the run's plan is recorded with the budget it found; here everything fits
    plans, said = [], []
    MemoryProbe(packed, plan_batches(TrainConfig(), Hardware("cuda", False, True, False, 1)), lengths,
                    said.append, plans.append).on_train_begin(None, None, None)
    assert plans[0].max_tokens_per_pass is None and packed.max_tokens_per_pass is None and not said
