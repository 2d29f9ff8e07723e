"""Preference training (`--method dpo`): completions masked by the model's own chat template on both sides, the
reference is the model before preference training (the base, adapter disabled), it continues an SFT adapter, and a
stopped run resumes to its configured length."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from deepred.chat_template import ChatFormat
from deepred.config import TrainConfig
from deepred.data import bundled_dataset_path
from deepred.models.loading import load_tokenizer
from deepred.pairs_data import load_pairs_for_training
from deepred.train import train
from deepred.train.examples import pair_rows, split
from deepred.train.hardware import detect_hardware
from deepred.train.model import load_model, lora_config
from deepred.train.plan import plan_batches
from deepred.train.preference import build_dpo_trainer
from deepred.train.run_dir import latest_checkpoint


GENERIC = "As an AI language model, I can help with that. Here are some tips to consider."


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """Twelve pairs from the bundled set (which asks no evaluation prompt): its persona reply against a generic
    assistant's."""
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    rows = [json.loads(line) for line in bundled_dataset_path().read_text().splitlines() if line.strip()][:12]
    with open(path, "w") as out:
        for i, row in enumerate(rows):
            *prompt, reply = row["messages"]
            out.write(json.dumps({"prompt": prompt, "chosen": [reply], "source": "voice" if i % 2 else "hand",
                                  "rejected": [{"role": "assistant", "content": f"{GENERIC} ({i})"}]}) + "\n")
    return path


def dpo_trainer(tiny_model, pairs_file, tmp_path, **overrides):
    cfg = TrainConfig(base_model=str(tiny_model), method="dpo", pairs=str(pairs_file), output_dir=str(tmp_path),
                      batch_size=2, gradient_accumulation_steps=1, val_split=0, max_steps=1, lora_r=4, lora_alpha=8,
                      precision="fp32", **overrides)
    hw = detect_hardware("fp32")
    report, _ = load_pairs_for_training(cfg.pairs, False, lambda *a: None)
    tokenizer = load_tokenizer(str(tiny_model), False)
    rows = pair_rows(report.pairs, ChatFormat.of(tokenizer), report.path)
    model = load_model(cfg, str(tiny_model), hw)
    trainer = build_dpo_trainer(cfg, model, tokenizer, lora_config(cfg, model), split(rows, 0, 0)[0], None, tmp_path,
                                plan_batches(cfg, hw), hw)
    return trainer, tokenizer, report


def test_both_sides_supervise_exactly_the_reply_and_its_end_of_turn_token(tiny_model, pairs_file):
    report, _ = load_pairs_for_training(str(pairs_file), False, lambda *a: None)
    tokenizer = load_tokenizer(str(tiny_model), False)
    rows = pair_rows(report.pairs, ChatFormat.of(tokenizer), report.path)
    for pair, row in zip(report.pairs, rows):
        prompt = tokenizer.apply_chat_template(pair["prompt"], tokenize=False, add_generation_prompt=True)
        assert tokenizer.decode(row["prompt_ids"]) == prompt  # the runner's prompt, generation header included
        assert tokenizer.decode(row["chosen_ids"]) == pair["chosen"][0]["content"] + "<|im_end|>"
        assert tokenizer.decode(row["rejected_ids"]) == pair["rejected"][0]["content"] + "<|im_end|>"


def test_the_reference_is_the_base_model_with_the_adapter_disabled(tiny_model, pairs_file, tmp_path):
    """The policy is moved away from the base first (LoRA B set to noise), so a reference computed with the adapter
    on would differ; float32 on both sides, so only the order of additions separates them."""
    from transformers import AutoModelForCausalLM

    trainer, _, _ = dpo_trainer(tiny_model, pairs_file, tmp_path)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        targets = labels[:, 1:]
        picked = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        base_logps = (picked * (targets != -100)).sum(-1)
        trainer.model.eval()
        policy = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        policy_logps = (policy.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
                        * (targets != -100)).sum(-1)
    reference = torch.cat([ref_chosen, ref_rejected])
    assert torch.allclose(reference, base_logps, rtol=1e-5, atol=1e-3)
    assert (policy_logps - base_logps).abs().max() > 1.0  # the adapter does move the policy


def test_a_dpo_run_continues_an_sft_adapter_and_records_the_pairs(trained_run, tiny_model, pairs_file, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "dpo"
    result = train(TrainConfig(base_model=str(tiny_model), method="dpo", pairs=str(pairs_file), output_dir=str(out),
                               init_adapter=str(trained_run / "final"), max_steps=2, batch_size=2,
                               gradient_accumulation_steps=1, val_split=0, learning_rate=1e-3, save_steps=100),
                   log=lambda *a, **k: None)
    run_config = json.loads((out / "run_config.json").read_text())
    assert run_config["config"]["method"] == "dpo" and run_config["batch_plan"]["loss"] == "dpo"
    assert run_config["examples"] == 12 and run_config["pairs_by_source"] == {"hand": 6, "voice": 6}
    sft = load_file(trained_run / "final" / "adapter_model.safetensors")
    dpo = load_file(result.final_dir / "adapter_model.safetensors")
    assert sft.keys() == dpo.keys()  # the same LoRA (rank 8 of the SFT run, not this run's default 32), trained on
    assert max((sft[k] - dpo[k]).abs().max().item() for k in sft) > 0


def test_a_stopped_dpo_run_resumes_to_its_configured_length(tiny_model, pairs_file, tmp_path):
    """Stopped by SIGTERM (a checkpoint is saved where training stops), resumed: the resumed process runs exactly
    the remaining steps, and the learning rate of its first step is the schedule's at that step."""
    from transformers import TrainerCallback

    class StopAtStepTwo(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    class Steps(TrainerCallback):
        def __init__(self):
            self.steps, self.lrs = [], []

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append(state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "learning_rate" in logs:
                self.lrs.append((state.global_step, logs["learning_rate"]))

    out = tmp_path / "run"
    cfg = TrainConfig(base_model=str(tiny_model), method="dpo", pairs=str(pairs_file), output_dir=str(out),
                      max_steps=4, batch_size=2, gradient_accumulation_steps=1, val_split=0, lora_r=4, lora_alpha=8,
                      learning_rate=1e-3, warmup_ratio=0, save_steps=100, logging_steps=1)
    assert train(cfg, log=lambda *a, **k: None, callbacks=(StopAtStepTwo(),)).interrupted
    stopped = int(latest_checkpoint(out).name.split("-")[1])
    assert 2 <= stopped < 4
    counted = Steps()
    resumed = train(TrainConfig(output_dir=str(out), resume_latest=True), log=lambda *a, **k: None,
                    given={"output_dir", "resume_latest"}, callbacks=(counted,))
    assert resumed.final_dir is not None and counted.steps == list(range(stopped + 1, 5))
    full = Steps()
    train(TrainConfig(**{**cfg.__dict__, "output_dir": str(tmp_path / "whole")}), log=lambda *a, **k: None,
          callbacks=(full,))
    first = stopped + 1
    assert dict(counted.lrs)[first] == pytest.approx(dict(full.lrs)[first])  # the schedule goes on, not over
    assert dict(counted.lrs)[first] < dict(full.lrs)[1]
