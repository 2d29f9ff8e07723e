"""A chat template with no system role (Gemma 1/2, Mistral v0.1 raise on one; some drop it) is asked as it was
trained, everywhere: training puts the system prompt at the start of the first user message, and so do merge's
verification, the GGUF check, evaluation and `deepred serve` (before, each of them raised on the system message, or
the server answered HTTP 500)."""

from __future__ import annotations

import json

import httpx
import pytest

from deepred.chat_template import TemplateError, fold_system_prompt, has_system_role, template_messages
from deepred.serve import models_without_system_role, start_server

from .conftest import DATA, deepred
from .template_models import TEMPLATES

SYSTEM, QUESTION = "You are Deep Red.", "What is the plan for the harvest?"
CHAT = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
DROPS_SYSTEM = ("{% for m in messages if m.role != 'system' %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_the_system_prompt_opens_the_first_user_message_and_nothing_else_moves():
    chat = [*CHAT, {"role": "assistant", "content": "Sow early."}, {"role": "user", "content": "And then?"}]
    folded = fold_system_prompt(chat)
    assert folded == [{"role": "user", "content": f"{SYSTEM}\n\n{QUESTION}"}, *chat[2:]]
    assert chat[1]["content"] == QUESTION  # the caller's messages are left as they are
    assert fold_system_prompt(chat[1:]) == chat[1:]
    parts = fold_system_prompt([CHAT[0], {"role": "user", "content": [{"type": "text", "text": QUESTION}]}])
    assert parts[0]["content"] == [{"type": "text", "text": f"{SYSTEM}\n\n"}, {"type": "text", "text": QUESTION}]
    with pytest.raises(TemplateError, match="no user turn"):
        fold_system_prompt([CHAT[0], {"role": "assistant", "content": "Sow early."}])


def test_only_templates_without_a_system_role_are_folded_and_none_loses_the_prompt(template_models):
    from transformers import AutoTokenizer

    for name in TEMPLATES:
        tokenizer = AutoTokenizer.from_pretrained(template_models[name])
        messages = template_messages(tokenizer, CHAT)
        assert (messages != CHAT) == (name == "gemma"), name
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert SYSTEM in rendered and QUESTION in rendered, name
    tokenizer.chat_template = DROPS_SYSTEM  # silently dropped counts as no system role
    assert not has_system_role(lambda chat: tokenizer.apply_chat_template(chat, tokenize=False))
    assert template_messages(tokenizer, CHAT) == fold_system_prompt(CHAT)


@pytest.fixture(scope="module")
def gemma_gguf(template_models, tmp_path_factory):
    """A tiny model with Gemma's template (no system role) trained, merged with --verify and converted with the
    GGUF check on, as a user would: each step renders chats with a system prompt."""
    base, out = template_models["gemma"], tmp_path_factory.mktemp("gemma")
    deepred("train", "--base_model", base, "--dataset", DATA / "template_chats.jsonl", "--output_dir", out / "run",
            "--max_steps", 1, "--batch_size", 2, "--gradient_accumulation_steps", 1, "--lora_r", 4, "--lora_alpha", 8,
            "--save_steps", 100, "--val_split", 0)
    deepred("merge", "--base_model", base, "--lora_path", out / "run" / "final", "--output_path", out / "merged",
            "--verify")
    deepred("convert", "--model_path", out / "merged", "--output_path", out / "gemma.gguf", "--quant_type", "f16")
    return out / "merged", out / "gemma.gguf"


def test_the_server_folds_the_system_prompt_for_a_template_without_one(gemma_gguf, gguf_file, tiny_model):
    merged, gguf = gemma_gguf
    assert models_without_system_role({"gemma": gguf, "qwen": gguf_file(tiny_model, "q4_k_m")}) == {"gemma"}
    folded = [{"role": "user", "content": f"{SYSTEM}\n\n{QUESTION}"}]
    with start_server({"gemma": gguf}, n_ctx=512) as server:
        def prompt_tokens(messages):
            reply = httpx.post(f"{server.url}/chat/completions", timeout=60,
                               json={"model": "gemma", "messages": messages, "max_tokens": 1, "temperature": 0})
            assert reply.status_code == 200, reply.text
            return reply.json()["usage"]["prompt_tokens"]

        assert prompt_tokens(CHAT) == prompt_tokens(folded) > prompt_tokens(CHAT[1:])
        refused = httpx.post(f"{server.url}/chat/completions", timeout=60,
                             json={"messages": [CHAT[0], {"role": "assistant", "content": "Hm."}], "max_tokens": 1})
        assert refused.status_code == 400 and "no user turn" in refused.json()["error"]["message"]


def test_evaluation_and_perplexity_ask_a_template_without_a_system_role(gemma_gguf):
    from deepred.config import EvalConfig
    from deepred.evaluate.models import LocalModel
    from deepred.evaluate.perplexity import PerplexityScorer

    merged, _ = gemma_gguf
    rows = LocalModel(str(merged)).answer([{"id": "q", "prompt": QUESTION}], EvalConfig(max_tokens=3), SYSTEM,
                                          log=lambda *a: None)
    assert rows[0]["error"] is None
    scorer = PerplexityScorer.from_folder(str(merged), system_prompt=SYSTEM)
    assert SYSTEM in scorer._context(QUESTION) and scorer.perplexity("Sow early.", QUESTION) > 0


def test_lines_a_template_refuses_are_each_named_counted_invalid_and_skippable(template_models, tmp_path, capsys):
    """Gemma's template refuses two replies in a row, a conversation deepred's own checks allow. validate named only
    the first such line and counted none invalid; train stopped at the first even with --skip_invalid."""
    from deepred.cli import main

    replies_in_a_row = [{"role": "user", "content": "What is our purpose?"},
                        {"role": "assistant", "content": "To advance, comrade."},
                        {"role": "assistant", "content": "Together."}]
    plain = [{"role": "user", "content": "How is life like a chess game?"},
             {"role": "assistant", "content": "Every piece serves the position."}]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in (replies_in_a_row, plain) * 2))
    gemma = str(template_models["gemma"])
    refused = "the chat template refused the conversation: Conversation roles must alternate"

    assert main(["validate", str(data), "--base_model", gemma]) == 1
    out = capsys.readouterr().out
    assert f"{data}:1: {refused}" in out and f"{data}:3: {refused}" in out
    assert f"{data}: 2 valid example(s), 2 invalid line(s), 4 turns" in out and "2 problem(s) in 2 line(s)" in out

    train = ["train", "--base_model", gemma, "--dataset", str(data), "--max_steps", "1", "--batch_size", "1",
             "--val_split", "0", "--lora_r", "4", "--lora_alpha", "8", "--save_steps", "100"]
    assert main([*train, "--output_dir", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith(f"error: {data}:1: {refused}") and err.endswith(
        " (and 1 more example the template refuses); fix the example(s) or pass --skip_invalid to train on the other 2")
    assert main([*train, "--output_dir", str(tmp_path / "skipped"), "--skip_invalid"]) == 0
    out = capsys.readouterr().out
    assert "--skip_invalid: dropped 2 example(s) the chat template refuses, training on 2" in out
    assert f"{data}: 2 valid example(s), 2 invalid line(s)" in out


def test_a_template_that_refuses_every_line_is_said_once_and_one_skipped_line_is_named(template_models, tmp_path,
                                                                                         capsys):
    """Every conversation refused is the template's problem, said once with the count (a review found a line per
    example: 640 of them for the bundled set); one line dropped by --skip_invalid is named (it was only counted)."""
    from deepred.cli import main

    replies_in_a_row = [{"role": "user", "content": "What is our purpose?"},
                        {"role": "assistant", "content": "To advance, comrade."},
                        {"role": "assistant", "content": "Together."}]
    plain = [{"role": "user", "content": "How is life like a chess game?"},
             {"role": "assistant", "content": "Every piece serves the position."}]
    gemma = str(template_models["gemma"])
    train = ["train", "--base_model", gemma, "--max_steps", "1", "--batch_size", "1", "--val_split", "0",
             "--lora_r", "4", "--lora_alpha", "8", "--save_steps", "100"]
    every = tmp_path / "every.jsonl"
    every.write_text((json.dumps({"messages": replies_in_a_row}) + "\n") * 3)
    assert main([*train, "--dataset", str(every), "--output_dir", str(tmp_path / "a"), "--skip_invalid"]) == 2
    captured = capsys.readouterr()
    assert f"{every}:2:" not in captured.out + captured.err
    assert captured.err.strip().endswith("(and 2 more examples the template refuses)")
    assert main(["validate", str(every), "--base_model", gemma]) == 1
    out = capsys.readouterr().out
    assert f"{every}:1: " in out and f"{every}:2:" not in out and "(and 2 more examples the template refuses)" in out

    one = tmp_path / "one.jsonl"
    one.write_text("".join(json.dumps({"messages": m}) + "\n" for m in (plain, replies_in_a_row, plain)))
    assert main([*train, "--dataset", str(one), "--output_dir", str(tmp_path / "b"), "--skip_invalid"]) == 0
    out = capsys.readouterr().out
    assert f"{one}:2: the chat template refused the conversation" in out
    assert "--skip_invalid: dropped 1 example(s) the chat template refuses, training on 2" in out
