"""The batch plan keeps the user's effective batch, says what runs, and never changes which examples a step sees."""

from __future__ import annotations

import dataclasses

import pytest

from deepred.config import TrainConfig
from deepred.errors import DeepRedError
from deepred.train.hardware import Hardware, detect_hardware, liger_available, under_fsdp
from deepred.train.model import load_model
from deepred.train.plan import EAGER_CPU_MAX_TOKENS, LOSSES, plan_batches
from deepred.train.trainer import trainer_class

from .helpers import make_trainer


@pytest.mark.parametrize("profile, device, world, expect", [
    ("reference", "cuda", 1, (4, 4, True)),
    ("fast", "cuda", 1, (16, 1, False)),
    ("lean", "cuda", 1, (16, 1, True)),
    ("fast", "cpu", 1, (4, 4, False)),
    ("fast", "cuda", 2, (8, 1, False)),
])
def test_batch_plan_keeps_the_effective_batch(profile, device, world, expect):
    cfg = TrainConfig(profile=profile)
    plan = plan_batches(cfg, Hardware(device, False, device == "cuda", False, world))
    assert (plan.micro_batch, plan.accumulation, plan.gradient_checkpointing) == expect
    assert plan.micro_batch * plan.accumulation * world == cfg.batch_size * cfg.gradient_accumulation_steps


@pytest.mark.parametrize("settings, world, message", [
    ({"profile": "reference", "micro_batch_size": 3}, 1, "--micro_batch_size 3 does not divide the 16 examples"),
    ({"profile": "fast", "micro_batch_size": 3}, 1, "choose one of 1, 2, 4, 8, 16, or leave it out"),
    ({"profile": "fast"}, 3, "the effective batch 16 .* does not divide among 3 processes"),
    ({"profile": "reference"}, 3, "does not divide among 3 processes"),
])
def test_a_plan_that_would_change_the_effective_batch_is_refused(settings, world, message):
    """The README promises the effective batch never changes; a review found 15 or 12 run for 16, and
    --micro_batch_size 3 silently run as 2."""
    with pytest.raises(DeepRedError, match=message):
        plan_batches(TrainConfig(**settings), Hardware("cuda", False, True, False, world))


def test_the_reference_micro_batch_fits_each_processes_share():
    """--batch_size 4 x 1 over two processes: 2 each, not 4 each (the reference plan trained 8 for 4)."""
    plan = plan_batches(TrainConfig(profile="reference", batch_size=4, gradient_accumulation_steps=1),
                        Hardware("cuda", False, True, False, 2))
    assert (plan.micro_batch, plan.accumulation) == (2, 1)


@pytest.mark.parametrize("profile, device, budget, loss, padding_free", [
    ("reference", "cpu", None, "trl", False),
    ("reference", "cuda", None, "trl", False),
    ("fast", "cpu", None, "supervised", False),
    ("fast", "cpu", 2048, "supervised", True),  # a token budget cuts padding-free rows
    ("lean", "cuda", None, "liger" if liger_available() else "supervised", True),
])
def test_batch_plan_says_what_runs(profile, device, budget, loss, padding_free):
    cfg = TrainConfig(profile=profile, max_tokens_per_pass=budget)
    plan = plan_batches(cfg, Hardware(device, False, device == "cuda", False, 1), liger=liger_available())
    assert (plan.loss, plan.padding_free) == (loss, padding_free)
    assert LOSSES[loss] in plan.describe(1)


@pytest.mark.parametrize("p95, changes, bf16, expect", [
    (EAGER_CPU_MAX_TOKENS, {}, True, "eager"),  # on the limit: eager
    (EAGER_CPU_MAX_TOKENS + 1, {}, True, None),  # one token over: the model's own kernel (sdpa)
    (100, {}, False, None),  # float32 on a CPU without bf16: sdpa was the faster
    (100, {"method": "orpo"}, True, "eager"),  # padded pairs alike
    (100, {"profile": "reference"}, True, None),  # the specification's settings as written
    (100, {"attn_implementation": "sdpa"}, True, None),  # the user's choice rules
    (100, {"max_tokens_per_pass": 2048}, True, None),  # padding-free rows keep the kernel that builds their mask
    (None, {}, True, None),  # lengths unknown
])
def test_cpu_plan_runs_eager_attention_on_short_padded_rows_under_bf16(p95, changes, bf16, expect):
    cpu = Hardware("cpu", False, bf16, False, 1)
    plan = plan_batches(TrainConfig(**changes), cpu, p95_length=p95)
    assert plan.attention == expect
    assert ("eager attention" in plan.describe(1)) == (expect == "eager")
    assert plan_batches(TrainConfig(**changes), Hardware("cuda", False, True, False, 1), p95_length=p95).attention is None


