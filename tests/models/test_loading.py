"""Loading models: the tokenizer flags transformers drops on save are kept in one place, and only the deprecation
warning a dependency raises on its own is hidden."""

from __future__ import annotations

import json
import warnings

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
