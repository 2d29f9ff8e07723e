"""Training's refusals, each as a user meets it on the command line (one line, exit code 2, nothing trained), and
the fallback to padded batches for a model that cannot keep packed examples apart (said, and taken)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deepred.cli import main
from deepred.config import TrainConfig
from deepred.train import train

from ..conftest import DATA
from .helpers import InputShapes

QUICK = ["--max_steps", "1", "--batch_size", "2", "--gradient_accumulation_steps", "1", "--val_split", "0",
         "--lora_r", "4", "--lora_alpha", "8", "--save_steps", "100"]


def last_line(err: str) -> str:
    """The one line deepred writes, after any progress bar a library drew while loading."""
    assert "Traceback" not in err and err.endswith("\n"), err
    return err.splitlines()[-1].split("\r")[-1]


# --------------------------------------------------------------------------------------------- an incomplete checkpoint


CHECKPOINT_FILES = {"adapter_config.json": "{}", "adapter_model.safetensors": "", "optimizer.pt": "",
                    "scheduler.pt": "", "trainer_state.json": '{"global_step": 4}'}


@pytest.mark.parametrize("damage", ["no trainer_state.json", "trainer_state.json cut short", "no optimizer.pt",
                                    "no adapter_model.safetensors"])
def test_an_incomplete_checkpoint_is_refused_before_training(tiny_model, tmp_path, capsys, damage):
    """A save interrupted by a kill: the Trainer writes trainer_state.json last, so without it (or any of the files
    resuming reads) the folder is not a checkpoint to continue from."""
    run = tmp_path / "run"
    checkpoint = run / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    for name, text in CHECKPOINT_FILES.items():
        if name not in damage:
            (checkpoint / name).write_text(text)
    if "cut short" in damage:
        (checkpoint / "trainer_state.json").write_text('{"global_step": 4, "log_hist')
    before = sorted(p.name for p in run.rglob("*"))
    assert main(["train", "--base_model", str(tiny_model), "--dataset", str(DATA / "mini.jsonl"), "--output_dir",
                 str(run), "--resume_from_checkpoint", str(checkpoint), *QUICK]) == 2
    assert capsys.readouterr().err == (
        f"error: {checkpoint} is not a complete checkpoint (needs trainer_state.json, adapter_model.safetensors, "
        "optimizer.pt); pick another or use --resume_latest\n")
    assert sorted(p.name for p in run.rglob("*")) == before  # nothing trained or recorded


# --------------------------------------------------------------------------------------------- tied embeddings


@pytest.fixture(scope="module")
def tied_model(tiny_model, tmp_path_factory) -> Path:
    """A tiny random Qwen2 whose input and output embeddings are one matrix (like SmolLM2 and Qwen2.5 up to 3B:
    tie_word_embeddings, no lm_head.weight in the file), with the tiny model's Qwen2.5 tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = tmp_path_factory.mktemp("tied") / "tiny-tied"
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                                 bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)).save_pretrained(out)
    link_tokenizer(tiny_model, out)
    return out


