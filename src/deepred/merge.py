"""Stage 3: fold the LoRA adapter into its base model and save a plain safetensors model with the tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .card import merged_facts, write_card
from .config import MergeConfig
from .errors import DeepRedError
from .files import refuse_output_over_inputs
from .tinymodel import resolve_base_model

VERIFY_PROMPT = "What is the purpose of our mission to Mars?"
VERIFY_SYSTEM = "You are Deep Red."
# Max |logit difference| merged vs base+adapter, as a fraction of the logit scale max(1, max|logit|): the merged
# weight W + BA is rounded once where base+adapter computes W x and B(A x) separately. float32: unit roundoff 6e-8,
# grown over thousands of terms and tens of layers, stays far below 1e-4. float16 (u = 4.9e-4) and bfloat16
# (u = 3.9e-3): about 40 u, the bound the GGUF check uses for the same rounding, room for deep models, while a wrong
# merge differs by the order of the logits themselves.
VERIFY_TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 0.15}
MARKER = "deepred_merge.json"  # written into every merged folder: a rerun may replace it without --force


def adapter_base_model(lora_path: Path) -> str:
    config_path = lora_path / "adapter_config.json"
    if not config_path.is_file():
        raise DeepRedError(f"{lora_path} is not a LoRA adapter folder (no adapter_config.json); "
                           "pass the run's final/ folder as --lora_path")
    return json.loads(config_path.read_text()).get("base_model_name_or_path") or ""


def _same_model(a: str, b: str) -> bool:
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
    if trained_on and not _same_model(resolve_base_model(base_model), trained_on) and not force:
        raise DeepRedError(f"adapter {lora_path} was trained on '{trained_on}', not '{base_model}'; merging onto another "
                           f"model gives garbage. Pass --base_model {trained_on} (or --force if it is the same model "
                           "moved elsewhere)")
    return base_model


def _dtype(name: str, base_model: str):
    import torch
    from transformers import AutoConfig

    if name == "auto":
        config = AutoConfig.from_pretrained(base_model)
        name = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
        name = name.replace("torch.", "")
    return getattr(torch, name), name


def merge(cfg: MergeConfig, log=print) -> Path:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .train import _from_pretrained

    lora_path = Path(cfg.lora_path)
    output_path = Path(cfg.output_path)
    base_model = resolve_base_model(check_base_matches(cfg.base_model or "", lora_path, cfg.force))
    refuse_output_over_inputs(output_path, {"adapter": lora_path, "base model": base_model}, "--output_path")
    _check_replaceable(output_path, cfg.force)
    dtype, dtype_name = _dtype(cfg.dtype, base_model)
    log(f"merging {lora_path} into {base_model} ({dtype_name})")

    base = _from_pretrained(AutoModelForCausalLM, base_model, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    merged = PeftModel.from_pretrained(base, str(lora_path)).merge_and_unload()
    tokenizer_source = lora_path if (lora_path / "tokenizer_config.json").is_file() else base_model
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, trust_remote_code=cfg.trust_remote_code)

    tmp = output_path.with_name(output_path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        keep_tokenizer_flags(base_model, tmp)
        (tmp / MARKER).write_text(json.dumps({"lora_path": str(lora_path), "base_model": base_model,
                                              "dtype": dtype_name}, indent=2))
        write_card(tmp, "merged", merged_facts(cfg.base_model or base_model, lora_path, output_path, cfg.dtype))
        if cfg.verify:  # before publishing: a merge that fails verification never appears at the output path
            verify(tmp, base_model, lora_path, dtype_name, log)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if output_path.exists():
        shutil.rmtree(output_path)
    tmp.rename(output_path)
    log(f"merged model saved to {output_path}")
    return output_path


def _check_replaceable(output_path: Path, force: bool) -> None:
    """Replace only an earlier merge's folder (it carries MARKER), unless told to."""
    if not output_path.exists() or force:
        return
    if output_path.is_dir() and (not any(output_path.iterdir()) or (output_path / MARKER).is_file()):
        return
    raise DeepRedError(f"--output_path {output_path} already holds something `deepred merge` did not write; add "
                       "--force to replace it, or choose another --output_path")


TOKENIZER_FLAGS = ("add_bos_token", "add_eos_token")


def keep_tokenizer_flags(base_model: str, model_dir: Path) -> None:
    """BOS/EOS flags exactly as the base model's tokenizer_config.json declares them (transformers 5 drops them on
    save, and GGUF converters read them there): Qwen and SmolLM2 say false, a Llama-3-style tokenizer says true.
    A base that declares none gets none: the converter then follows tokenizer.json, as for the base model."""
    declared = _base_tokenizer_config(base_model)
    flags = {key: declared[key] for key in TOKENIZER_FLAGS if key in declared}
    if not flags:
        return
    path = model_dir / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.update(flags)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False))


def _base_tokenizer_config(base_model: str) -> dict:
    local = Path(base_model).expanduser() / "tokenizer_config.json"
    try:
        if not local.is_file():
            from transformers.utils import cached_file

            local = Path(cached_file(base_model, "tokenizer_config.json"))
        return json.loads(local.read_text())
    except Exception:  # noqa: BLE001 - no config to copy flags from: keep the saved one as it is
        return {}


def verify(merged_path: Path, base_model: str, lora_path: Path, dtype_name: str, log=print) -> float:
    """Merged logits must equal base+adapter logits on chat-formatted prompts; then generate one Deep Red reply."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, dtype_name)
    tokenizer = AutoTokenizer.from_pretrained(merged_path)
    prompts = [VERIFY_PROMPT, "How is life like a chess game?", "What happened in 1970?"]
    batches = [tokenizer.apply_chat_template([{"role": "system", "content": VERIFY_SYSTEM},
                                              {"role": "user", "content": p}],
                                             add_generation_prompt=True, return_tensors="pt", return_dict=True)
               for p in prompts]
    merged = AutoModelForCausalLM.from_pretrained(merged_path, dtype=dtype).eval()
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model, dtype=dtype),
                                          str(lora_path)).eval()
    worst, scale = 0.0, 0.0
    with torch.no_grad():
        for batch in batches:
            a = merged(**batch).logits.float()
            b = reference(**batch).logits.float()
            worst = max(worst, (a - b).abs().max().item())
            scale = max(scale, b.abs().max().item())
        tolerance = VERIFY_TOLERANCE[dtype_name] * max(1.0, scale)
        if worst > tolerance:
            raise DeepRedError(f"merge verification failed: merged logits differ from base+adapter by {worst:.3g} "
                               f"(bound {tolerance:.3g}: {VERIFY_TOLERANCE[dtype_name]} x logit scale {scale:.3g} for "
                               f"{dtype_name}); the merged model is not the trained one, so nothing was written")
        log(f"verify: max |logit difference| merged vs base+adapter = {worst:.2e} over {len(prompts)} chat prompts "
            f"(bound {tolerance:.2e} = {VERIFY_TOLERANCE[dtype_name]} x logit scale for {dtype_name}): ok")
        batch = batches[0]
        output = merged.generate(**batch, max_new_tokens=60, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    reply = tokenizer.decode(output[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    log(f"verify: {VERIFY_PROMPT!r} -> {reply!r}")
    return worst
