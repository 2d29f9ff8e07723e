"""Memory: the probe that finds how many tokens one forward pass may hold on a GPU, and the out-of-memory back-off
(a smaller micro-batch, then gradient checkpointing) that keeps the effective batch."""

from __future__ import annotations

import dataclasses

from ..config import TrainConfig
from ..errors import DeepRedError
from .plan import BatchPlan


def worst_pass_tokens(lengths: list[int], micro_batch: int) -> int:
    """Tokens in the largest padding-free micro-batch this data can produce: its longest examples together."""
    return sum(sorted(lengths, reverse=True)[:micro_batch])


def choose_token_budget(worst: int, longest: int, try_pass) -> int | None:
    """The most tokens per forward pass that fit: `try_pass(n)` runs a pass of n tokens, raising out-of-memory if
    they do not fit. None when the worst micro-batch fits whole. Halves down to the longest example; if that does
    not fit either, the out-of-memory error goes to the caller."""
    tokens = worst
    while True:
        try:
            try_pass(tokens)
            return None if tokens == worst else tokens
        except Exception as exc:  # noqa: BLE001
            if not is_oom(exc) or tokens <= longest:
                raise
            free_accelerator_memory()
            tokens = max(longest, tokens // 2)


def fit_token_budget(trainer, plan: BatchPlan, lengths: list[int], log) -> BatchPlan:
    """Memory probe before the first step (on GPUs): run the forward and backward pass of the worst micro-batch
    this data can produce, and cut passes to a token budget that fits if it does not. No gradients, random state
    or weights are changed, so training is the same as without the probe."""
    worst, longest = worst_pass_tokens(lengths, plan.micro_batch), max(lengths)
    budget = choose_token_budget(worst, longest, lambda n: probe_pass(trainer, n, longest))
    trainer.max_tokens_per_pass = budget
    if budget:
        log(f"memory probe: {worst:,} tokens in one pass do not fit; passes cut to {budget:,} tokens (same "
            "gradients, more passes)")
    return dataclasses.replace(plan, max_tokens_per_pass=budget)


def probe_pass(trainer, tokens: int, longest: int) -> None:
    """One forward and backward pass of `tokens` tokens, packed as examples of the longest length; nothing kept."""
    import torch

    model = trainer.model
    lengths = [longest] * (tokens // longest) + ([tokens % longest] if tokens % longest else [])
    generator = torch.Generator().manual_seed(0)  # its own random numbers: training's stay untouched
    ids = torch.randint(0, model.get_input_embeddings().num_embeddings, (1, tokens), generator=generator)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    inputs = trainer._prepare_inputs({"input_ids": ids, "labels": ids.clone(), "position_ids": positions})
    was_training = model.training
    model.eval()  # no dropout: it would draw from the training's random stream
    try:
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(model, inputs, num_items_in_batch=tokens)
        loss.backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        del inputs
        free_accelerator_memory()


def is_oom(exc: BaseException) -> bool:
    return "out of memory" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError"


def smaller_plan(plan: BatchPlan, cfg: TrainConfig, exc: BaseException) -> BatchPlan | None:
    """OOM back-off: halve the micro-batch, raising accumulation to keep the effective batch; at micro-batch 1 turn
    on gradient checkpointing (it costs about a third of the speed, so only when memory needs it). Only for a plan
    the product chose (not --micro_batch_size, not the reference profile, which must run as written)."""
    if not is_oom(exc) or cfg.micro_batch_size or cfg.profile == "reference":
        return None
    if plan.micro_batch == 1:
        return None if plan.gradient_checkpointing else dataclasses.replace(plan, gradient_checkpointing=True)
    per_process = plan.micro_batch * plan.accumulation
    micro = plan.micro_batch // 2
    while per_process % micro:
        micro -= 1
    return dataclasses.replace(plan, micro_batch=micro, accumulation=per_process // micro)


def free_accelerator_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def oom_advice(exc: BaseException, cfg: TrainConfig) -> DeepRedError | None:
    """The one-line advice for an out-of-memory error the back-off could not absorb; None for other errors."""
    if not is_oom(exc):
        return None
    return DeepRedError(f"out of memory at --max_seq_length {cfg.max_seq_length}, --batch_size {cfg.batch_size}: try "
                        "--max_seq_length 768 or 512, --profile lean, a smaller --micro_batch_size, or --use_4bit")
