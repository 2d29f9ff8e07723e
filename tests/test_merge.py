"""Merge: the adapter folds into its own base model only; --verify compares logits and generates a reply."""

from __future__ import annotations

import json

from deepred.cli import main


def test_merge_with_verify(trained_run, tiny_model, tmp_path, capsys):
    out = tmp_path / "merged-deepred"
    code = main(["merge", "--base_model", str(tiny_model), "--lora_path", str(trained_run / "final"),
                 "--output_path", str(out), "--verify"])
    assert code == 0
    said = capsys.readouterr().out
    assert "verify: max |logit difference| merged vs base+adapter" in said and ": ok" in said
    assert "verify: 'What is the purpose of our mission to Mars?' -> " in said
    for name in ("model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"):
        assert (out / name).is_file(), name
    assert json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is False
    assert not list(tmp_path.glob("*.partial"))


def test_merge_onto_another_base_model_is_refused(trained_run, tmp_path, capsys):
    out = tmp_path / "merged"
    code = main(["merge", "--base_model", "Qwen/Qwen2.5-7B-Instruct", "--lora_path", str(trained_run / "final"),
                 "--output_path", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "was trained on" in err and "not 'Qwen/Qwen2.5-7B-Instruct'" in err
    assert not out.exists()
