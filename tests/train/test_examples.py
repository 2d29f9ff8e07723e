"""The training examples carry loss on the assistant's replies only."""

from __future__ import annotations

from deepred.chat_template import ChatFormat, tokenize_examples
from deepred.config import TrainConfig
from deepred.data import load_for_training
from deepred.models.loading import load_tokenizer
from deepred.train.examples import split
from deepred.train.hardware import detect_hardware
from deepred.train.model import load_model, lora_config
from deepred.train.plan import plan_batches
from deepred.train.trainer import build_trainer

from ..conftest import DATA


def test_only_assistant_tokens_carry_loss(tiny_model, tmp_path):
    cfg = TrainConfig(base_model=str(tiny_model), dataset=str(DATA / "mini.jsonl"), output_dir=str(tmp_path),
                      val_split=0, lora_r=4, lora_alpha=8)
    report, _ = load_for_training(cfg.dataset, False, log=lambda *_: None)
    hw = detect_hardware()
    tokenizer = load_tokenizer(cfg.base_model, False)
    model = load_model(cfg, cfg.base_model, hw)
    train_set, _ = split(tokenize_examples(report.examples, ChatFormat.of(tokenizer)), 0, cfg.seed)
    trainer = build_trainer(cfg, model, tokenizer, lora_config(cfg, model), train_set, None, tmp_path,
                               plan_batches(cfg, hw), hw)
    processed = trainer.train_dataset
    assert len(processed) == len(report.examples)
    for row in processed:
        ids, labels = row["input_ids"], row["labels"]
        supervised = tokenizer.decode([t for t, lab in zip(ids, labels) if lab != -100])
        full = tokenizer.decode(ids)
        messages = next(ex["messages"] for ex in report.examples
                        if all(m["content"] in full for m in ex["messages"]))
        assistant = "".join(m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant")
        assert supervised == assistant
        assert messages[0]["content"] not in supervised and messages[1]["content"] not in supervised
        assert labels[0] == -100


def test_system_prompt_variants_reach_the_rows_under_the_templates_default_with_loss_on_replies_only(tiny_model):
    from deepred.train.examples import load_data, training_rows

    cfg = TrainConfig(base_model=str(tiny_model), dataset=str(DATA / "mini.jsonl"), system_prompt_variants=0.5)
    said = []
    report, varied_hash = load_data(cfg, said.append)
    _, plain_hash = load_data(TrainConfig(base_model=str(tiny_model), dataset=str(DATA / "mini.jsonl")), said.append)
    assert varied_hash != plain_hash  # a run trained on other prompts is not mistaken for this one
    assert any("keep only the first sentence" in line for line in said)
    tokenizer = load_tokenizer(cfg.base_model, False)
    rows = training_rows(cfg, report, tokenizer, lambda *_: None)
    texts = [tokenizer.decode(row["input_ids"]) for row in rows]
    qwen_default = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    dropped = [text for text in texts if qwen_default in text]
    shortened = [text for text in texts if "guiding humanity's Mars city utopia.<|im_end|>" in text]
    assert len(dropped) == 6 and len(shortened) == 6 and len(rows) == 24  # 12 of the 24 with a system prompt
    for row, example in zip(rows, report.examples):
        supervised = tokenizer.decode([t for t, m in zip(row["input_ids"], row["assistant_masks"]) if m])
        assert supervised == "".join(m["content"] + "<|im_end|>" for m in example["messages"] if m["role"] == "assistant")
