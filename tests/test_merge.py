"""Merge: the adapter folds into its own base model only; --verify compares logits and generates a reply."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deepred.cli import main
from deepred.persona import load_persona
from deepred.prompts import load_prompts

from .conftest import with_tokenizer_config


def test_merge_with_verify(trained_run, tiny_model, tmp_path, capsys):
    out = tmp_path / "merged-deepred"
    code = main(["merge", "--base_model", str(tiny_model), "--lora_path", str(trained_run / "final"),
                 "--output_path", str(out), "--verify"])
    assert code == 0
    said = capsys.readouterr().out
    assert "verify: max |logit difference| merged vs base+adapter" in said and ": ok" in said
    assert "verify: 'What is the purpose of our Mars mission?' -> " in said  # Deep Red's sample question
    for name in ("model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"):
        assert (out / name).is_file(), name
    assert json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is False
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob(".*.partial"))


def test_merge_verify_asks_the_personas_sample_question(trained_run, tiny_model, tmp_path, capsys):
    """A persona without `sample_question` is asked its first evaluation prompt."""
    butler = load_persona("butler.yaml")
    assert butler.sample_question is None
    first = load_prompts(None, butler)[0]["prompt"]
    assert main(["merge", "--base_model", str(tiny_model), "--lora_path", str(trained_run / "final"),
                 "--output_path", str(tmp_path / "m"), "--verify", "--persona", "butler.yaml"]) == 0
    assert f"verify: {first!r} -> " in capsys.readouterr().out


def test_merge_onto_another_base_model_is_refused(trained_run, tmp_path, capsys):
    out = tmp_path / "merged"
    code = main(["merge", "--base_model", "Qwen/Qwen2.5-7B-Instruct", "--lora_path", str(trained_run / "final"),
                 "--output_path", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "was trained on" in err and "not 'Qwen/Qwen2.5-7B-Instruct'" in err
    assert not out.exists()


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where, relation", [
    (lambda run, base: run, "contains the adapter"),                 # the run folder holding final/
    (lambda run, base: run / "final", "is the adapter"),
    (lambda run, base: run / "final" / "merged", "lies inside the adapter"),
    (lambda run, base: base, "is the base model"),
])
def test_merge_never_writes_over_its_inputs(trained_run, tiny_model, capsys, where, relation):
    output = where(trained_run, tiny_model)
    before = _snapshot(trained_run), _snapshot(tiny_model)
    code = main(["merge", "--base_model", str(tiny_model), "--lora_path", str(trained_run / "final"),
                 "--output_path", str(output), "--verify", "--force"])
    err = capsys.readouterr().err
    assert code == 2 and relation in err and err.count("\n") == 1, err
    assert (_snapshot(trained_run), _snapshot(tiny_model)) == before


def test_merge_replaces_only_its_own_earlier_output(trained_run, tiny_model, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["merge", "--base_model", str(tiny_model), "--lora_path", str(trained_run / "final"), "--output_path",
            str(out)]
    assert main(args) == 2 and "did not write; add --force" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"
    assert main([*args, "--force"]) == 0 and not (out / "notes.txt").exists()
    assert (out / "deepred_merge.json").is_file()
    assert main(args) == 0  # an earlier merge's folder is replaced without --force


def test_a_merge_that_fails_verification_publishes_nothing(trained_run, tiny_model, tmp_path, monkeypatch):
    """Fault injection: the merged weights are corrupted before saving; --verify must catch it before publishing."""
    from peft.tuners.lora import LoraModel

    from deepred.config import MergeConfig
    from deepred.errors import DeepRedError
    from deepred.merge import merge

    real = LoraModel.merge_and_unload

    def corrupted(self, *args, **kwargs):
        model = real(self, *args, **kwargs)
        weight = model.model.layers[1].self_attn.o_proj.weight
        weight.data.mul_(1.5)
        return model

    monkeypatch.setattr(LoraModel, "merge_and_unload", corrupted)
    out = tmp_path / "merged"
    with pytest.raises(DeepRedError, match="merge verification failed.*nothing was written"):
        merge(MergeConfig(base_model=str(tiny_model), lora_path=str(trained_run / "final"), output_path=str(out),
                          verify=True), log=lambda *a: None)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_merge_keeps_the_base_tokenizers_bos_flag(trained_run, tiny_model, tmp_path):
    """A Llama-3-style tokenizer adds BOS (add_bos_token true); the merged folder must say the same, not false."""
    from deepred.config import MergeConfig
    from deepred.merge import merge

    base = with_tokenizer_config(tiny_model, tmp_path / "base-with-bos", add_bos_token=True)
    out = tmp_path / "merged"
    merge(MergeConfig(base_model=str(base), lora_path=str(trained_run / "final"), output_path=str(out), force=True),
          log=lambda *a: None)
    assert json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is True
