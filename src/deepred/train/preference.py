"""Preference training: TRL's DPOTrainer (`--method dpo`) and ORPOTrainer (`--method orpo`, from
trl.experimental) on pairs that examples.py tokenized with the model's own chat template. TRL's own tokenization is
bypassed, so preference training and SFT supervise the same tokens under any template.

DPO pulls the chosen answer up and the rejected one down relative to a reference. ORPO needs no reference: it adds
an odds-ratio term that separates chosen from rejected to the SFT loss on the chosen answer, so it costs two
forward passes a pair where DPO costs four.

The reference is the model before preference training, never a second copy of the base weights: trained from the
base, TRL computes it with the adapter disabled; continued from an adapter (--init_adapter, e.g. an SFT run's final/),
TRL keeps a frozen copy of that adapter beside the one it trains.
"""

from __future__ import annotations

from pathlib import Path

from ..config import TrainConfig
from .hardware import Hardware
from .plan import BatchPlan
from .trainer import common_arguments


def dpo_trainer_class():
    """TRL's DPOTrainer taking rows that are already tokenized (pair_rows) instead of tokenizing them itself."""
    from trl import DPOTrainer

    class DeepRedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if "prompt_ids" in dataset.column_names:
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    return DeepRedDPOTrainer


def orpo_trainer_class():
    """TRL's (experimental) ORPOTrainer taking rows that are already tokenized: each row keeps its prompt_ids,
    chosen_ids and rejected_ids, and tokenize_row lays them out as ORPO's collator expects."""
    from trl.experimental.orpo import ORPOTrainer

    class DeepRedORPOTrainer(ORPOTrainer):
        def tokenize_row(self, feature, model=None):
            prompt, chosen, rejected = feature["prompt_ids"], feature["chosen_ids"], feature["rejected_ids"]
            row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
            for side, completion in (("chosen", chosen), ("rejected", rejected)):
                row[f"{side}_input_ids"] = prompt + completion
                row[f"{side}_attention_mask"] = [1] * (len(prompt) + len(completion))
                row[f"{side}_labels"] = [-100] * len(prompt) + completion
            return row

    return DeepRedORPOTrainer


def build_preference_trainer(cfg: TrainConfig, model, tokenizer, peft_config, train_set, eval_set, output_dir: Path,
                             plan: BatchPlan, hw: Hardware):
    builder = build_orpo_trainer if cfg.method == "orpo" else build_dpo_trainer
    return builder(cfg, model, tokenizer, peft_config, train_set, eval_set, output_dir, plan, hw)


def build_orpo_trainer(cfg: TrainConfig, model, tokenizer, peft_config, train_set, eval_set, output_dir: Path,
                       plan: BatchPlan, hw: Hardware):
    from transformers import PrinterCallback, ProgressCallback
    from trl.experimental.orpo import ORPOConfig

    def with_text(dataset):  # the string columns ORPO's own preparation passes over untouched
        return None if dataset is None else dataset.map(lambda row: {"prompt": "", "chosen": "", "rejected": ""})

    # rows arrive cut to --max_seq_length (truncate_pairs); the limits only tell ORPO it need not cut them again
    args = ORPOConfig(**common_arguments(cfg, plan, hw, output_dir, eval_set), beta=cfg.beta,
                      max_length=cfg.max_seq_length, max_completion_length=cfg.max_seq_length,
                      remove_unused_columns=False)
    trainer = orpo_trainer_class()(model=model, args=args, train_dataset=with_text(train_set),
                                   eval_dataset=with_text(eval_set), processing_class=tokenizer,
                                   peft_config=peft_config)
    for callback in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(callback)
    return trainer


def build_dpo_trainer(cfg: TrainConfig, model, tokenizer, peft_config, train_set, eval_set, output_dir: Path,
                      plan: BatchPlan, hw: Hardware):
    from transformers import PrinterCallback, ProgressCallback
    from trl import DPOConfig

    args = DPOConfig(**common_arguments(cfg, plan, hw, output_dir, eval_set), beta=cfg.beta, loss_type=["sigmoid"],
                     max_length=None, pad_to_multiple_of=None, use_liger_kernel=plan.liger_layer_kernels)
    trainer = dpo_trainer_class()(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                                  processing_class=tokenizer, peft_config=peft_config)
    for callback in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(callback)
    return trainer
