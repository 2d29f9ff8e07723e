"""LoRA adapters cover every attention and MLP projection of the architecture, or the part the user chose."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from deepred.errors import DeepRedError
from deepred.train.model import lora_targets

from ..conftest import DATA, deepred

ATTENTION = {"q_proj", "k_proj", "v_proj", "o_proj"}
MLP = {"gate_proj", "up_proj", "down_proj"}


def model(kind, modules=()):
    return SimpleNamespace(config=SimpleNamespace(model_type=kind),
                           named_modules=lambda: [(f"model.layers.0.self_attn.{m}", None) for m in modules])


def test_lora_targets_follow_the_architecture():
    for kind in ("llama", "qwen2", "mistral", "gemma"):
        assert set(lora_targets(model(kind))) == ATTENTION | MLP
        assert set(lora_targets(model(kind), "attention")) == ATTENTION
        assert set(lora_targets(model(kind), "mlp")) == MLP
    assert lora_targets(model("phi3")) == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert lora_targets(model("phi3"), "mlp") == ["gate_up_proj", "down_proj"]
    assert lora_targets(model("some-new-family")) == "all-linear"


def test_lora_targets_by_name_must_exist_in_the_model():
    assert lora_targets(model("llama", ["q_proj", "v_proj"]), "q_proj, v_proj") == ["q_proj", "v_proj"]
    with pytest.raises(DeepRedError, match="qproj not found"):
        lora_targets(model("llama", ["q_proj", "v_proj"]), "q_proj,qproj")
    assert lora_targets(model("llama", ["q_proj"]), "self_attn.q_proj") == ["self_attn.q_proj"]  # a path's end
    with pytest.raises(DeepRedError, match="mlp.q_proj not found"):  # the last part alone is not enough
        lora_targets(model("llama", ["q_proj"]), "mlp.q_proj")
    with pytest.raises(DeepRedError, match="no module not found"):
        lora_targets(model("llama", ["q_proj"]), ",")
    with pytest.raises(DeepRedError, match="does not know which modules .* name them"):
        lora_targets(model("some-new-family"), "attention")


def test_attention_only_adapter_trains_and_merges(tmp_path, tiny_model):
    out = tmp_path / "run"
    deepred("train", "--base_model", tiny_model, "--dataset", DATA / "mini.jsonl", "--output_dir", out,
            "--max_steps", 2, "--batch_size", 2, "--gradient_accumulation_steps", 1, "--lora_r", 4,
            "--lora_alpha", 8, "--val_split", 0, "--lora_targets", "attention")
    adapter = json.loads((out / "final" / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == ATTENTION
    assert set(json.loads((out / "run_config.json").read_text())["lora_target_modules"]) == ATTENTION
    deepred("merge", "--base_model", tiny_model, "--lora_path", out / "final", "--output_path", tmp_path / "merged")


def lora_model(tiny_model):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=sorted(ATTENTION | MLP)))
    for name, param in model.named_parameters():  # LoRA B starts at zero; give the adapter a say in the product
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return model


def autocast_loss_and_grads(model, ids):
    import torch

    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def test_frozen_projections_in_bf16_give_the_products_autocast_gives(tiny_model):
    """On a CPU under bf16 autocast the adapted projections' frozen weights are stored in bf16: autocast rounds them
    to exactly those values before every product, so the loss and every adapter gradient must be identical, bit for
    bit, while everything trained or outside the projections stays float32."""
    import torch

    from deepred.train.hardware import Hardware
    from deepred.train.model import frozen_weights_in_bf16

    ids = torch.randint(10, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    reference = lora_model(tiny_model)
    before = autocast_loss_and_grads(reference, ids)

    model = lora_model(tiny_model)
    assert frozen_weights_in_bf16(model, Hardware("cpu", False, False, False, 1)) == 0  # float32 CPU: untouched
    assert frozen_weights_in_bf16(model, Hardware("cuda", False, True, False, 1)) == 0  # GPUs load bf16 themselves
    cast = frozen_weights_in_bf16(model, Hardware("cpu", False, True, False, 1))
    layers = model.base_model.model.config.num_hidden_layers
    assert cast == layers * len(ATTENTION | MLP)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert {d for n, d in dtypes.items() if n.endswith("base_layer.weight")} == {torch.bfloat16}
    assert {d for n, d in dtypes.items() if not n.endswith("base_layer.weight")} == {torch.float32}

    after = autocast_loss_and_grads(model, ids)
    assert after[0] == before[0]
    assert after[1].keys() == before[1].keys() and len(after[1]) == 2 * cast
    for name, grad in before[1].items():
        assert torch.equal(after[1][name], grad), name
    assert frozen_weights_in_bf16(model, Hardware("cpu", False, True, False, 1)) == 0  # done once
