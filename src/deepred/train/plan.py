"""The batch plan: how the user's effective batch is computed on this hardware (a pure function of the settings)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import TrainConfig
from ..errors import DeepRedError
from .hardware import Hardware

LOSSES = {"trl": "TRL's own (every position scored)",
          "supervised": "output layer on the supervised positions only",
          "liger": "Liger fused linear cross-entropy on the supervised positions only",
          "dpo": "TRL's DPO loss on the completions (reference: the model before this training)",
          "orpo": "TRL's ORPO loss: SFT on the chosen completion plus the odds ratio against the rejected one"}


EAGER_CPU_MAX_TOKENS = 256  # rows mostly up to this length train with eager attention on a CPU (cpu_attention)


@dataclass
class BatchPlan:
    micro_batch: int
    accumulation: int
    gradient_checkpointing: bool
    padding_free: bool  # a micro-batch's examples run as one row, each attending only to itself
    loss: str  # one of LOSSES
    liger_layer_kernels: bool  # Liger's RMSNorm, SwiGLU and RoPE kernels
    max_tokens_per_pass: int | None = None  # a padding-free micro-batch over it runs in pieces
    attention: str | None = None  # the attention kernel the plan asks for; None: the model's own choice (sdpa)

    def describe(self, world_size: int) -> str:
        shape = (f"micro-batch {self.micro_batch} x accumulation {self.accumulation}"
                 + (f" x {world_size} processes" if world_size > 1 else "")
                 + f" = {self.micro_batch * self.accumulation * world_size} examples per optimizer step")
        layout = "padding-free (attention within each example)" if self.padding_free else "padded batches"
        if self.max_tokens_per_pass:
            layout += f", at most {self.max_tokens_per_pass:,} tokens per pass"
        if self.attention:
            layout += f", {self.attention} attention"
        return (f"{shape}; {layout}; gradient checkpointing {'on' if self.gradient_checkpointing else 'off'}; "
                f"loss: {LOSSES[self.loss]}"
                + ("; Liger layer kernels" if self.liger_layer_kernels else ""))


def plan_batches(cfg: TrainConfig, hw: Hardware, fsdp: bool = False, liger: bool = False,
                 p95_length: int | None = None) -> BatchPlan:
    """Keep the user's effective batch (batch_size x accumulation) and choose how to compute it. `fsdp`: launched
    under FSDP; `liger`: liger-kernel is installed (hardware.under_fsdp and liger_available say); `p95_length`:
    the 95th percentile of the training rows' lengths in tokens.

    `reference` runs the specification's settings as written (TRL's trainer and loss, padded micro-batches of
    --batch_size, gradient checkpointing). `fast` scores only the supervised positions and, on a GPU, puts the
    whole effective batch through one padding-free forward pass (a GPU at this batch size is bound by per-step
    overhead, and memory then follows the real tokens, not the longest example), with Liger's fused loss. `lean`
    adds gradient checkpointing for small memory. `--method dpo` keeps the micro-batch choice and checkpointing of
    its profile; its batches are padded pairs and its loss is TRL's DPO loss. On a CPU both run eager attention
    where the rows are short (cpu_attention).
    None of this changes what is learned: the loss is normalised per supervised token over the whole effective
    batch, packed examples never attend to each other, and every attention kernel computes the same softmax.
    """
    if cfg.max_tokens_per_pass is not None and cfg.max_tokens_per_pass < 1:
        raise DeepRedError(f"--max_tokens_per_pass must be at least 1 (got {cfg.max_tokens_per_pass}); leave it out "
                           "to let the memory probe choose")
    if cfg.neftune_noise_alpha is not None and cfg.method != "sft":
        raise DeepRedError(f"--neftune_noise_alpha is for --method sft (a preference method's reference pass would "
                           f"see the noise too); leave it out of --method {cfg.method}")
    if cfg.max_tokens_per_pass is not None and cfg.neftune_noise_alpha is not None:
        raise DeepRedError("--neftune_noise_alpha needs padded batches (its noise is scaled by the length of the row it sees) and "
                           "--max_tokens_per_pass needs padding-free ones; leave one of them out")
    per_process = examples_per_process(cfg, hw.world_size)
    on_cuda = hw.device == "cuda" and not hw.rocm
    fused = on_cuda and liger and "lm_head" not in cfg.modules_to_save
    if cfg.profile == "reference":
        micro = cfg.micro_batch_size or divisor_at_most(per_process, cfg.batch_size)
        return BatchPlan(micro, per_process // micro, True, False, "trl", False,
                         attention=plan_attention(cfg, hw, False, p95_length))
    micro = cfg.micro_batch_size or divisor_at_most(per_process, per_process if hw.device == "cuda" else cfg.batch_size)
    layer_kernels = fused and not (cfg.use_4bit or cfg.use_8bit)
    if cfg.method != "sft":  # TRL's preference trainers pad their pairs and compute their own loss
        return BatchPlan(micro, per_process // micro, cfg.profile == "lean", False, cfg.method,
                         layer_kernels and cfg.method == "dpo", attention=plan_attention(cfg, hw, False, p95_length))
    # On a CPU padded batches of 4 ran as fast as padding-free ones (SmolLM2: 221-255 vs 227 tokens/s), whose
    # attention mask covers the whole row; a token budget needs padding-free rows to cut. NEFTune scales its noise
    # by the length of the row it sees, which a padding-free row of several examples would shrink.
    padding_free = (hw.device == "cuda" or cfg.max_tokens_per_pass is not None) and cfg.neftune_noise_alpha is None
    # Under FSDP the output layer's weight is sharded outside the model's own forward pass, where the supervised
    # loss applies it; TRL's loss stays inside that pass (unmeasured on GPUs: README, "More than one GPU")
    loss = "trl" if fsdp else "liger" if fused else "supervised"
    return BatchPlan(micro, per_process // micro, cfg.profile == "lean", padding_free, loss, layer_kernels,
                     cfg.max_tokens_per_pass, plan_attention(cfg, hw, padding_free, p95_length))


def examples_per_process(cfg: TrainConfig, world_size: int) -> int:
    """Each process's share of the effective batch per optimizer step; a share that is not whole, or a
    --micro_batch_size that does not divide it, is refused: the effective batch never changes."""
    effective = cfg.batch_size * cfg.gradient_accumulation_steps
    if effective % world_size:
        raise DeepRedError(f"the effective batch {effective} (--batch_size x --gradient_accumulation_steps) does not "
                           f"divide among {world_size} processes; choose sizes whose product is a multiple of "
                           f"{world_size}")
    per_process = effective // world_size
    if cfg.micro_batch_size and per_process % cfg.micro_batch_size:
        choices = [str(n) for n in range(1, per_process + 1) if per_process % n == 0]
        raise DeepRedError(f"--micro_batch_size {cfg.micro_batch_size} does not divide the {per_process} examples "
                           f"each process takes per optimizer step, so the effective batch would change; choose one "
                           f"of {', '.join(choices)}, or leave it out")
    return per_process


def divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of n that is at most `limit` (at least 1)."""
    return next(d for d in range(max(1, min(limit, n)), 0, -1) if n % d == 0)


