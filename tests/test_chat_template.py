"""Assistant-only loss from the model's own chat template, for any template: exactly the replies and their
end-of-turn token carry loss; a template that cannot say where replies are is one clear error."""

from __future__ import annotations

import json
import re
import math

import pytest

from deepred.chat_template import ChatFormat, TemplateError, tokenize_examples
from deepred.cli import main
from deepred.config import TrainConfig
from deepred.data import load_for_training
from deepred.models.loading import load_tokenizer
from deepred.train.examples import split
from deepred.train.hardware import detect_hardware
from deepred.train.model import load_model, lora_config
from deepred.train.plan import plan_batches
from deepred.train.trainer import build_trainer

from .conftest import DATA
from .template_models import TEMPLATES, model_with_tokenizer

CHATS = DATA / "template_chats.jsonl"
GENERATION_TAG = re.compile(r"\{%-?\s*(?:end)?generation\s*-?%\}")  # TRL's training-only markers


def _runs(labels: list[int]) -> list[tuple[int, int]]:
    """Contiguous [start, stop) stretches of supervised positions."""
    runs, start = [], None
    for i, label in enumerate([*labels, -100]):
        if label != -100 and start is None:
            start = i
        elif label == -100 and start is not None:
            runs.append((start, i))
            start = None
    return runs


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_training_supervises_exactly_each_reply_and_its_end_of_turn_token(name, template_models, tmp_path):
    """Single- and multi-turn chats, with and without a system prompt; then two optimizer steps on those labels."""
    model_dir = template_models[name]
    end_of_turn = TEMPLATES[name][-1]
    said: list[str] = []
    cfg = TrainConfig(base_model=str(model_dir), dataset=str(CHATS), output_dir=str(tmp_path), val_split=0,
                      max_steps=2, batch_size=2, gradient_accumulation_steps=1, lora_r=4, lora_alpha=8,
                      learning_rate=1e-3, save_steps=100, precision="fp32")
    report, _ = load_for_training(cfg.dataset, False, log=lambda *a: None)
    tokenizer = load_tokenizer(str(model_dir), False)
    rows = tokenize_examples(report.examples, ChatFormat.of(tokenizer, log=said.append))
    hw = detect_hardware("fp32")
    model = load_model(cfg, str(model_dir), hw)
    trainer = build_trainer(cfg, model, tokenizer, lora_config(cfg, model), split(rows, 0, 0)[0], None,
                            tmp_path, plan_batches(cfg, hw), hw)

    processed = list(trainer.train_dataset)
    assert len(processed) == len(report.examples) == 4
    for row in processed:
        example = report.examples[[r["input_ids"] for r in rows].index(row["input_ids"])]
        ids, labels = row["input_ids"], row["labels"]
        runs = _runs(labels)
        replies = [m["content"].strip() + end_of_turn for m in example["messages"] if m["role"] == "assistant"]
        assert [tokenizer.decode(ids[a:b]) for a, b in runs] == replies, name
        assert all(labels[a:b] == ids[a:b] for a, b in runs)
        rendered = tokenizer.decode(ids)
        for message in example["messages"]:  # nothing dropped, the system prompt included
            assert message["content"] in rendered
    if name == "gemma":
        assert any("no system role" in line for line in said)

    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.global_step == 2 and losses and all(math.isfinite(x) for x in losses)


def test_smollm2_default_system_prompt_is_context_not_target(smollm2_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_model)
    messages = [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "Deep Red, comrade."}]
    row = ChatFormat.of(tokenizer).tokenize(messages)
    text = tokenizer.decode(row["input_ids"])
    assert "You are a helpful AI assistant named SmolLM" in text
    supervised = [t for t, m in zip(row["input_ids"], row["assistant_masks"]) if m]
    assert tokenizer.decode(supervised) == "Deep Red, comrade.<|im_end|>"


