"""Shared by the training tests: a Trainer built the way train() builds one, on the tiny model and the mini set."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from deepred.chat_template import ChatFormat, tokenize_examples
from deepred.config import TrainConfig
from deepred.data import load_for_training
from deepred.models.loading import load_tokenizer
from deepred.train.examples import split, truncate_rows
from deepred.train.hardware import detect_hardware
from deepred.train.model import load_model, lora_config
from deepred.train.plan import plan_batches
from deepred.train.trainer import build_trainer

from ..conftest import DATA


# float32 on both sides: the only differences are the order of additions in differently shaped matmuls
LOSS_REL = 1e-5


GRAD_ABS = 1e-5


def make_trainer(tiny_model, tmp_path, **plan_changes):
    cfg = TrainConfig(base_model=str(tiny_model), dataset=str(DATA / "mini.jsonl"), output_dir=str(tmp_path),
                      batch_size=4, gradient_accumulation_steps=1, val_split=0, max_steps=1, lora_dropout=0)
    hw = detect_hardware("fp32")
    report, _ = load_for_training(cfg.dataset, False, lambda *a: None)
    tokenizer = load_tokenizer(str(tiny_model), False)
    rows = truncate_rows(tokenize_examples(report.examples, ChatFormat.of(tokenizer)), 1024, print)
    plan = dataclasses.replace(plan_batches(cfg, hw), **plan_changes)
    model = load_model(cfg, str(tiny_model), hw)
    trainer = build_trainer(cfg, model, tokenizer, lora_config(cfg, model), split(rows, 0, 0)[0], None,
                               tmp_path, plan, hw)
    return trainer, rows


def first_batch(trainer) -> dict:
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def loss_and_grads(trainer, step) -> tuple[float, list[torch.Tensor]]:
    trainer.model.zero_grad(set_to_none=True)
    loss = step()
    grads = [p.grad.clone() for p in trainer.model.parameters() if p.requires_grad]
    return float(loss), grads


def assert_same(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert loss_b == pytest.approx(loss_a, rel=LOSS_REL)
    assert max((x - y).abs().max().item() for x, y in zip(grads_a, grads_b)) < GRAD_ABS


class PassSizes:
    """Records the tokens of every training forward pass (a hook on the input embeddings)."""

    def __init__(self, sizes: list[int]):
        self.sizes = sizes

    def __getattr__(self, name):  # the other TrainerCallback events: nothing to do
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model.get_input_embeddings().register_forward_hook(
            lambda module, inputs, output: self.sizes.append(inputs[0].numel()) if module.training else None)


def saved_activation_bytes(trainer, batch: dict) -> int:
    """Memory autograd keeps for the backward pass of the model's body, measured the same way on any device: the
    storages of the tensors saved during one loss computation, each counted once, weights left out, and the
    output layer's logits left out (they follow the supervised tokens, the same in both layouts)."""
    weights = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}
    vocab = trainer.model.get_output_embeddings().weight.shape[0]
    storages = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights and vocab not in tensor.shape:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    supervised = int((batch["labels"][:, 1:] != -100).sum())
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=supervised)
    return sum(storages.values())
