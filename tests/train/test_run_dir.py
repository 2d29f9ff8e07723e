"""The training folder: a checkpoint is resumed only on the base model and data it was trained on."""

from __future__ import annotations

import json

import pytest

from deepred.errors import DeepRedError

from ..conftest import DATA
from deepred.train.run_dir import check_checkpoint_matches, latest_checkpoint


def test_checkpoint_from_another_base_model_is_refused(trained_run):
    checkpoint = latest_checkpoint(trained_run)
    with pytest.raises(DeepRedError, match="was trained on base model"):
        check_checkpoint_matches(checkpoint, "Qwen/Qwen2.5-7B-Instruct", "0" * 64)
    recorded = json.loads((trained_run / "run_config.json").read_text())
    with pytest.raises(DeepRedError, match="different dataset"):
        check_checkpoint_matches(checkpoint, recorded["base_model"], "0" * 64)


def test_a_checkpoint_named_into_a_new_folder_is_checked_against_its_own_runs_dataset(trained_run, tmp_path, capsys,
                                                                                       monkeypatch):
    """--resume_from_checkpoint without --output_dir continues into a new timestamped folder, which has no
    run_config.json yet: the dataset check must read the checkpoint's own run folder, or it is silently skipped."""
    from deepred.cli import main

    monkeypatch.chdir(tmp_path)  # the default --output_dir is relative
    checkpoint = latest_checkpoint(trained_run)
    recorded = json.loads((trained_run / "run_config.json").read_text())
    other = tmp_path / "other.jsonl"
    rows = (DATA / "mini.jsonl").read_text().splitlines()
    other.write_text("\n".join(rows[1:]) + "\n")
    code = main(["train", "--base_model", recorded["base_model"], "--dataset", str(other), "--resume_from_checkpoint",
                 str(checkpoint), "--max_steps", "8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "was trained on a different dataset" in err[0], err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["other.jsonl"], "a refused run leaves nothing behind"


def test_final_is_written_whole_or_not_at_all(tmp_path):
    """final/ tells a rerun that training finished: a save cut short (a full disk while the tokenizer is written)
    left an adapter file in final/, and the rerun said "already finished" (a review)."""
    from types import SimpleNamespace

    from deepred.train.run_dir import finished_run, save_final

    class Adapter:
        def save_pretrained(self, folder, safe_serialization):
            (folder / "adapter_model.safetensors").write_bytes(b"weights")

    class FullDisk:
        def save_pretrained(self, folder):
            raise OSError(28, "No space left on device")

    trainer = SimpleNamespace(is_fsdp_enabled=False, model=Adapter())
    with pytest.raises(OSError):
        save_final(trainer, FullDisk(), tmp_path, main_process=True)
    assert not (tmp_path / "final").exists() and finished_run(tmp_path) is None
    assert [p.name for p in tmp_path.iterdir()] == []  # no partial folder left either

    class Tokenizer:
        def save_pretrained(self, folder):
            (folder / "tokenizer.json").write_text("{}")

    assert save_final(trainer, Tokenizer(), tmp_path, main_process=True) == tmp_path / "final"
    assert sorted(p.name for p in (tmp_path / "final").iterdir()) == ["adapter_model.safetensors", "tokenizer.json"]
    assert finished_run(tmp_path) is not None
