"""Stage 3: fold the LoRA adapter into its base model and save a plain safetensors model with the tokenizer.

The merged folder is made under a temporary name and, with --verify, checked there (merged logits against base +
adapter, then one reply to the persona's sample question); only then does it replace the output path.
"""

from __future__ import annotations

import json
from pathlib import Path

from .chat_template import template_messages
from .config import MergeConfig
from .errors import DeepRedError
from .files import atomic_folder, output_lock, refuse_output_over_inputs
from .models.loading import adapter_trained_on, declared_tokenizer_flags, from_pretrained, set_tokenizer_flags
from .models.registry import resolve_base_model
from .persona import load_persona
from .prompts import sample_chat
from .records import MERGE_RECORD

# Questions whose logits are compared (after the persona's sample question): any text would do.
CHECK_QUESTIONS = ["How is life like a chess game?", "What happened in 1970?"]
# Max |logit difference| merged vs base+adapter, as a fraction of the logit scale max(1, max|logit|): the merged
# weight W + BA is rounded once where base+adapter computes W x and B(A x) separately. float32: unit roundoff 6e-8,
# grown over thousands of terms and tens of layers, stays far below 1e-4. float16 (u = 4.9e-4) and bfloat16
# (u = 3.9e-3): about 40 u, the bound the GGUF check uses for the same rounding, room for deep models, while a wrong
# merge differs by the order of the logits themselves.
VERIFY_TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 0.15}


def adapter_base_model(lora_path: Path) -> str:
    config_path = lora_path / "adapter_config.json"
    if not config_path.is_file():
        raise DeepRedError(f"{lora_path} is not a LoRA adapter folder (no adapter_config.json); "
                           "pass the run's final/ folder as --lora_path")
    return adapter_trained_on(lora_path)


def same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def check_base_matches(base_model: str, lora_path: Path, force: bool) -> str:
    trained_on = adapter_base_model(lora_path)
    if not base_model:
        if not trained_on:
            raise DeepRedError(f"{lora_path}/adapter_config.json does not name its base model; pass --base_model")
        return trained_on
    if trained_on and not same_model(resolve_base_model(base_model), trained_on) and not force:
        raise DeepRedError(f"adapter {lora_path} was trained on '{trained_on}', not '{base_model}'; merging onto another "
                           f"model gives garbage. Pass --base_model {trained_on} (or --force if it is the same model "
                           "moved elsewhere)")
    return base_model


def merge_dtype(name: str, base_model: str, trust_remote_code: bool = False):
    """(torch dtype, its name); `auto` is the base model's own dtype."""
    import torch
    from transformers import AutoConfig

    if name == "auto":
        config = from_pretrained(AutoConfig, base_model, trust_remote_code=trust_remote_code)
        name = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
        name = name.replace("torch.", "")
    return getattr(torch, name), name


def merge(cfg: MergeConfig, log=print) -> Path:
    lora_path = Path(cfg.lora_path)
    output_path = Path(cfg.output_path)
    base_model = resolve_base_model(check_base_matches(cfg.base_model or "", lora_path, cfg.force))
    refuse_output_over_inputs(output_path, {"adapter": lora_path, "base model": base_model}, "--output_path")
    # before any model loads: a folder that cannot be written, or another process writing this output, is one line
    with output_lock(output_path, "--output_path", log):
        return _merge_into(cfg, lora_path, output_path, base_model, log)


