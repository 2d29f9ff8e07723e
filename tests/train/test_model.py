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
