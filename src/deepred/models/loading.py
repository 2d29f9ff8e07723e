"""Loading any model or tokenizer (hub name or folder) with one clear line for the usual failures, and the tokenizer
flags that transformers 5 drops on save but GGUF converters and runners read: the one place they are kept."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from ..config import DEFAULT_BASE_MODEL
from ..errors import DeepRedError

TOKENIZER_FLAGS = ("add_bos_token", "add_eos_token")
# What a family's tokenizer always says, by config.json model_type prefix: Qwen never adds a BOS, and a GGUF of it
# must say `tokenizer.ggml.add_bos_token = false`.
FAMILY_TOKENIZER_FLAGS = {"qwen": {"add_bos_token": False}}


# Deprecation warnings a dependency raises from its own code, which no argument of ours can avoid: PEFT asks every
# model `is_gradient_checkpointing`, which transformers 5.17+ renamed (`is_activation_checkpointing`).
DEPENDENCY_WARNINGS = [(FutureWarning, r"`is_gradient_checkpointing` is deprecated", r"transformers\.modeling_utils")]


def quiet_dependency_warnings() -> None:
    """Hide exactly the DEPENDENCY_WARNINGS; every other warning stays visible."""
    for category, message, module in DEPENDENCY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def looks_local(name: str) -> bool:
    """Hub names are `org/name`; anything else that is not an existing folder is a missing local path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def missing_folder(name: str) -> DeepRedError:
    return DeepRedError(f"model folder not found: {name} (pass a Hugging Face name like {DEFAULT_BASE_MODEL} "
                        "or an existing folder; 'tiny' builds the offline test model)")


def not_on_the_hub(name: str) -> DeepRedError:
    return DeepRedError(f"cannot load model '{name}': it is not a local folder and the Hugging Face hub could not "
                        "provide it (no network, a typo, or a gated model needing `hf auth login`); "
                        "check the name or pass a local folder")


def from_pretrained(loader, name: str, **kwargs):
    """`loader.from_pretrained(name)` from a folder or the hub, turning the usual failures into one clear line."""
    quiet_dependency_warnings()  # the model is about to meet PEFT
    path = Path(name).expanduser()
    if looks_local(name) and not path.exists():
        raise missing_folder(name)
    try:
        return loader.from_pretrained(str(path) if path.exists() else name, **kwargs)
    except OSError as exc:
        text = str(exc)
        if "does not appear to have a file named" in text or "no file named" in text.lower():
            raise DeepRedError(f"{name}: not a complete model folder ({text.splitlines()[0]})") from exc
        raise not_on_the_hub(name) from exc
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise DeepRedError(f"{name} needs custom model code from the hub; pass --trust_remote_code if you trust it") from exc
        raise


def load_tokenizer(base_model: str, trust_remote_code: bool = False):
    """The tokenizer of a chat model, with a pad token; a model without a chat template is refused."""
    from transformers import AutoTokenizer

    tokenizer = from_pretrained(AutoTokenizer, base_model, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise DeepRedError(f"{base_model} has no chat template; use an instruct/chat model (e.g. {DEFAULT_BASE_MODEL})")
    return tokenizer


# ---------------------------------------------------------------------------------------------------------------
# tokenizer flags


def family_tokenizer_flags(model_type: str | None) -> dict:
    return next((flags for prefix, flags in FAMILY_TOKENIZER_FLAGS.items() if str(model_type or "").startswith(prefix)),
                {})


def tokenizer_config(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / "tokenizer_config.json").read_text(encoding="utf-8"))


def declared_tokenizer_flags(model: str) -> dict:
    """The BOS/EOS flags a model's tokenizer_config.json declares (a folder, or a hub model's cached file); {} when
    it declares none or cannot be read."""
    local = Path(model).expanduser() / "tokenizer_config.json"
    try:
        if not local.is_file():
            from transformers.utils import cached_file

            local = Path(cached_file(model, "tokenizer_config.json"))
        declared = json.loads(local.read_text())
    except Exception:  # noqa: BLE001 - nothing to copy flags from
        return {}
    return {key: declared[key] for key in TOKENIZER_FLAGS if key in declared}


def missing_family_flags(model_dir: Path, model_type: str | None) -> dict:
    """The family's flags that the folder's tokenizer_config.json does not declare (dropped on save)."""
    declared = tokenizer_config(model_dir)
    return {key: value for key, value in family_tokenizer_flags(model_type).items() if key not in declared}


def set_tokenizer_flags(model_dir: Path, flags: dict) -> None:
    """Write `flags` into the folder's tokenizer_config.json (where GGUF converters read them)."""
    if not flags:
        return
    config = tokenizer_config(model_dir)
    config.update(flags)
    (Path(model_dir) / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


def adapter_trained_on(adapter: Path) -> str:
    """The base model a PEFT adapter folder names (adapter_config.json's base_model_name_or_path, "" if none); a
    config that is not a JSON object is one line."""
    path = Path(adapter) / "adapter_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DeepRedError(f"{path} cannot be read as JSON ({exc}); the adapter folder is damaged: train it again or "
                           "restore the file") from exc
    if not isinstance(config, dict):
        raise DeepRedError(f"{path} is not a JSON object; the adapter folder is damaged: train it again or restore "
                           "the file")
    return config.get("base_model_name_or_path") or ""