def plan_attention(cfg: TrainConfig, hw: Hardware, padding_free: bool, p95_length: int | None) -> str | None:
    """The attention kernel `--attn_implementation auto` asks for; None: the model's own (sdpa where it has one).
    Eager on ROCm under every profile (the stable kernel on AMD GPUs), and on a CPU where cpu_attention says."""
    if cfg.attn_implementation != "auto":
        return None
    if hw.rocm:
        return "eager"
    return cpu_attention(hw, padding_free, p95_length) if cfg.profile != "reference" else None


def cpu_attention(hw: Hardware, padding_free: bool, p95_length: int | None) -> str | None:
    """Eager attention for padded CPU batches of short rows under bf16 autocast (plan_attention asks, for
    `--attn_implementation auto` outside the reference profile), where the model would get sdpa.

    Why (benchmarks/RESULTS.md, SmolLM2 LoRA steps of 4 rows): PyTorch's CPU sdpa kernel under bf16 autocast took
    18 % of a step at 200 tokens, where eager attention made the step 14 % shorter (and the demo's SFT 14 %), but
    eager was slower at 320 and 512 tokens and in float32. So eager only where 95 % of the rows fit
    EAGER_CPU_MAX_TOKENS; padding-free rows are one long row and keep the kernel that builds their mask.
    """
    if hw.device != "cpu" or not hw.bf16 or padding_free or p95_length is None:
        return None
    return "eager" if p95_length <= EAGER_CPU_MAX_TOKENS else None
