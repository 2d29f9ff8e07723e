"""CUDA-only paths (QLoRA with bitsandbytes, bf16, the fast profile's fused loss). Skipped without a GPU."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from deepred.chat_template import ChatFormat, tokenize_examples  # noqa: E402
from deepred.config import TrainConfig  # noqa: E402
from deepred.data import load_for_training  # noqa: E402
from deepred.models.loading import load_tokenizer  # noqa: E402
from deepred.train import train  # noqa: E402
from deepred.train.examples import split, truncate_rows  # noqa: E402
from deepred.train.hardware import detect_hardware, liger_available  # noqa: E402
from deepred.train.model import load_model, lora_config  # noqa: E402
from deepred.train.plan import plan_batches  # noqa: E402
from deepred.train.trainer import build_trainer  # noqa: E402

from ..conftest import DATA  # noqa: E402


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
    assert plan["padding_free"] and plan["loss"] == ("liger" if liger_available() else "supervised")


def test_supervised_loss_on_a_bf16_gpu_model_is_trls(tmp_path, tiny_model):
    """The fast profile's loss (Liger's fused loss where installed) against TRL's on the same bf16 batch; the
    hidden state the final norm hands back is cast to the head's dtype first."""
    from trl import SFTTrainer

    cfg = TrainConfig(base_model=str(tiny_model), dataset=str(DATA / "mini.jsonl"), output_dir=str(tmp_path),
                      batch_size=4, gradient_accumulation_steps=1, val_split=0, max_steps=1, lora_dropout=0)
    hw = detect_hardware()
    report, _ = load_for_training(cfg.dataset, False, lambda *a: None)
    tokenizer = load_tokenizer(str(tiny_model), False)
    rows = truncate_rows(tokenize_examples(report.examples, ChatFormat.of(tokenizer)), 1024, print)
    model = load_model(cfg, str(tiny_model), hw)
    trainer = build_trainer(cfg, model, tokenizer, lora_config(cfg, model), split(rows, 0, 0)[0], None,
                            tmp_path, plan_batches(cfg, hw, liger=liger_available()), hw)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    n = int((batch["labels"][:, 1:] != -100).sum())
    with trainer.compute_loss_context_manager():
        ours = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=n)
        trls = SFTTrainer.compute_loss(trainer, trainer.model, dict(batch), num_items_in_batch=n)
    ours.backward()
    assert float(ours) == pytest.approx(float(trls), rel=2e-2)  # bf16 logits: about 3 significant digits
