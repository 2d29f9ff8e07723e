"""LoRA adapters cover every attention and MLP projection of the architecture, or the part the user chose."""

from __future__ import annotations

import json
import shlex
from types import SimpleNamespace

import pytest

from deepred.errors import DeepRedError
from deepred.config import TrainConfig
from deepred.train.model import lora_config, lora_targets

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


def test_attention_only_adapter_trains_and_merges_with_the_printed_next_command(tmp_path, tiny_model, capsys):
    out = tmp_path / "run"
    deepred("train", "--base_model", tiny_model, "--dataset", DATA / "mini.jsonl", "--output_dir", out,
            "--max_steps", 2, "--batch_size", 2, "--gradient_accumulation_steps", 1, "--lora_r", 4,
            "--lora_alpha", 8, "--val_split", 0, "--lora_targets", "attention")
    adapter = json.loads((out / "final" / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == ATTENTION
    assert set(json.loads((out / "run_config.json").read_text())["lora_target_modules"]) == ATTENTION
    printed = capsys.readouterr().out.split(f"adapter saved to {out / 'final'}. Next:\n")[1].splitlines()
    merge_command = shlex.split(printed[0])
    assert merge_command[:2] == ["deepred", "merge"] and "--verify" in merge_command
    deepred(*merge_command[1:])
    assert (out / "merged" / "model.safetensors").is_file()


def test_lora_layers_adapts_only_the_last_blocks_and_the_merge_leaves_the_others_as_they_were(tmp_path, tiny_model):
    """--lora_layers 1 on the 2-block tiny model: the adapter holds LoRA weights for block 1 only, and the merged
    model's block 0 is the base model's, bit for bit, while block 1 changed."""
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "run"
    deepred("train", "--base_model", tiny_model, "--dataset", DATA / "mini.jsonl", "--output_dir", out,
            "--max_steps", 2, "--batch_size", 2, "--gradient_accumulation_steps", 1, "--lora_r", 4,
            "--lora_alpha", 8, "--val_split", 0, "--learning_rate", 1e-2, "--warmup_ratio", 0, "--lora_layers", 1)
    adapter = load_file(out / "final" / "adapter_model.safetensors")
    blocks = {name.split(".layers.")[1].split(".")[0] for name in adapter}
    assert blocks == {"1"}, sorted(adapter)
    assert len(adapter) == 2 * len(ATTENTION | MLP)  # lora_A and lora_B of every projection of block 1
    assert json.loads((out / "final" / "adapter_config.json").read_text())["layers_to_transform"] == [1]
    deepred("merge", "--base_model", tiny_model, "--lora_path", out / "final", "--output_path", tmp_path / "merged")
    base, merged = load_file(tiny_model / "model.safetensors"), load_file(tmp_path / "merged" / "model.safetensors")
    for module in ("self_attn.q_proj", "mlp.down_proj"):
        name = f"model.layers.{{}}.{module}.weight"
        assert torch.equal(merged[name.format(0)], base[name.format(0)])
        assert not torch.equal(merged[name.format(1)], base[name.format(1)])


def test_lora_layers_beyond_the_model_are_refused_before_training(tmp_path, tiny_model, capsys):
    from deepred.cli import main

    out = tmp_path / "run"
    assert main(["train", "--base_model", str(tiny_model), "--dataset", str(DATA / "mini.jsonl"), "--output_dir",
                 str(out), "--max_steps", "1", "--lora_layers", "3"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --lora_layers 3: this model has 2 transformer blocks; pass at most 2")
    assert not (out / "final").exists()


def test_lora_layers_on_a_family_deepred_cannot_name_is_one_line_not_peft_s_error():
    """PEFT takes block indices only with module names, not "all-linear" (its ValueError would be a traceback)."""
    unknown = SimpleNamespace(config=SimpleNamespace(model_type="some-new-family",
                                                     get_text_config=lambda: SimpleNamespace(num_hidden_layers=4)))
    with pytest.raises(DeepRedError, match=r"^--lora_layers 2: deepred does not know the projection names of a "
                                           r"'some-new-family' model; name them with --lora_targets"):
        lora_config(TrainConfig(lora_layers=2), unknown)
