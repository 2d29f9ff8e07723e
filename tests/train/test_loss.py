"""The fast profiles' loss must be TRL's: padding-free batches and passes cut to a token budget give the padded
batch's loss and gradients, packed examples never see each other, and memory follows the real tokens."""

from __future__ import annotations

import json

import pytest
import torch

from deepred.chat_template import ChatFormat, tokenize_examples
from deepred.config import TrainConfig
from deepred.data import load_for_training
from deepred.models.loading import load_tokenizer
from deepred.train import train
from deepred.train.examples import split
from deepred.train.hardware import detect_hardware
from deepred.train.loss import split_packed_batch
from deepred.train.model import load_model, lora_config
from deepred.train.plan import plan_batches
from deepred.train.trainer import build_trainer

from ..conftest import DATA
from .helpers import InputShapes, assert_same, first_batch, loss_and_grads, make_trainer, saved_activation_bytes


def test_padding_free_batch_has_the_padded_batch_loss_and_gradients(packed_and_padded):
    packed, padded = packed_and_padded
    packed_batch, padded_batch = first_batch(packed), first_batch(padded)
    assert packed_batch["input_ids"].shape[0] == 1 and "attention_mask" not in packed_batch
    assert padded_batch["input_ids"].shape[0] == 4
    real = int(padded_batch["attention_mask"].sum())
    assert packed_batch["input_ids"].shape[1] == real < padded_batch["input_ids"].numel()  # same examples, no padding
    supervised = int((padded_batch["labels"][:, 1:] != -100).sum())
    assert int((packed_batch["labels"][:, 1:] != -100).sum()) == supervised

    def step(trainer, batch):
        return lambda: _backward(trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=supervised))

    assert_same(loss_and_grads(padded, step(padded, padded_batch)), loss_and_grads(packed, step(packed, packed_batch)))


def test_eager_attention_has_the_sdpa_batch_loss_and_gradients(tiny_model, tmp_path, packed_and_padded):
    """The CPU plan's eager attention (plan.cpu_attention) computes what sdpa does on a padded batch: the padding
    mask and the causal mask are applied the same way. Both run in float32 here, so they differ by rounding only."""
    _, sdpa = packed_and_padded
    eager, _ = make_trainer(tiny_model, tmp_path, padding_free=False, attention="eager")
    assert eager.model.config._attn_implementation == "eager"
    assert sdpa.model.config._attn_implementation == "sdpa"
    batch = first_batch(sdpa)
    assert (batch["attention_mask"] == 0).any()  # rows of different lengths: the padding mask is exercised
    supervised = int((batch["labels"][:, 1:] != -100).sum())

    def step(trainer):
        return lambda: _backward(trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=supervised))

    assert_same(loss_and_grads(sdpa, step(sdpa)), loss_and_grads(eager, step(eager)))


def test_packed_examples_do_not_attend_to_each_other(packed_and_padded):
    """The last example of a packed row has the logits it has alone: nothing before it leaks into its attention."""
    packed, _ = packed_and_padded
    batch = first_batch(packed)
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    last = starts[-1]
    model = packed.model.eval()
    with torch.no_grad():
        together = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0, last:]
        alone = model(input_ids=batch["input_ids"][:, last:]).logits[0]
        everything = torch.ones_like(batch["input_ids"])  # one attention mask over the whole row: examples leak
        leaked = model(input_ids=batch["input_ids"], attention_mask=everything).logits[0, last:]
    scale = alone.abs().max().item()
    assert (together - alone).abs().max().item() < 1e-4 * max(1.0, scale)
    assert (leaked - alone).abs().max().item() > 1e-2 * max(1.0, scale)  # the check would see a leak


def _backward(loss):
    loss.backward()
    return loss.detach()


def test_split_packed_batch_cuts_only_at_example_boundaries():
    lengths = [5, 3, 9, 2, 4]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    ids = torch.arange(positions.shape[1])[None]
    batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": positions}
    pieces = split_packed_batch(batch, 8)
    assert [p["input_ids"].shape[1] for p in pieces] == [8, 9, 6]  # 5+3 | 9 (longer than 8: alone) | 2+4
    for piece in pieces:
        assert int(piece["position_ids"][0, 0]) == 0  # every piece starts at an example's first token
    assert torch.equal(torch.cat([p["input_ids"] for p in pieces], dim=1), ids)
    assert split_packed_batch(batch, 23) == [batch] and split_packed_batch(batch, None) == [batch]
    assert split_packed_batch(batch, 22)[0]["input_ids"].shape[1] == 19  # exactly on the budget stays whole


