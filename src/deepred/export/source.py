"""The Hugging Face model folder a GGUF is made from (the merged model): checked before anything is converted."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import DeepRedError


def read_model_config(model_dir: Path) -> dict:
    """config.json of a Hugging Face model folder, with a clear error when it is not one."""
    if not model_dir.exists():
        raise DeepRedError(f"model folder not found: {model_dir}; pass the folder written by `deepred merge`")
    if not model_dir.is_dir():
        raise DeepRedError(f"{model_dir} is not a folder; pass the model folder written by `deepred merge`")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise DeepRedError(f"{model_dir} is not a Hugging Face model folder (no config.json); "
                           "pass the folder written by `deepred merge`")
    try:
        return json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DeepRedError(f"{config_path} is not valid JSON ({exc}); re-run `deepred merge`") from exc


def check_model_dir(model_dir: Path) -> dict:
    config = read_model_config(model_dir)
    if not any(model_dir.glob("*.safetensors")) and not any(model_dir.glob("pytorch_model*.bin")):
        raise DeepRedError(f"{model_dir} has no weights (*.safetensors); pass the folder written by `deepred merge`")
    if not (model_dir / "tokenizer_config.json").is_file():
        raise DeepRedError(f"{model_dir} has no tokenizer (tokenizer_config.json); `deepred merge` saves it with "
                           "the model")
    if not config.get("architectures"):
        raise DeepRedError(f"{model_dir}/config.json names no architecture; it is not a causal language model "
                           "saved by transformers")
    return config


def is_qwen(config: dict) -> bool:
    return str(config.get("model_type", "")).startswith("qwen")