def _merge_into(cfg: MergeConfig, lora_path: Path, output_path: Path, base_model: str, log) -> Path:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_replaceable(output_path, cfg.force)
    persona = load_persona(cfg.persona) if cfg.verify else None  # a bad persona file is refused before the work
    dtype, dtype_name = merge_dtype(cfg.dtype, base_model, cfg.trust_remote_code)
    log(f"merging {lora_path} into {base_model} ({dtype_name})")

    base = from_pretrained(AutoModelForCausalLM, base_model, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    merged = PeftModel.from_pretrained(base, str(lora_path)).merge_and_unload()
    tokenizer_source = lora_path if (lora_path / "tokenizer_config.json").is_file() else base_model
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, trust_remote_code=cfg.trust_remote_code)

    with atomic_folder(output_path) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        # BOS/EOS flags exactly as the base model declares them (Qwen and SmolLM2 say false, Llama 3 true); a base
        # that declares none gets none, and the converter then follows tokenizer.json, as for the base model
        set_tokenizer_flags(tmp, declared_tokenizer_flags(base_model))
        (tmp / MERGE_RECORD).write_text(json.dumps({"lora_path": str(lora_path), "base_model": base_model,
                                                    "dtype": dtype_name}, indent=2))
        if cfg.verify:  # before publishing: a merge that fails verification never appears at the output path
            verify(tmp, base_model, lora_path, dtype_name, persona, log, cfg.trust_remote_code)
    log(f"merged model saved to {output_path}")
    return output_path


def check_replaceable(output_path: Path, force: bool) -> None:
    """Replace only an earlier merge's folder (it carries MERGE_RECORD), unless told to."""
    if not output_path.exists() or force:
        return
    if output_path.is_dir() and (not any(output_path.iterdir()) or (output_path / MERGE_RECORD).is_file()):
        return
    raise DeepRedError(f"--output_path {output_path} already holds something `deepred merge` did not write; add "
                       "--force to replace it, or choose another --output_path")


def verify(merged_path: Path, base_model: str, lora_path: Path, dtype_name: str, persona=None, log=print,
           trust_remote_code: bool = False) -> float:
    """Merged logits must equal base+adapter logits on chat-formatted prompts; then generate one reply to the
    persona's sample question."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, dtype_name)
    tokenizer = AutoTokenizer.from_pretrained(merged_path, trust_remote_code=trust_remote_code)
    sample = sample_chat(persona or load_persona(None))
    chats = [sample, *([sample[0], {"role": "user", "content": q}] for q in CHECK_QUESTIONS)]
    batches = [tokenizer.apply_chat_template(template_messages(tokenizer, chat), add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)
               for chat in chats]
    remote = {"trust_remote_code": trust_remote_code}
    merged = from_pretrained(AutoModelForCausalLM, str(merged_path), dtype=dtype, **remote).eval()
    reference = PeftModel.from_pretrained(from_pretrained(AutoModelForCausalLM, base_model, dtype=dtype, **remote),
                                          str(lora_path)).eval()
    worst, scale, finite = 0.0, 0.0, True
    with torch.no_grad():
        for batch in batches:
            a = merged(**batch).logits.float()
            b = reference(**batch).logits.float()
            finite = finite and bool(torch.isfinite(a).all() and torch.isfinite(b).all())  # max() skips a NaN
            worst = max(worst, (a - b).abs().max().item())
            scale = max(scale, b.abs().max().item())
        if not finite:
            raise DeepRedError("merge verification failed: the logits are not finite (NaN or infinity), so the "
                               "adapter's weights are not numbers (its training diverged: lower --learning_rate and "
                               "train again); nothing was written")
        tolerance = VERIFY_TOLERANCE[dtype_name] * max(1.0, scale)
        if worst > tolerance:
            raise DeepRedError(f"merge verification failed: merged logits differ from base+adapter by {worst:.3g} "
                               f"(bound {tolerance:.3g}: {VERIFY_TOLERANCE[dtype_name]} x logit scale {scale:.3g} for "
                               f"{dtype_name}); the merged model is not the trained one, so nothing was written")
        log(f"verify: max |logit difference| merged vs base+adapter = {worst:.2e} = {worst / max(1.0, scale):.2e} x "
            f"logit scale {scale:.3g} over {len(chats)} chat prompts (bound {tolerance:.2e} = "
            f"{VERIFY_TOLERANCE[dtype_name]} x logit scale for {dtype_name}): ok")
        batch = batches[0]
        output = merged.generate(**batch, max_new_tokens=60, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    reply = tokenizer.decode(output[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    log(f"verify: {sample[1]['content']!r} -> {reply!r}")
    return worst
