"""Base model names: a Hugging Face hub name, a local folder, or one of the offline built-ins, which resolve to a
cached folder built on first use."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .loading import looks_local, missing_folder, not_on_the_hub
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
    if looks_local(name):
        raise missing_folder(name)
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer*"])
    except OSError as exc:  # the hub's errors are OSErrors; a full disk or a permission is the file system's to say
        if exc.errno is not None:
            raise
        raise not_on_the_hub(name) from exc
