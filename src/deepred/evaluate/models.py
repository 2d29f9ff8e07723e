"""Model clients, local: a Hugging Face model folder (optionally with a LoRA adapter) answering through its chat
template with transformers."""

from __future__ import annotations

from pathlib import Path

from ..chat_template import template_messages
from ..config import EvalConfig
from ..errors import DeepRedError
from ..models.loading import from_pretrained
from ..models.registry import resolve_base_model
from .text import chat_messages

GENERATION_BATCH = 8


def load_causal_lm(path: str, lora_path: str | None = None):
    """(model, tokenizer) from a local folder, on the GPU when there is one; LoRA applied when given."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = resolve_base_model(path)  # a local folder, a built-in name or a hub name, as for training
    folder = Path(name).expanduser()
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise DeepRedError(f"{path} is not a model folder (no config.json); pass a Hugging Face model folder such as "
                           "output/merged-deepred or a hub name")
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16 if cuda else torch.float32
    try:
        tokenizer = from_pretrained(AutoTokenizer, name)
        model = from_pretrained(AutoModelForCausalLM, name, dtype=dtype)
    except ValueError as exc:
        raise DeepRedError(f"cannot load the model {path}: {str(exc).splitlines()[0]}") from exc
    if lora_path:
        model = _apply_lora(model, lora_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to("cuda" if cuda else "cpu").eval(), tokenizer


def _apply_lora(model, lora_path: str):
    from peft import PeftModel

    if not (Path(lora_path).expanduser() / "adapter_config.json").is_file():
        raise DeepRedError(f"no LoRA adapter in {lora_path} (needs adapter_config.json); pass the run's final/ folder")
    return PeftModel.from_pretrained(model, str(Path(lora_path).expanduser()))


class LocalModel:
    """A loaded model that answers prompts through its chat template (greedy unless temperature > 0)."""

    def __init__(self, model_path: str, lora_path: str | None = None):
        self.model_path, self.lora_path = model_path, lora_path
        self.model, self.tokenizer = load_causal_lm(model_path, lora_path)
        if not getattr(self.tokenizer, "chat_template", None):
            raise DeepRedError(f"{model_path} has no chat template; evaluate an instruct/chat model")

    def answer(self, prompts: list[dict], cfg: EvalConfig, system_prompt: str, adapter: bool = True,
               log=print) -> list[dict]:
        rows = []
        for start in range(0, len(prompts), GENERATION_BATCH):
            batch = prompts[start:start + GENERATION_BATCH]
            try:
                with adapter_disabled(self.model, not adapter):
                    texts = self._generate([p["prompt"] for p in batch], cfg, system_prompt)
                rows += [{**p, "response": t, "error": None} for p, t in zip(batch, texts)]
            except RuntimeError as exc:  # e.g. out of memory: record, go on
                error = f"generation failed: {str(exc).splitlines()[0][:300]}"
                log(f"  {error}")
                rows += [{**p, "response": "", "error": error} for p in batch]
            log(f"  [{len(rows)}/{len(prompts)}] generated")
        return rows

    def _generate(self, questions: list[str], cfg: EvalConfig, system_prompt: str) -> list[str]:
        import torch

        tokenizer = self.tokenizer
        tokenizer.padding_side = "left"
        chats = [template_messages(tokenizer, chat_messages(system_prompt, q)) for q in questions]
        texts = [tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) for chat in chats]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.model.device)
        sampling = {"do_sample": True, "temperature": cfg.temperature} if cfg.temperature > 0 else \
            {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        with torch.inference_mode():
            out = self.model.generate(**enc, max_new_tokens=cfg.max_tokens, pad_token_id=tokenizer.pad_token_id,
                                      **sampling)
        return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in out[:, enc["input_ids"].shape[1]:]]


class _NoOp:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def adapter_disabled(model, disable: bool):
    return model.disable_adapter() if disable and hasattr(model, "disable_adapter") else _NoOp()

