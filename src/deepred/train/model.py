"""The model to train: loaded in the plan's dtype (4- or 8-bit with bitsandbytes on CUDA), and its LoRA adapter on
every attention and MLP projection of the architecture (or those chosen, in every block or the last N)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..config import TrainConfig
from ..errors import DeepRedError
from ..models.loading import adapter_trained_on, from_pretrained
from .hardware import Hardware

# LoRA targets by architecture: its attention projections, then its MLP projections. Unknown families use PEFT's
# "all-linear" (and need module names for --lora_targets attention|mlp).
LORA_TARGETS = {
    **dict.fromkeys(["llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "qwen2_moe"],
                    {"attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
                     "mlp": ["gate_proj", "up_proj", "down_proj"]}),
    "phi3": {"attention": ["qkv_proj", "o_proj"], "mlp": ["gate_up_proj", "down_proj"]},
    "gpt2": {"attention": ["c_attn", "attn.c_proj"], "mlp": ["c_fc", "mlp.c_proj"]},
}


def load_model(cfg: TrainConfig, base_model: str, hw: Hardware, attention: str | None = None):
    """The base model to adapt; `attention`: the batch plan's kernel where --attn_implementation is auto."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"trust_remote_code": cfg.trust_remote_code,
              # on a CPU bf16 is autocast over float32 weights (mixed precision), not bf16 weights
              "dtype": torch.float32 if hw.device == "cpu" else torch.bfloat16 if hw.bf16 else torch.float16 if hw.fp16
              else torch.float32}
    # auto: the plan's choice (plan.plan_attention), else transformers' own (sdpa where the model supports it,
    # eager where not, e.g. RWKV)
    if cfg.attn_implementation != "auto" or attention:
        kwargs["attn_implementation"] = attention if cfg.attn_implementation == "auto" else cfg.attn_implementation
    if cfg.use_4bit or cfg.use_8bit:
        kwargs["quantization_config"] = quantization_config(cfg, hw)
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    model = from_pretrained(AutoModelForCausalLM, base_model, **kwargs)
    model.config.use_cache = False
    return model


def quantization_config(cfg: TrainConfig, hw: Hardware):
    import torch

    flag = "--use_4bit" if cfg.use_4bit else "--use_8bit"
    if cfg.use_4bit and cfg.use_8bit:
        raise DeepRedError("choose one of --use_4bit and --use_8bit")
    if hw.device != "cuda":
        raise DeepRedError(f"{flag} needs a CUDA GPU (bitsandbytes); this machine has none: drop {flag} to train in full precision")
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise DeepRedError(f"{flag} needs bitsandbytes: pip install bitsandbytes") from exc
    if cfg.use_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16 if hw.bf16 else torch.float16)


def lora_targets(model, which: str = "all") -> list[str] | str:
    """The modules LoRA adapts: all (every attention and MLP projection), attention, mlp, or a comma-separated list
    of module names (checked against the model: PEFT would fail on a name that matches nothing)."""
    family = LORA_TARGETS.get(getattr(model.config, "model_type", ""))
    if which in ("all", "attention", "mlp"):
        if family is None:
            if which == "all":
                return "all-linear"
            raise DeepRedError(f"--lora_targets {which}: deepred does not know which modules of a "
                               f"'{model.config.model_type}' model are its {which}; name them, e.g. "
                               "--lora_targets q_proj,v_proj")
        return family["attention"] + family["mlp"] if which == "all" else list(family[which])
    names = [name.strip() for name in which.split(",") if name.strip()]
    missing = modules_missing(model, names)
    if not names or missing:
        raise DeepRedError(f"--lora_targets {which}: {', '.join(missing) or 'no module'} not found in this model; "
                           "use all, attention, mlp or module names such as q_proj,v_proj")
    return names


def modules_missing(model, names: list[str]) -> list[str]:
    """The names that match no module of the model (a module matches a name it is, or ends with after a dot, as PEFT
    matches them): PEFT silently ignores such a modules_to_save and fails late on such a target."""
    paths = [path for path, _ in model.named_modules()]
    return [name for name in names if not any(path == name or path.endswith("." + name) for path in paths)]


def lora_config(cfg: TrainConfig, model):
    from peft import LoraConfig

    targets, layers = lora_targets(model, cfg.lora_targets), last_layers(model, cfg.lora_layers)
    if layers is not None and isinstance(targets, str):  # PEFT takes block indices only with module names
        raise DeepRedError(f"--lora_layers {cfg.lora_layers}: deepred does not know the projection names of a "
                           f"'{model.config.model_type}' model; name them with --lora_targets (e.g. q_proj,v_proj)")
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                      task_type="CAUSAL_LM", target_modules=targets, modules_to_save=modules_to_save(cfg, model),
                      layers_to_transform=layers)


def last_layers(model, count: int | None) -> list[int] | None:
    """--lora_layers N: the indices of the model's last N transformer blocks (None: every block). The gradient then
    never flows below the lowest adapted block: on SmolLM2 (30 blocks) on a CPU the demo's steps took 2.2 s with the
    last 15 adapted against 3.9 s with all 30."""
    if count is None:
        return None
    total = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    if not total:
        raise DeepRedError("--lora_layers: this model's config does not say how many transformer blocks it has; "
                           "leave --lora_layers out to adapt every block")
    if count > total:
        raise DeepRedError(f"--lora_layers {count}: this model has {total} transformer blocks; pass at most {total}")
    return list(range(total - count, total))


def modules_to_save(cfg: TrainConfig, model) -> list[str] | None:
    """Check the names up front: PEFT silently ignores one that matches nothing."""
    if not cfg.modules_to_save:
        return None
    missing = modules_missing(model, cfg.modules_to_save)
    if missing:
        raise DeepRedError(f"--modules_to_save: {', '.join(missing)} not found in this model "
                           "(names are module names such as lm_head or embed_tokens)")
    if getattr(model.config, "tie_word_embeddings", False) and {"lm_head", "embed_tokens"} & set(cfg.modules_to_save):
        raise DeepRedError("--modules_to_save lm_head/embed_tokens: this model ties its input and output embeddings, "
                           "and training one copy would untie them in the merged model; use LoRA only")
    return list(cfg.modules_to_save)


def keeps_packed_examples_apart(model) -> bool:
    """Padding-free batches are only correct where the model builds its attention mask from the restarting
    position ids (transformers' masking_utils, or the varlen flash-attention kernels)."""
    module = sys.modules.get(type(model).__module__)
    flash = "flash" in str(getattr(model.config, "_attn_implementation", ""))
    return flash or hasattr(module, "create_causal_mask")


def continue_adapter(model, adapter: str, base_model: str):
    """The model with an existing LoRA adapter attached, trainable: --init_adapter continues its training."""
    from peft import PeftModel

    path = Path(adapter).expanduser()
    config = path / "adapter_config.json"
    if not config.is_file():
        raise DeepRedError(f"--init_adapter {adapter}: no adapter_config.json there; pass an adapter folder such as a "
                           "training run's final/")
    trained_on = adapter_trained_on(path)
    if trained_on and Path(trained_on).expanduser().resolve() != Path(base_model).expanduser().resolve() \
            and trained_on != base_model:
        raise DeepRedError(f"--init_adapter {adapter} was trained on '{trained_on}', not '{base_model}'; pass "
                           f"--base_model {trained_on} or another adapter")
    return PeftModel.from_pretrained(model, str(path), is_trainable=True)


def adapter_targets(model) -> list[str] | str:
    """The target modules of the model's trainable adapter."""
    targets = model.peft_config["default"].target_modules
    return targets if isinstance(targets, str) else sorted(targets)
