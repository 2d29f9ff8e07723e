"""CUDA-only paths (QLoRA with bitsandbytes, bf16, the fast profile's fused loss). Skipped without a GPU."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from deepred.config import TrainConfig  # noqa: E402
from deepred.train import train  # noqa: E402

from .conftest import DATA  # noqa: E402


@pytest.mark.parametrize("flag", ["use_4bit", "use_8bit"])
def test_quantised_lora_trains_on_cuda(tmp_path, tiny_model, flag):
    pytest.importorskip("bitsandbytes")
    cfg = TrainConfig(base_model=str(tiny_model), dataset=str(DATA / "mini.jsonl"), output_dir=str(tmp_path / flag),
                      max_steps=3, batch_size=2, gradient_accumulation_steps=1, val_split=0, lora_r=4, lora_alpha=8,
                      learning_rate=1e-3, **{flag: True})
    result = train(cfg, log=lambda *a, **k: None)
    assert (result.final_dir / "adapter_model.safetensors").is_file()
    hardware = json.loads((tmp_path / flag / "run_config.json").read_text())["hardware"]
    assert hardware["device"] == "cuda" and (hardware["bf16"] or hardware["fp16"])


def test_fast_profile_runs_whole_effective_batch_on_gpu(tmp_path, tiny_model):
    cfg = TrainConfig(base_model=str(tiny_model), dataset=str(DATA / "mini.jsonl"), output_dir=str(tmp_path / "fast"),
                      max_steps=2, val_split=0)
    train(cfg, log=lambda *a, **k: None)
    plan = json.loads((tmp_path / "fast" / "run_config.json").read_text())["batch_plan"]
    assert plan["micro_batch"] == 16 and plan["accumulation"] == 1 and not plan["gradient_checkpointing"]
