"""Model cards: README.md with Hub metadata beside the adapter, the merged model and the GGUFs, built from what the
run recorded. `deepred run` and the demo are covered in test_pipeline.py and test_real_model.py."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from pathlib import Path

import yaml

from deepred.publish.cards import CardSources, base_model_facts, gather_card, render_card, write_card, write_gguf_card
from deepred.cli import build_parser
from deepred.config import TrainConfig, resolve


def read_card(path: Path) -> tuple[dict, str]:
    """(front matter, Markdown body) of a README.md model card."""
    text = path.read_text(encoding="utf-8")
    assert text.startswith("---\n"), text[:80]
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def table(body: str, heading: str) -> dict[str, str]:
    """The first two columns of the table(s) under a `## heading`, as {first cell: second cell}."""
    section = body.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return {cells[0]: cells[1] for cells in (
        [c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines()
        if line.startswith("| ") and not line.startswith("| ---"))}


def commands(body: str) -> list[str]:
    return body.split("## Reproduce\n", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0].splitlines()


def shown(value) -> str:
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


def test_deepred_train_writes_the_adapter_card_whose_command_reproduces_the_run(trained_run, tiny_model):
    run_config = json.loads((trained_run / "run_config.json").read_text())
    meta, body = read_card(trained_run / "final" / "README.md")
    assert meta["base_model"] == str(tiny_model) == run_config["config"]["base_model"]
    assert meta["library_name"] == "peft" and meta["base_model_relation"] == "adapter"
    assert {"deepred", "persona", "lora", "peft", "qwen2"} <= set(meta["tags"])
    assert meta["datasets"] == ["mini.jsonl"] and meta["dataset_sha256"] == run_config["dataset_sha256"]
    assert "license" not in meta  # the random tiny model has none to carry
    assert "Model Card for Model ID" not in body  # PEFT's empty template is replaced
    assert (trained_run / "README.md").read_text() == (trained_run / "final" / "README.md").read_text()  # TRL's too

    settings = table(body, "Training")
    for key, value in run_config["config"].items():
        if key not in ("output_dir", "resume_from_checkpoint", "resume_latest", "wandb"):
            assert settings[key] == shown(value), key
    assert "cutoff: **1969**" in body and "Deep Red" in body
    assert "## Evaluation" not in body  # training alone evaluates nothing

    # 24 examples at --val_split 0.2: ceil(4.8) = 5 held out, so 19 trained; no horizon rows were added
    assert settings["examples"] == "19 trained, 5 held out for validation (24 used of 24), 0 cut to max_seq_length"
    assert settings["dataset file"] == f"`mini.jsonl`, sha256 `{run_config['dataset_sha256']}`"
    train_results = json.loads((trained_run / "train_results.json").read_text())
    assert table(body, "Training")["train_loss"] == str(train_results["train_loss"])
    [command] = commands(body)
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert args.command == "train"
    reproduced = dataclasses.asdict(resolve(TrainConfig, args))
    recorded = {**run_config["config"], "resume_latest": False, "resume_from_checkpoint": None}
    assert reproduced == recorded


def test_deepred_merge_writes_the_merged_card(merged_model, trained_run, tiny_model):
    meta, body = read_card(merged_model / "README.md")
    assert meta["library_name"] == "transformers" and meta["base_model"] == str(tiny_model)
    run_config = json.loads((trained_run / "run_config.json").read_text())
    assert meta["dataset_sha256"] == run_config["dataset_sha256"]
    train, merge = commands(body)
    assert train.startswith("deepred train ") and f"--output_dir {trained_run}" in train
    assert merge.startswith(f"deepred merge --base_model {tiny_model} --lora_path {trained_run / 'final'} "
                            f"--output_path {merged_model}")


def test_deepred_convert_writes_a_card_beside_a_gguf_of_a_deepred_merge_only(gguf_file, merged_model, tiny_model):
    gguf = gguf_file(merged_model, "q8_0")
    meta, body = read_card(gguf.parent / "README.md")
    assert meta["library_name"] == "gguf" and "gguf" in meta["tags"] and meta["base_model_relation"] == "quantized"
    assert re.search(rf"\| `{gguf.name}` \| q8_0 \| [\d.]+ MiB \|", body)
    assert commands(body)[-1] == f"deepred convert --model_path {merged_model} --output_path {gguf} --quant_type q8_0"
    base_gguf = gguf_file(tiny_model, "q8_0")  # a model deepred did not merge: no persona to describe
    assert not (base_gguf.parent / "README.md").exists()
    assert write_gguf_card(base_gguf, tiny_model, "q8_0") is None


def test_a_readme_deepred_did_not_write_is_kept_beside_a_gguf(tmp_path, trained_run, tiny_model):
    mine = tmp_path / "README.md"
    mine.write_text("# my notes\n")
    said: list[str] = []
    facts = CardSources(str(tiny_model), trained_run)
    assert write_card(tmp_path, "gguf", facts, replace_foreign=False, log=said.append) is None
    assert mine.read_text() == "# my notes\n" and "not a deepred model card" in said[0]
    mine.unlink()
    assert write_card(tmp_path, "gguf", facts, replace_foreign=False) == mine  # absent, or ours: written
    assert write_card(tmp_path, "gguf", facts, replace_foreign=False) == mine


def test_license_and_hub_id_come_from_the_base_model(tmp_path, tiny_model, smollm2_model):
    assert base_model_facts("smollm2-135m") == ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0", "llama")
    base = tmp_path / "base"
    base.mkdir()
    for item in tiny_model.iterdir():
        (base / item.name).symlink_to(item)
    (base / "README.md").write_text("---\nlicense: mit\ntags: [x]\n---\n# a base model\n")
    meta, _ = read_card_text(render_card(gather_card("merged", CardSources(str(base)))))
    assert meta["license"] == "mit" and meta["base_model"] == str(base) and "datasets" not in meta


def read_card_text(text: str) -> tuple[dict, str]:
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def test_a_continued_run_is_described_by_each_stages_own_method(tmp_path, trained_run, tiny_model):
    """A run that continued an adapter (--init_adapter) has two stages; more SFT is not preference training (a review
    found the card saying "then SFT on preference pairs", with the second ChatML set's hash as the pairs' hash)."""
    run = tmp_path / "continued"
    run.mkdir()
    recorded = json.loads((trained_run / "run_config.json").read_text())
    for method, pairs_named in [("sft", False), ("orpo", True)]:
        config = {**recorded["config"], "method": method, "init_adapter": str(trained_run / "final")}
        (run / "run_config.json").write_text(json.dumps({**recorded, "config": config, "dataset_sha256": "0" * 64}))
        meta, body = read_card_text(render_card(gather_card("adapter", CardSources(str(tiny_model), run))))
        assert ("preference_pairs_sha256" in meta) == pairs_named
        assert meta["dataset_sha256"] == recorded["dataset_sha256"]  # the first stage's set
        assert "### Stage 1: supervised fine-tuning" in body
        if pairs_named:
            assert "then ORPO on preference pairs from that adapter" in body and "### Stage 2: ORPO" in body
        else:
            assert "then more supervised fine-tuning from that adapter" in body and "preference pairs" not in body
