"""LoRA adapters cover every attention and MLP projection of the architecture."""

from __future__ import annotations

from types import SimpleNamespace

from deepred.train.model import lora_targets


def test_lora_targets_follow_the_architecture():
    def model(kind):
        return SimpleNamespace(config=SimpleNamespace(model_type=kind))

    for kind in ("llama", "qwen2", "mistral", "gemma"):
        assert set(lora_targets(model(kind))) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"}
    assert lora_targets(model("phi3")) == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert lora_targets(model("some-new-family")) == "all-linear"