def link_tokenizer(source: Path, model_dir: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (model_dir / name).symlink_to(source / name)


@pytest.mark.parametrize("module", ["lm_head", "embed_tokens"])
def test_modules_to_save_on_tied_embeddings_is_refused(tied_model, tmp_path, capsys, module):
    """Training one copy of a tied matrix in full would untie the two in the merged model."""
    out = tmp_path / "run"
    assert main(["train", "--base_model", str(tied_model), "--dataset", str(DATA / "mini.jsonl"), "--output_dir",
                 str(out), "--modules_to_save", module, *QUICK]) == 2
    assert last_line(capsys.readouterr().err) == (
        "error: --modules_to_save lm_head/embed_tokens: this model ties its input and output embeddings, and "
        "training one copy would untie them in the merged model; use LoRA only")
    assert not out.exists() or not any(out.iterdir())


# --------------------------------------------------------------------------------------------- padded batches


@pytest.fixture(scope="module")
def recurrent_model(tiny_model, tmp_path_factory) -> Path:
    """A tiny random RWKV (a recurrent model: no attention mask at all, so examples packed into one row would
    carry state into each other), with the tiny model's Qwen2.5 tokenizer and chat template."""
    import torch
    from transformers import RwkvConfig, RwkvForCausalLM

    out = tmp_path_factory.mktemp("rwkv") / "tiny-rwkv"
    torch.manual_seed(0)
    RwkvForCausalLM(RwkvConfig(vocab_size=151936, hidden_size=32, num_hidden_layers=2, attention_hidden_size=32,
                               intermediate_size=64, context_length=1024, bos_token_id=151643, eos_token_id=151645,
                               pad_token_id=151643)).save_pretrained(out)
    link_tokenizer(tiny_model, out)
    return out


def test_a_model_that_cannot_keep_packed_examples_apart_trains_on_padded_batches(recurrent_model, tmp_path):
    """--max_tokens_per_pass asks for padding-free batches (one row per micro-batch); RWKV cannot keep the examples
    of that row apart, so training says so and pads instead: two rows per micro-batch of two, in the recorded plan
    and in what the model is fed. (The default attention, auto, lets transformers pick eager for RWKV.)"""
    said: list[str] = []
    shapes = InputShapes()
    out = tmp_path / "run"
    cfg = TrainConfig(base_model=str(recurrent_model), dataset=str(DATA / "mini.jsonl"), output_dir=str(out),
                      max_steps=2, batch_size=2, gradient_accumulation_steps=1, val_split=0, lora_r=4, lora_alpha=8,
                      save_steps=100, max_tokens_per_pass=2048)
    result = train(cfg, log=lambda *a, **k: said.append(" ".join(map(str, a))), callbacks=(shapes,))
    assert result.final_dir is not None
    assert "RwkvForCausalLM does not build its attention mask from packed positions; padded batches" in said
    assert json.loads((out / "run_config.json").read_text())["batch_plan"]["padding_free"] is False
    assert len(shapes.shapes) == 2 and all(rows == 2 for rows, _ in shapes.shapes), shapes.shapes


# --------------------------------------------------------------------------------------------- a share out of range

@pytest.mark.parametrize("share", ["-0.1", "1.01"])
def test_a_system_prompt_share_outside_0_to_1_is_refused_before_training(tiny_model, tmp_path, capsys, share):
    """-0.1 was once skipped as "no variants" and trained on the dataset's prompts without a word."""
    run = tmp_path / "run"
    assert main(["train", "--base_model", str(tiny_model), "--dataset", str(DATA / "mini.jsonl"), "--output_dir",
                 str(run), "--system_prompt_variants", share, *QUICK]) == 2
    assert last_line(capsys.readouterr().err) == (
        f"error: --system_prompt_variants: expected a share between 0 and 1 such as 0.5, got {float(share)}")
    assert not list(run.rglob("*.safetensors"))  # nothing trained


# ---------------------------------------------------------------------------------------------- a run that diverged


def test_a_run_that_diverged_writes_no_final_adapter(tiny_model, tmp_path, capsys):
    """At lr 1e30 the first update moves every adapter weight by about 1e30 (Adam's step is the rate), the next
    forward pass overflows float32 and the weights turn NaN. Before, such a run saved final/ (all NaN) and said
    "adapter saved"; merge and convert then worked on it. Now one line, and final/ does not exist."""
    out = tmp_path / "run"
    quick = [*QUICK[:QUICK.index("--max_steps")], *QUICK[QUICK.index("--max_steps") + 2:]]
    code = main(["train", "--base_model", str(tiny_model), "--dataset", str(DATA / "mini.jsonl"), "--output_dir",
                 str(out), "--max_steps", "3", "--learning_rate", "1e30", "--warmup_ratio", "0", *quick])
    said = last_line(capsys.readouterr().err)
    assert code == 2
    assert said.startswith("error: training diverged: ") and "adapter tensors hold NaN or infinity after step 3" in said
    assert said.endswith("final/ was not written. Lower --learning_rate (it was 1e+30) and train again")
    assert not (out / "final").exists()


def test_max_steps_zero_trains_by_epochs_as_minus_one_does(tiny_model, tmp_path, capsys):
    """--max_steps wins only when above 0 (the specification's table): 0 trained one step before."""
    quick = [*QUICK[:QUICK.index("--max_steps")], *QUICK[QUICK.index("--max_steps") + 2:]]
    steps = {}
    for max_steps in ("0", "-1"):
        out = tmp_path / f"run{max_steps}"
        assert main(["train", "--base_model", str(tiny_model), "--dataset", str(DATA / "mini.jsonl"), "--output_dir",
                     str(out), "--max_steps", max_steps, "--epochs", "1", *quick]) == 0
        steps[max_steps] = json.loads((out / "train_results.json").read_text())
    rows = sum(1 for _ in (DATA / "mini.jsonl").open())  # one epoch of micro-batches of 2, one per step
    assert steps["0"]["steps_this_process"] == steps["-1"]["steps_this_process"] == -(-rows // 2)
    assert steps["0"]["epoch"] == steps["-1"]["epoch"] == 1.0
