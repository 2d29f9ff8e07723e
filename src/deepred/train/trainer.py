"""The Trainer: TRL's SFTTrainer with the batch plan's settings, and, where the plan's loss is not TRL's, a subclass
that scores only the supervised positions and keeps each forward pass within the token budget."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

from ..config import TrainConfig
from ..errors import DeepRedError
from .hardware import Hardware
from .loss import split_packed_batch, supervised_loss
from .plan import BatchPlan


def trainer_class(plan: BatchPlan, hw: Hardware):
    """TRL's SFTTrainer where the plan's loss is TRL's (reference profile, FSDP); otherwise one that scores only
    the supervised positions and keeps each forward pass within the token budget. The loss is TRL's: the sum of
    token losses over the supervised positions divided by the number of supervised tokens in the effective batch."""
    import torch
    from trl import SFTTrainer

    if plan.loss == "trl":
        return SFTTrainer

    class DeepRedSFTTrainer(SFTTrainer):
        max_tokens_per_pass: int | None = None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if return_outputs:
                return super().compute_loss(model, inputs, True, num_items_in_batch)
            model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
            # Through the (DDP/PEFT) wrapper for the body; logits for one position only, then the head on the
            # supervised positions. The last hidden state is the one after the final norm.
            out = model(**model_inputs, use_cache=False, output_hidden_states=True, logits_to_keep=1)
            targets = inputs["labels"][:, 1:]  # hidden state i predicts token i+1
            mask = targets != -100
            head = self.accelerator.unwrap_model(model).get_output_embeddings()
            kind = plan.loss if isinstance(head, torch.nn.Linear) else "supervised"
            loss = supervised_loss(head, out.hidden_states[-1][:, :-1][mask], targets[mask], kind,
                                   cpu_bf16=hw.device == "cpu" and self.args.bf16)
            num_tokens = mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = loss / torch.as_tensor(num_tokens).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients; the count covers all ranks
            return loss

        def training_step(self, model, inputs, num_items_in_batch=None):
            pieces = split_packed_batch(inputs, self.max_tokens_per_pass)
            if len(pieces) == 1:
                return super().training_step(model, inputs, num_items_in_batch)
            if num_items_in_batch is None:
                num_items_in_batch = (inputs["labels"][:, 1:] != -100).sum()
            total = 0
            for i, piece in enumerate(pieces):
                # gradients are synchronised across processes once, with the last piece
                last = i == len(pieces) - 1
                with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                    total = total + super().training_step(model, piece, num_items_in_batch)
            return total

        def _track_num_input_tokens(self, inputs):
            if "attention_mask" not in inputs and "position_ids" in inputs:  # padding-free: every token is real
                inputs = {**inputs, "attention_mask": torch.ones_like(inputs["input_ids"])}
            super()._track_num_input_tokens(inputs)

    return DeepRedSFTTrainer


def checkpointing_args(on: bool) -> dict:
    """Gradient checkpointing under the argument names this transformers has (5.17+ renamed them to
    activation_checkpointing and warns on the old ones)."""
    from trl import SFTConfig

    kwargs = {"use_reentrant": False}
    if "activation_checkpointing" in {f.name for f in dataclasses.fields(SFTConfig)}:
        return {"activation_checkpointing": on, "activation_checkpointing_kwargs": kwargs}
    return {"gradient_checkpointing": on, "gradient_checkpointing_kwargs": kwargs}


def build_trainer(cfg: TrainConfig, model, tokenizer, peft_config, train_set, eval_set, output_dir: Path,
                  plan: BatchPlan, hw: Hardware):
    from transformers import PrinterCallback, ProgressCallback
    from trl import SFTConfig

    args = SFTConfig(
        **common_arguments(cfg, plan, hw, output_dir, eval_set),
        max_length=None,  # rows arrive cut to --max_seq_length (truncate_rows), as padding-free batches require
        assistant_only_loss=False,  # the rows carry assistant_masks from the model's own template (chat_template.py)
        packing=False,
        padding_free=plan.padding_free,
        train_sampling_strategy="random",  # the same examples in the same order under every profile
        pad_to_multiple_of=8 if hw.device == "cuda" and not plan.padding_free else None,
        use_liger_kernel=plan.liger_layer_kernels,
        include_num_input_tokens_seen="non_padding",
        dataset_num_proc=None,
    )
    trainer = trainer_class(plan, hw)(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                                      processing_class=tokenizer, peft_config=peft_config)
    trainer.max_tokens_per_pass = plan.max_tokens_per_pass
    for callback in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(callback)
    return trainer


def common_arguments(cfg: TrainConfig, plan: BatchPlan, hw: Hardware, output_dir: Path, eval_set) -> dict:
    """The Trainer arguments every method shares."""
    return dict(
        output_dir=str(output_dir),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,  # 0 or less: --epochs decides
        per_device_train_batch_size=plan.micro_batch,
        per_device_eval_batch_size=plan.micro_batch,
        gradient_accumulation_steps=plan.accumulation,
        **checkpointing_args(plan.gradient_checkpointing),
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a float below 1 is a ratio of the total steps
        weight_decay=0.0,
        neftune_noise_alpha=cfg.neftune_noise_alpha,
        optim="adamw_torch_fused" if hw.device == "cuda" else "adamw_torch",
        bf16=hw.bf16,
        fp16=hw.fp16,
        use_cpu=hw.device == "cpu",
        ddp_backend="gloo" if hw.device == "cpu" and hw.world_size > 1 else None,
        ddp_find_unused_parameters=False if hw.world_size > 1 else None,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        eval_strategy="steps" if eval_set is not None else "no",
        eval_steps=cfg.eval_steps,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=report_to(cfg),
        disable_tqdm=True,
        dataloader_pin_memory=hw.device == "cuda",
        dataloader_num_workers=2 if hw.device == "cuda" else 0,
    )


def report_to(cfg: TrainConfig) -> str:
    if not cfg.wandb:
        return "none"
    try:
        import wandb  # noqa: F401
    except ImportError as exc:
        raise DeepRedError("--wandb needs the wandb package: pip install wandb (then `wandb login`)") from exc
    return "wandb"