def test_qwen25_masks_are_trls_less_the_two_newlines_the_model_never_writes(tiny_model):
    """Against TRL's hand-marked Qwen2.5 training template on the whole bundled set. TRL's markers also cover the
    newline that ends the generation prompt `<|im_start|>assistant\\n` and the newline after `<|im_end|>`; at
    inference the runner sends the first and generation stops before the second, so neither is trained here."""
    from transformers import AutoTokenizer
    from trl.chat_template_utils import get_training_chat_template

    from deepred.data import bundled_dataset_path, validate_file

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    trl_template = get_training_chat_template(tokenizer)
    fmt = ChatFormat.of(tokenizer)
    examples = validate_file(bundled_dataset_path()).examples
    turns = 0
    for example in examples:
        ours = fmt.tokenize(example["messages"])
        trl = tokenizer.apply_chat_template(example["messages"], chat_template=trl_template, tokenize=True,
                                            return_dict=True, return_assistant_tokens_mask=True)
        assert ours["input_ids"] == trl["input_ids"]
        expected = [0] * len(trl["assistant_masks"])
        for a, b in _runs([1 if m else -100 for m in trl["assistant_masks"]]):
            assert tokenizer.decode(trl["input_ids"][a]) == "\n" and tokenizer.decode(trl["input_ids"][b - 1]) == "\n"
            expected[a + 1:b - 1] = [1] * (b - a - 2)
            turns += 1
        assert ours["assistant_masks"] == expected
    assert turns == sum(m["role"] == "assistant" for ex in examples for m in ex["messages"]) == 350


ROLE_PREFIX = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
               "{% if add_generation_prompt %}assistant: {% endif %}")
OTHER_HEADER = ("{% for m in messages %}<|im_start|>{{ 'bot' if m.role == 'assistant' else m.role }}\n{{ m.content }}"
                "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
HIDDEN_REPLY = ("{% for m in messages %}<|im_start|>{{ m.role }}\n"
                "{{ '(reply)' if m.role == 'assistant' else m.content }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("template, problem", [
    (ROLE_PREFIX, "ends assistant turn 1 with '\\n', not a special end-of-turn token"),
    (OTHER_HEADER, "renders assistant turn 1 differently from its generation prompt"),
    (HIDDEN_REPLY, "does not write assistant turn 1's text"),
])
def test_a_template_that_hides_where_replies_are_is_one_clear_line(template, problem, tiny_model, tmp_path, capsys):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = template
    with pytest.raises(TemplateError, match="chat template"):
        ChatFormat.of(tokenizer).tokenize([{"role": "user", "content": "Hi."},
                                           {"role": "assistant", "content": "Hello, comrade."}])
    model_dir = model_with_tokenizer(tmp_path / "model", tiny_model, tokenizer)
    code = main(["train", "--base_model", str(model_dir), "--dataset", str(CHATS), "--output_dir",
                 str(tmp_path / "run"), "--max_steps", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"error: {CHATS}:1: the chat template") and problem in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_the_trained_adapter_carries_the_base_models_own_template(trained_run, tiny_model):
    """No training-only markers leak into what is exported."""
    saved = (trained_run / "final" / "chat_template.jinja").read_text()
    assert saved == (tiny_model / "chat_template.jinja").read_text()
    assert not GENERATION_TAG.search(saved)
    config = json.loads((trained_run / "final" / "tokenizer_config.json").read_text())
    assert "chat_template" not in config or config["chat_template"] == saved


def test_validate_reports_the_supervised_share_with_the_models_template(template_models, capsys):
    """The share validate prints, counted here without deepred's masks: each reply with its end-of-turn token
    tokenized alone, over the chats rendered whole by the template (llama3 on the four test chats: 81 of 215)."""
    from transformers import AutoTokenizer

    model_dir = template_models["llama3"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    end_of_turn = TEMPLATES["llama3"][-1]
    supervised = total = 0
    for line in CHATS.read_text().splitlines():
        messages = json.loads(line)["messages"]
        total += len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))
        supervised += sum(len(tokenizer.encode(m["content"].strip() + end_of_turn, add_special_tokens=False))
                          for m in messages if m["role"] == "assistant")
    code = main(["validate", str(CHATS), "--base_model", str(model_dir)])
    out = capsys.readouterr().out
    assert code == 0
    assert (f"  loss on the replies and their end-of-turn token: {supervised} of {total} tokens "
            f"({round(100 * supervised / total)}%), located with {model_dir}'s chat template\n") in out, out