def test_passes_cut_to_a_token_budget_give_the_same_gradients(packed_and_padded):
    packed, _ = packed_and_padded
    batch = first_batch(packed)
    supervised = int((batch["labels"][:, 1:] != -100).sum())
    budget = batch["input_ids"].shape[1] // 2
    pieces = split_packed_batch(batch, budget)
    assert len(pieces) >= 2 and all(p["input_ids"].shape[1] <= budget for p in pieces[:-1])
    whole = loss_and_grads(packed, lambda: packed.training_step(packed.model, dict(batch), supervised))
    packed.max_tokens_per_pass = budget
    try:
        cut = loss_and_grads(packed, lambda: packed.training_step(packed.model, dict(batch), supervised))
    finally:
        packed.max_tokens_per_pass = None
    assert_same(whole, cut)


def test_a_run_cut_to_a_token_budget_is_the_uncut_run(tiny_model, tmp_path):
    """Same seed, same examples: a run whose passes are cut to a small budget logs the losses of the uncut run, step
    by step (dropout off: its masks are drawn per pass, so cut passes draw different ones)."""
    losses, sizes = {}, {}
    for name, budget in (("whole", 10**6), ("cut", 200)):  # padding-free both; only the second is cut
        cfg = TrainConfig(base_model=str(tiny_model), dataset=str(DATA / "mini.jsonl"), output_dir=str(tmp_path / name),
                          max_steps=3, batch_size=4, gradient_accumulation_steps=1, val_split=0, lora_r=4,
                          lora_alpha=8, lora_dropout=0, learning_rate=1e-2, logging_steps=1, save_steps=100,
                          precision="fp32", max_tokens_per_pass=budget)
        passes = InputShapes()
        train(cfg, log=lambda *a, **k: None, callbacks=(passes,))
        sizes[name] = passes.sizes
        state = json.loads((tmp_path / name / "checkpoint-3" / "trainer_state.json").read_text())
        losses[name] = [h["loss"] for h in state["log_history"] if "loss" in h]
        run_config = json.loads((tmp_path / name / "run_config.json").read_text())
        assert run_config["batch_plan"]["max_tokens_per_pass"] == budget
        assert run_config["batch_plan"]["padding_free"] is True
    assert len(losses["whole"]) == 3 and len(sizes["whole"]) == 3  # one pass per step
    assert len(sizes["cut"]) > 3 and max(sizes["cut"]) <= 200 < max(sizes["whole"])
    assert sum(sizes["cut"]) == sum(sizes["whole"])  # the same tokens, in more passes
    assert losses["cut"] == pytest.approx(losses["whole"], rel=1e-4)


def test_padding_free_activation_memory_follows_the_real_tokens(packed_and_padded):
    """A padded batch keeps activations for every padded position; a padding-free one for the real tokens only."""
    packed, padded = packed_and_padded
    def batch_of(trainer):  # three short examples (the last 40 tokens of a reply) and a whole one
        rows = [trainer.train_dataset[i] for i in range(4)]
        rows = [{key: row[key][-40:] for key in ("input_ids", "labels")} for row in rows[:3]] + rows[3:]
        return trainer._prepare_inputs(trainer.data_collator(rows))

    packed_batch, padded_batch = batch_of(packed), batch_of(padded)
    real, padded_positions = int(padded_batch["attention_mask"].sum()), padded_batch["input_ids"].numel()
    assert real == packed_batch["input_ids"].numel() < 0.8 * padded_positions
    ratio = saved_activation_bytes(packed, packed_batch) / saved_activation_bytes(padded, padded_batch)
    assert ratio == pytest.approx(real / padded_positions, rel=0.15)


def test_cpu_loss_equals_trl_loss_and_gradients(tiny_model, tmp_path):
    """On CPU only the supervised positions are scored; loss and gradients must be TRL's own."""
    from trl import SFTTrainer

    cfg = TrainConfig(base_model=str(tiny_model), dataset=str(DATA / "mini.jsonl"), output_dir=str(tmp_path),
                      batch_size=4, gradient_accumulation_steps=1, val_split=0, max_steps=1)
    hw = detect_hardware("fp32")  # exact comparison: no bf16 autocast
    report, _ = load_for_training(cfg.dataset, False, lambda *a: None)
    model = load_model(cfg, str(tiny_model), hw)
    tokenizer = load_tokenizer(str(tiny_model), False)
    rows = tokenize_examples(report.examples, ChatFormat.of(tokenizer))
    trainer = build_trainer(cfg, model, tokenizer, lora_config(cfg, model), split(rows, 0, 0)[0], None,
                               tmp_path, plan_batches(cfg, hw), hw)
    assert type(trainer).__name__ == "DeepRedSFTTrainer"
    trainer.model.eval()  # no dropout: both passes see the same network
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    grads = []
    for compute_loss in (lambda: SFTTrainer.compute_loss(trainer, trainer.model, dict(batch), num_items_in_batch=50),
                         lambda: trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=50)):
        trainer.model.zero_grad()
        loss = compute_loss()
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in trainer.model.parameters() if p.requires_grad]))
    (trl_loss, trl_grads), (cpu_loss, cpu_grads) = grads
    assert cpu_loss == pytest.approx(trl_loss, rel=1e-5)
    assert max((a - b).abs().max().item() for a, b in zip(trl_grads, cpu_grads)) < 1e-5
