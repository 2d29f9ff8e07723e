"""How an effective batch is computed must not change what is learned: padding-free batches, passes cut to a token
budget and the memory probe give the padded batch's loss and gradients, and training sees the same examples."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from deepred import train as T
from deepred.chat_template import ChatFormat, tokenize_examples
from deepred.config import TrainConfig
from deepred.data import load_for_training

from .conftest import DATA

# float32 on both sides: the only differences are the order of additions in differently shaped matmuls
LOSS_REL = 1e-5
GRAD_ABS = 1e-5


def build_trainer(tiny_model, tmp_path, **plan_changes):
    cfg = TrainConfig(base_model=str(tiny_model), dataset=str(DATA / "mini.jsonl"), output_dir=str(tmp_path),
                      batch_size=4, gradient_accumulation_steps=1, val_split=0, max_steps=1, lora_dropout=0)
    hw = T.detect_hardware("fp32")
    report, _ = load_for_training(cfg.dataset, False, lambda *a: None)
    tokenizer = T.load_tokenizer(str(tiny_model), False)
    rows = T.truncate_rows(tokenize_examples(report.examples, ChatFormat.of(tokenizer)), 1024, print)
    plan = dataclasses.replace(T.plan_batches(cfg, hw), **plan_changes)
    model = T.load_model(cfg, str(tiny_model), hw)
    trainer = T._build_trainer(cfg, model, tokenizer, T.lora_config(cfg, model), T._split(rows, 0, 0)[0], None,
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


@pytest.fixture(scope="module")
def packed_and_padded(tiny_model, tmp_path_factory):
    packed, _ = build_trainer(tiny_model, tmp_path_factory.mktemp("packed"), padding_free=True)
    padded, _ = build_trainer(tiny_model, tmp_path_factory.mktemp("padded"), padding_free=False)
    return packed, padded


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
    pieces = T.split_packed_batch(batch, 8)
    assert [p["input_ids"].shape[1] for p in pieces] == [8, 9, 6]  # 5+3 | 9 (longer than 8: alone) | 2+4
    for piece in pieces:
        assert int(piece["position_ids"][0, 0]) == 0  # every piece starts at an example's first token
    assert torch.equal(torch.cat([p["input_ids"] for p in pieces], dim=1), ids)
    assert T.split_packed_batch(batch, 23) == [batch] and T.split_packed_batch(batch, None) == [batch]
    assert T.split_packed_batch(batch, 22)[0]["input_ids"].shape[1] == 19  # exactly on the budget stays whole


def test_passes_cut_to_a_token_budget_give_the_same_gradients(packed_and_padded):
    packed, _ = packed_and_padded
    batch = first_batch(packed)
    supervised = int((batch["labels"][:, 1:] != -100).sum())
    budget = batch["input_ids"].shape[1] // 2
    pieces = T.split_packed_batch(batch, budget)
    assert len(pieces) >= 2 and all(p["input_ids"].shape[1] <= budget for p in pieces[:-1])
    whole = loss_and_grads(packed, lambda: packed.training_step(packed.model, dict(batch), supervised))
    packed.max_tokens_per_pass = budget
    try:
        cut = loss_and_grads(packed, lambda: packed.training_step(packed.model, dict(batch), supervised))
    finally:
        packed.max_tokens_per_pass = None
    assert_same(whole, cut)


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
            T._probe_pass(packed, tokens, max(lengths))
        return try_pass

    worst = T.worst_pass_tokens(lengths, 4)
    assert worst == 300 + 280 + 250 + 120
    rng = torch.get_rng_state()
    assert T.choose_token_budget(worst, 300, limited(10_000)) is None and tried == [950]
    assert torch.equal(torch.get_rng_state(), rng)  # training's random stream is untouched
    tried.clear()
    assert T.choose_token_budget(worst, 300, limited(480)) == 475 and tried == [950, 475]
    tried.clear()
    assert T.choose_token_budget(worst, 300, limited(300)) == 300 and tried == [950, 475, 300]  # on the limit
    with pytest.raises(torch.OutOfMemoryError):
        T.choose_token_budget(worst, 300, limited(299))
    assert all(p.grad is None for p in packed.model.parameters())  # the probe leaves no gradients behind

    # as training begins (on a GPU): the run's plan is recorded with the budget it found; here everything fits
    plans, said = [], []
    T._memory_probe(packed, T.plan_batches(TrainConfig(), T.Hardware("cuda", False, True, False, 1)), lengths,
                    said.append, plans.append).on_train_begin(None, None, None)
    assert plans[0].max_tokens_per_pass is None and packed.max_tokens_per_pass is None and not said


def test_a_run_cut_to_a_token_budget_is_the_uncut_run(tiny_model, tmp_path):
    """Same seed, same examples: a run whose passes are cut to a small budget logs the losses of the uncut run, step
    by step (dropout off: its masks are drawn per pass, so cut passes draw different ones)."""
    losses, sizes = {}, {}
    for name, budget in (("whole", 10**6), ("cut", 200)):  # padding-free both; only the second is cut
        cfg = TrainConfig(base_model=str(tiny_model), dataset=str(DATA / "mini.jsonl"), output_dir=str(tmp_path / name),
                          max_steps=3, batch_size=4, gradient_accumulation_steps=1, val_split=0, lora_r=4,
                          lora_alpha=8, lora_dropout=0, learning_rate=1e-2, logging_steps=1, save_steps=100,
                          precision="fp32", max_tokens_per_pass=budget)
        passes = []
        T.train(cfg, log=lambda *a, **k: None, callbacks=(PassSizes(passes),))
        sizes[name] = passes
        state = json.loads((tmp_path / name / "checkpoint-3" / "trainer_state.json").read_text())
        losses[name] = [h["loss"] for h in state["log_history"] if "loss" in h]
        run_config = json.loads((tmp_path / name / "run_config.json").read_text())
        assert run_config["batch_plan"]["max_tokens_per_pass"] == budget
        assert run_config["batch_plan"]["padding_free"] is True
    assert len(losses["whole"]) == 3 and len(sizes["whole"]) == 3  # one pass per step
    assert len(sizes["cut"]) > 3 and max(sizes["cut"]) <= 200 < max(sizes["whole"])
    assert sum(sizes["cut"]) == sum(sizes["whole"])  # the same tokens, in more passes
    assert losses["cut"] == pytest.approx(losses["whole"], rel=1e-4)


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


def test_every_profile_sees_the_same_examples_in_the_same_order(tiny_model, tmp_path):
    """The reference profile's padded micro-batches of 2 and the GPU fast plan's one padding-free row of 4 hold the
    same examples at every optimizer step."""
    cfg = TrainConfig(profile="reference", batch_size=2, gradient_accumulation_steps=2)
    reference = T.plan_batches(cfg, T.detect_hardware("fp32"))
    gpu_fast = T.plan_batches(dataclasses.replace(cfg, profile="fast"), T.Hardware("cuda", False, True, False, 1))
    seen = {}
    for name, plan in (("reference", reference), ("fast", gpu_fast)):
        changes = {k: v for k, v in dataclasses.asdict(plan).items() if k not in ("loss", "liger_layer_kernels")}
        trainer, _ = build_trainer(tiny_model, tmp_path / name, **changes)
        per_step, step = [], []
        for batch in trainer.get_train_dataloader():
            if "attention_mask" in batch:
                rows = zip(batch["input_ids"], batch["attention_mask"])
                step += [tuple(row[mask.bool()].tolist()) for row, mask in rows]
            else:
                starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
                step += [tuple(batch["input_ids"][0, a:b].tolist()) for a, b in zip(starts, starts[1:])]
            if len(step) == 4:
                per_step.append(sorted(step))
                step = []
        seen[name] = per_step
    assert (reference.micro_batch, gpu_fast.micro_batch, gpu_fast.padding_free) == (2, 4, True)
    assert seen["reference"] == seen["fast"] and len(seen["fast"]) >= 2


@pytest.mark.parametrize("profile, device, budget, loss, padding_free", [
    ("reference", "cpu", None, "trl", False),
    ("reference", "cuda", None, "trl", False),
    ("fast", "cpu", None, "supervised", False),
    ("fast", "cpu", 2048, "supervised", True),  # a token budget cuts padding-free rows
    ("lean", "cuda", None, "liger" if T._liger_available() else "supervised", True),
])
def test_batch_plan_says_what_runs(profile, device, budget, loss, padding_free):
    cfg = TrainConfig(profile=profile, max_tokens_per_pass=budget)
    plan = T.plan_batches(cfg, T.Hardware(device, False, device == "cuda", False, 1))
    assert (plan.loss, plan.padding_free) == (loss, padding_free)
    assert T.LOSSES[loss] in plan.describe(1)


def test_fast_profile_on_cuda_fuses_the_loss_only_where_liger_is_installed():
    plan = T.plan_batches(TrainConfig(), T.Hardware("cuda", False, True, False, 1))
    assert plan.loss == ("liger" if T._liger_available() else "supervised")
    with_head = T.plan_batches(TrainConfig(modules_to_save=["lm_head"]), T.Hardware("cuda", False, True, False, 1))
    assert with_head.loss == "supervised"  # a trained output layer is PEFT's wrapper, not a plain weight to fuse


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


def test_under_fsdp_the_loss_is_trls(monkeypatch):
    """FSDP shards the output layer's weight outside the model's forward pass, where the supervised loss would
    apply it; `accelerate launch` with an FSDP config sets ACCELERATE_USE_FSDP in every process."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    plan = T.plan_batches(TrainConfig(), T.Hardware("cuda", False, True, False, 2))
    hw = T.Hardware("cuda", False, True, False, 2)
    assert plan.loss == "trl" and T._trainer_class(plan, hw).__name__ == "SFTTrainer"


@pytest.mark.parametrize("budget", [0, -512])
def test_a_token_budget_below_one_is_refused(budget):
    with pytest.raises(T.DeepRedError, match=f"--max_tokens_per_pass must be at least 1 \\(got {budget}\\)"):
        T.plan_batches(TrainConfig(max_tokens_per_pass=budget), T.detect_hardware("fp32"))
