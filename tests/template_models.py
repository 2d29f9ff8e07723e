"""Tiny models that wear other families' chat templates (TRL ships each family's original template): the tiny Qwen2's
weights beside a tokenizer with that family's special tokens, bos, eos and template. Built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

TRL_TEMPLATES = Path(__import__("trl").__file__).parent / "chat_templates"

# name -> (template file shipped with TRL (the model's original template) or None for the tokenizer's own,
#          special tokens the family's tokenizer has, bos, eos, the end-of-turn token after every reply)
TEMPLATES = {
    "qwen2.5": (None, [], None, None, "<|im_end|>"),
    "smollm2": (None, [], None, None, "<|im_end|>"),  # ChatML with SmolLM's default system prompt
    "llama3": ("llama3.jinja", ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>"),
    "gemma": ("gemma.jinja", ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>",
              "<end_of_turn>"),  # no system role: raises on one
    "phi3": ("phi3.jinja", ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], None, "<|endoftext|>", "<|end|>"),
}


def model_with_tokenizer(folder: Path, weights_from: Path, tokenizer) -> Path:
    """The tiny model's weights (its vocabulary covers every id used here) beside the given tokenizer."""
    folder.mkdir(parents=True)
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        (folder / name).symlink_to(weights_from / name)
    tokenizer.save_pretrained(folder)
    return folder


def tokenizer_with_template(base: Path, template: str, specials: list[str], bos: str | None, eos: str | None):
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials], special_tokens=True)
    if bos:
        tokenizer.bos_token = bos
    if eos:
        tokenizer.eos_token = eos
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture(scope="session")
def template_models(tmp_path_factory, tiny_model, smollm2_model) -> dict[str, Path]:
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("templates")
    smollm2_tokenizer = AutoTokenizer.from_pretrained(smollm2_model)
    models = {"qwen2.5": tiny_model, "smollm2": model_with_tokenizer(root / "smollm2", tiny_model, smollm2_tokenizer)}
    for name, (source, specials, bos, eos, _) in TEMPLATES.items():
        if source:
            template = (TRL_TEMPLATES / source).read_text()
            models[name] = model_with_tokenizer(root / name, tiny_model,
                                                tokenizer_with_template(tiny_model, template, specials, bos, eos))
    return models
