"""Loading models: the tokenizer flags transformers drops on save are kept in one place, and only the deprecation
warning a dependency raises on its own is hidden."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest

from deepred.models.loading import (declared_tokenizer_flags, family_tokenizer_flags, missing_family_flags,
                                    quiet_dependency_warnings, set_tokenizer_flags)


def test_only_the_dependencys_own_deprecation_warning_is_hidden():
    import transformers.modeling_utils as modeling_utils

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_dependency_warnings()
        # as PEFT triggers it: transformers' own property raises it from modeling_utils
        warnings.warn_explicit("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning,
                               modeling_utils.__file__, 1, module="transformers.modeling_utils")
        warnings.warn_explicit("`gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning,
                               "training_args.py", 1, module="transformers.training_args")
        warnings.warn_explicit("`is_gradient_checkpointing` is deprecated", FutureWarning, "ours.py", 1,
                               module="deepred.something")
    assert [str(w.message) for w in seen] == ["`gradient_checkpointing` is deprecated and will be removed in v6.",
                                              "`is_gradient_checkpointing` is deprecated"]


def test_tokenizer_flags_are_read_and_written_in_one_place(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    assert family_tokenizer_flags("qwen2") == {"add_bos_token": False} and family_tokenizer_flags("llama") == {}
    assert declared_tokenizer_flags(str(tmp_path)) == {}
    assert missing_family_flags(tmp_path, "qwen2") == {"add_bos_token": False}
    set_tokenizer_flags(tmp_path, missing_family_flags(tmp_path, "qwen2"))
    assert declared_tokenizer_flags(str(tmp_path)) == {"add_bos_token": False}
    assert missing_family_flags(tmp_path, "qwen2") == {}  # declared now: nothing left to add
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"


@pytest.mark.parametrize("command", ["recall", "pairs"])
def test_a_base_model_neither_on_disk_nor_on_the_hub_is_one_line_for_the_commands_that_need_its_folder(command,
                                                                                                     tmp_path):
    """`recall` and `pairs` convert the base model's folder to a GGUF; a name the hub cannot give (offline here, with
    an empty cache) ended in huggingface_hub's chained traceback, and a missing local folder was sent to the hub."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "DEEPRED_CACHE": str(tmp_path)}
    for name, said in [("example-org/no-such-model", "cannot load model 'example-org/no-such-model': it is not a "
                                                     "local folder and the Hugging Face hub could not provide it"),
                       (str(tmp_path / "no-folder"), f"model folder not found: {tmp_path / 'no-folder'} ")]:
        run = subprocess.run([sys.executable, "-m", "deepred.cli", command, "--output", str(tmp_path / "out.jsonl"),
                              "--base_model", name], capture_output=True, text=True, env=env, timeout=300)
        assert run.returncode == 2, run.stderr
        assert "Traceback" not in run.stderr and run.stderr.count("\n") == 1, run.stderr
        assert run.stderr.startswith(f"error: {said}"), run.stderr
        assert not (tmp_path / "out.jsonl").exists()
