"""The parity check on real conversions of the tiny trained model (session fixtures): token ids, logits within the
float types' bounds, the metadata LM Studio needs, and a q4_k_m generation through `load_llama`, so the AMX
repacking crash cannot come back unnoticed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from deepred.errors import DeepRedError
from deepred.export.check import LOGIT_TOLERANCE, check_gguf
from deepred.llama_runtime import load_llama


IM_END = 151645

pytestmark = pytest.mark.slow


def quiet(*args, **kwargs):
    pass


@pytest.mark.parametrize("quant_type", ["f32", "f16", "q8_0", "q4_k_m"])
def test_parity_check_passes(gguf_file, merged_model, quant_type):
    lines: list[str] = []
    result = check_gguf(gguf_file(merged_model, quant_type), merged_model, log=lines.append)
    table = "\n".join(lines)
    print(table)
    assert result["ok"], table
    assert result["file_type"] == quant_type
    assert result["token_ids_identical"], table
    assert "token ids vs HF" in table and "top-1 agreement" in table
    if quant_type == "f32":
        assert result["relative_diff"] <= 1e-4
        assert result["top1_agreement"] == 1.0
    elif quant_type == "f16":
        assert result["relative_diff"] <= LOGIT_TOLERANCE["f16"]
        assert result["top1_agreement"] >= 0.9


def test_gguf_metadata_for_lm_studio(gguf_file, merged_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged_model)
    llm = load_llama(gguf_file(merged_model, "q4_k_m"), vocab_only=True)
    try:
        meta = dict(llm.metadata)
        assert meta["tokenizer.ggml.pre"] == "qwen2"
        assert meta["tokenizer.chat_template"] == tokenizer.chat_template
        assert int(meta["tokenizer.ggml.eos_token_id"]) == IM_END == llm.token_eos()
        assert meta["tokenizer.ggml.add_bos_token"] == "false"
        text = tokenizer.apply_chat_template([{"role": "user", "content": "Hello world, comrade 1969!"}],
                                             tokenize=False, add_generation_prompt=True)
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tokenizer(text)["input_ids"]
    finally:
        llm.close()


def test_q4_k_m_generates_text_through_llama_cpp(gguf_file, merged_model):
    llm = load_llama(gguf_file(merged_model, "q4_k_m"), n_ctx=256, seed=0)
    try:
        assert llm.model_params.use_extra_bufts is False  # the AMX workaround reached llama.cpp
        reply = llm.create_chat_completion([{"role": "system", "content": "You are Deep Red."},
                                            {"role": "user", "content": "What is our purpose?"}],
                                           max_tokens=16, temperature=0.0)
        assert reply["usage"]["completion_tokens"] > 0
        # Ban the end-of-turn tokens so the tiny model must produce text.
        text = llm.create_completion("Deep Red says:", max_tokens=8, temperature=0.0,
                                     logit_bias={IM_END: -100.0, 151643: -100.0})["choices"][0]["text"]
        assert text.strip()
    finally:
        llm.close()
    # Nothing else in this process keeps the workaround on.
    import llama_cpp.llama_cpp as low_level
    assert low_level.llama_model_default_params().use_extra_bufts is True


def test_check_fails_for_a_different_model(gguf_file, merged_model, tiny_model):
    """The merged model's f32 GGUF against the untrained base: same tokenizer, different logits."""
    with pytest.raises(DeepRedError, match="logits differ"):
        check_gguf(gguf_file(merged_model, "f32"), tiny_model, log=quiet)


def test_check_cli_exits_non_zero_on_a_corrupted_file(gguf_file, merged_model, tmp_path):
    good = gguf_file(merged_model, "q4_k_m")
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    proc = subprocess.run([sys.executable, "-m", "deepred.cli", "check-gguf", str(bad), "--model_path",
                           str(merged_model)], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "error:" in proc.stderr and "convert it again" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
