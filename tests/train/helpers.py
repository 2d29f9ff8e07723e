"""Shared by the training tests: a Trainer built the way train() builds one, on the tiny model and the mini set."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

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
from deepred.train.run_dir import latest_checkpoint
from deepred.train.trainer import build_trainer

from ..conftest import DATA


# float32 on both sides: the only differences are the order of additions in differently shaped matmuls
LOSS_REL = 1e-5


GRAD_ABS = 1e-5


def make_trainer(tiny_model, tmp_path, cfg_changes: dict | None = None, **plan_changes):
    cfg = TrainConfig(base_model=str(tiny_model), dataset=str(DATA / "mini.jsonl"), output_dir=str(tmp_path),
                      batch_size=4, gradient_accumulation_steps=1, val_split=0, max_steps=1, lora_dropout=0,
                      **(cfg_changes or {}))
    hw = detect_hardware("fp32")
    report, _ = load_for_training(cfg.dataset, False, lambda *a: None)
    tokenizer = load_tokenizer(str(tiny_model), False)
    rows = truncate_rows(tokenize_examples(report.examples, ChatFormat.of(tokenizer)), 1024, print)
    plan = dataclasses.replace(plan_batches(cfg, hw), **plan_changes)
    model = load_model(cfg, str(tiny_model), hw, plan.attention)
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


class InputShapes:
    """Records the shape of every training forward pass's input ids (a hook on the input embeddings)."""

    def __init__(self):
        self.shapes: list[tuple[int, ...]] = []

    @property
    def sizes(self) -> list[int]:
        """The tokens of each pass."""
        return [math.prod(shape) for shape in self.shapes]

    def __getattr__(self, name):  # the other TrainerCallback events: nothing to do
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model.get_input_embeddings().register_forward_hook(
            lambda module, inputs, output: self.shapes.append(tuple(inputs[0].shape)) if module.training else None)


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


def scheduled_learning_rate(step: int, peak: float, warmup_steps: int, max_steps: int) -> float:
    """The learning rate that optimizer step `step` (counted from 1) takes under a linear warm-up from 0 followed by
    a cosine decay to 0 (transformers' "cosine" schedule, which training uses). The scheduler advances after each
    optimizer step, so step s takes the schedule's value after s - 1 steps: step 1 takes 0, the warm-up's start.
    Written from the schedule's definition, not from deepred's code."""
    done = step - 1
    if done < warmup_steps:
        return peak * done / warmup_steps
    return peak * 0.5 * (1 + math.cos(math.pi * (done - warmup_steps) / (max_steps - warmup_steps)))


def stop_once_a_checkpoint_exists(proc: subprocess.Popen, checkpoint: Callable[[], Path | None],
                                  sig: int = signal.SIGTERM, timeout: float = 300) -> str:
    """Send `sig` (SIGTERM as a user's Ctrl-C or a scheduler would, SIGKILL as a crash) to a training process as soon
    as `checkpoint()` finds a complete checkpoint; its output once it has ended."""
    deadline = time.time() + timeout
    while checkpoint() is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert checkpoint() is not None, "training never wrote a checkpoint"
    assert proc.poll() is None, "training ended before it could be stopped"
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=timeout)
    return output or ""


def stopped_step(output: str, run_dir: Path) -> int:
    """The step a gracefully stopped run says it stopped at, checked against the checkpoint it saved there."""
    step = int(re.search(r"SIGTERM: stopped at step (\d+);", output).group(1))
    assert latest_checkpoint(run_dir) == run_dir / f"checkpoint-{step}", output[-2000:]
    return step


def assert_ran_only_the_rest(run_dir: Path, output: str, began: int, max_steps: int, peak: float,
                             warmup_steps: int) -> None:
    """The process that finished the run in `run_dir` (its output given) resumed from the checkpoint of step
    `began`, ran exactly the steps left, and its first step took the schedule's learning rate at that step. A resume
    that silently starts over runs `max_steps` steps from step 1, at learning rate 0.

    The rate is compared to 1e-9 relative: both sides evaluate the same closed form in float64 (the scheduler's
    LambdaLR multiplies the peak by the factor), so only a few ulps of rounding can differ."""
    results = json.loads((run_dir / "train_results.json").read_text())
    ran = {key: results.get(key) for key in ("resumed_from_step", "steps_this_process", "first_step_this_process")}
    left = {"resumed_from_step": began, "steps_this_process": max_steps - began, "first_step_this_process": began + 1}
    assert ran == left, f"the resuming process ran {ran}, not {left}\n{output[-3000:]}"
    expected = scheduled_learning_rate(began + 1, peak, warmup_steps, max_steps)
    assert expected > 0  # never the warm-up's start, which a restart would take
    lr = results["first_step_learning_rate"]
    assert lr == pytest.approx(expected, rel=1e-9), f"its first step's learning rate {lr}, not {expected}"
    assert f"this process resumed at step {began} of {max_steps}, ran {max_steps - began} steps" in output