@pytest.mark.parametrize("profile", ["fast", "lean", "reference"])
def test_rocm_trains_with_eager_attention_under_every_profile_unless_the_user_chose(profile):
    rocm = Hardware("cuda", True, True, False, 1)
    plan = plan_batches(TrainConfig(profile=profile), rocm, p95_length=1000)
    assert plan.attention == "eager" and "eager attention" in plan.describe(1)
    assert plan_batches(TrainConfig(profile=profile, attn_implementation="sdpa"), rocm).attention is None
    assert plan_batches(TrainConfig(profile=profile, method="orpo"), rocm).attention == "eager"


def test_the_plans_attention_reaches_the_model_unless_the_user_chose_one(tiny_model):
    cpu = detect_hardware("fp32")
    assert load_model(TrainConfig(), str(tiny_model), cpu, "eager").config._attn_implementation == "eager"
    assert load_model(TrainConfig(), str(tiny_model), cpu).config._attn_implementation == "sdpa"
    chosen = TrainConfig(attn_implementation="sdpa")
    assert load_model(chosen, str(tiny_model), cpu, "eager").config._attn_implementation == "sdpa"


def test_fast_profile_on_cuda_fuses_the_loss_only_where_liger_is_installed():
    gpu = Hardware("cuda", False, True, False, 1)
    plan = plan_batches(TrainConfig(), gpu, liger=liger_available())
    assert plan.loss == ("liger" if liger_available() else "supervised")
    assert plan_batches(TrainConfig(), gpu, liger=True).loss == "liger"
    assert plan_batches(TrainConfig(), gpu, liger=False).loss == "supervised"
    with_head = plan_batches(TrainConfig(modules_to_save=["lm_head"]), gpu, liger=True)
    assert with_head.loss == "supervised"  # a trained output layer is PEFT's wrapper, not a plain weight to fuse


def test_under_fsdp_the_loss_is_trls(monkeypatch):
    """FSDP shards the output layer's weight outside the model's forward pass, where the supervised loss would
    apply it; `accelerate launch` with an FSDP config sets ACCELERATE_USE_FSDP in every process."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert under_fsdp()
    plan = plan_batches(TrainConfig(), Hardware("cuda", False, True, False, 2), fsdp=under_fsdp(), liger=True)
    hw = Hardware("cuda", False, True, False, 2)
    assert plan.loss == "trl" and trainer_class(plan, hw).__name__ == "SFTTrainer"


@pytest.mark.parametrize("budget", [0, -512])
def test_a_token_budget_below_one_is_refused(budget):
    with pytest.raises(DeepRedError, match=f"--max_tokens_per_pass must be at least 1 \\(got {budget}\\)"):
        plan_batches(TrainConfig(max_tokens_per_pass=budget), detect_hardware("fp32"))


def test_every_profile_sees_the_same_examples_in_the_same_order(tiny_model, tmp_path):
    """The reference profile's padded micro-batches of 2 and the GPU fast plan's one padding-free row of 4 hold the
    same examples at every optimizer step."""
    cfg = TrainConfig(profile="reference", batch_size=2, gradient_accumulation_steps=2)
    reference = plan_batches(cfg, detect_hardware("fp32"))
    gpu_fast = plan_batches(dataclasses.replace(cfg, profile="fast"), Hardware("cuda", False, True, False, 1))
    seen = {}
    for name, plan in (("reference", reference), ("fast", gpu_fast)):
        changes = {k: v for k, v in dataclasses.asdict(plan).items() if k not in ("loss", "liger_layer_kernels")}
        trainer, _ = make_trainer(tiny_model, tmp_path / name, **changes)
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
