"""--neftune_noise_alpha: the paper's noise reaches the model while it trains, and only in padded batches."""

from __future__ import annotations

import math

import pytest
import torch

from deepred.config import TrainConfig
from deepred.errors import DeepRedError
from deepred.train.hardware import Hardware
from deepred.train.plan import plan_batches

from .helpers import make_trainer


def test_neftune_keeps_each_example_in_its_own_row():
    """Its noise is scaled by the length of the row it sees: a padding-free row of four examples would quarter it."""
    gpu = Hardware("cuda", False, True, False, 1)
    assert plan_batches(TrainConfig(), gpu).padding_free
    assert not plan_batches(TrainConfig(neftune_noise_alpha=5.0), gpu).padding_free
    with pytest.raises(DeepRedError, match="--neftune_noise_alpha needs padded batches"):
        plan_batches(TrainConfig(neftune_noise_alpha=5.0, max_tokens_per_pass=2048), gpu)
    with pytest.raises(DeepRedError, match="--neftune_noise_alpha is for --method sft"):
        plan_batches(TrainConfig(neftune_noise_alpha=5.0, method="orpo"), gpu)


@pytest.mark.parametrize("alpha", [None, 5.0])
def test_training_sees_embeddings_with_noise_of_the_papers_scale(tiny_model, tmp_path, alpha):
    """NEFTune (Jain et al., 2023) adds uniform noise in +-alpha / sqrt(L d) to the input embeddings of a batch
    of rows L tokens long with d dimensions, during training only: the first block's input minus the embedding
    lookup is that noise. With L d in the tens of thousands, its largest value lies within 1 % of the bound."""
    trainer, _ = make_trainer(tiny_model, tmp_path, cfg_changes={"neftune_noise_alpha": alpha})
    embeddings = trainer.model.get_input_embeddings()
    first_block = next(module for name, module in trainer.model.named_modules() if name.endswith("layers.0"))
    seen = {}

    def lookup(module, args, output):  # registered before training adds NEFTune's hook, so it runs first
        seen.setdefault("clean", output.detach().clone())

    def block_input(module, args, kwargs):
        seen.setdefault("input", (args[0] if args else kwargs["hidden_states"]).detach())

    embeddings.register_forward_hook(lookup)
    first_block.register_forward_pre_hook(block_input, with_kwargs=True)
    trainer.train()
    noise = seen["input"] - seen["clean"]
    if alpha is None:
        assert torch.equal(seen["input"], seen["clean"])
        return
    batch, length, dims = noise.shape
    bound = alpha / math.sqrt(length * dims)
    assert batch == 4 and length * dims > 10_000
    assert bound * 0.99 < noise.abs().max().item() <= bound * (1 + 1e-5)
    assert abs(noise.mean().item()) < bound / 10  # centred: the mean of n uniform draws is within ~bound / sqrt(n)
