"""Base model names: a Hugging Face hub name, a local folder, or one of the offline built-ins, which resolve to a
cached folder built on first use."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .smollm2 import SMOLLM2_NAME, smollm2_dir
from .tiny import TINY_NAME, tiny_model_dir

BUILTINS: dict[str, Callable[[], object]] = {
    TINY_NAME: tiny_model_dir,  # random Qwen2 with the real Qwen2.5 tokenizer: plumbing tests
    SMOLLM2_NAME: smollm2_dir,  # SmolLM2-135M-Instruct: a real pretrained chat model
}


def is_builtin(name: str | None) -> bool:
    return name in BUILTINS


def resolve_base_model(name: str) -> str:
    """Built-in offline names (`tiny`, `smollm2-135m`) resolve to their cached folders (built on first use);
    anything else is a hub name or a local folder."""
    builder = BUILTINS.get(name)
    return str(builder()) if builder else name


def local_model_dir(name: str) -> str:
    """A folder holding the model: built-ins and folders as they are, a hub name as its local snapshot (training
    cached it). llama.cpp's converter needs a folder."""
    path = Path(resolve_base_model(name)).expanduser()
    if path.is_dir():
        return str(path)
    from huggingface_hub import snapshot_download

    return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer*"])
