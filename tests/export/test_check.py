"""The parity check on real conversions of the tiny trained model (session fixtures): token ids, logits within the
float types' bounds, the metadata LM Studio needs, and a q4_k_m generation through `load_llama`, so the AMX
repacking crash cannot come back unnoticed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from deepred.cli import main
from deepred.errors import DeepRedError
from deepred.export.check import check_gguf
from deepred.llama_runtime import load_llama

from ..conftest import with_scaled_final_norm


IM_END = 151645

pytestmark = pytest.mark.slow


def quiet(*args, **kwargs):
    pass


# Bounds on |GGUF - HF| logits as a fraction of the logit scale, written here from check.py's reasoning (f32: only
# the summation order differs; f16 / bf16: about 40 unit roundoffs), not imported: a test that read them from
# check.py would follow any loosening.
PARITY_BOUND = {"f32": 1e-4, "f16": 2e-2, "bf16": 0.15}


@pytest.mark.parametrize("quant_type, ceiling, top1", [
    ("f32", 1e-5, 1.0), ("f16", 5e-3, 0.9), ("bf16", 3.75e-2, 0.9), ("q8_0", None, None), ("q4_k_m", None, None)])
def test_parity_check_passes(gguf_file, merged_model, quant_type, ceiling, top1):
    """An honest conversion passes, its lossless types well under their bounds. Measured on the tiny model (logit
    scale 10.3): f32 2.9e-6, f16 1.8e-3, bf16 1.6e-2 of the logit scale; the ceilings (bound / 10 for f32, bound / 4
    for f16 and bf16) leave 2-3x for other CPUs' kernels. Quantised files are reported, not judged: q4_k_m differs
    by 0.54 of the logit scale here (the random model quantises badly)."""
    lines: list[str] = []
    result = check_gguf(gguf_file(merged_model, quant_type), merged_model, log=lines.append)
    table = "\n".join(lines)
    print(table)
    assert result["ok"], table
    assert result["file_type"] == quant_type
    assert result["token_ids_identical"], table
    assert "token ids vs HF" in table and "top-1 agreement" in table
    if ceiling is not None:
        assert result["relative_diff"] <= ceiling, table
        assert result["top1_agreement"] >= top1, table


@pytest.mark.parametrize("quant_type, eps", [("f32", 3e-4), ("f16", 6e-2), ("bf16", 0.45)])
def test_parity_refuses_a_model_a_few_bounds_away(gguf_file, merged_model, tmp_path, capsys, quant_type, eps):
    """An honest GGUF of the merged model, checked against that model with its final RMSNorm weight divided by 1 + eps
    (what the check sees when the file was made from a slightly different model): every HF logit is divided by
    1 + eps, so the two differ by eps of the (new) logit scale, 3x the type's bound. Measured: 3.0e-4 (f32), 6.0e-2
    (f16), 0.45 (bf16); honest files differ by 2.9e-6, 1.8e-3 and 1.6e-2. A bound 5x looser would let it through;
    the only refusal tested before (a whole different model, 1.23 off) let bounds up to ~1.2 pass."""
    other = with_scaled_final_norm(merged_model, tmp_path / "merged-rescaled", 1 / (1 + eps))
    code = main(["check-gguf", str(gguf_file(merged_model, quant_type)), "--model_path", str(other)])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, errors
    match = re.search(rf"logits differ from the HF model by \S+ \((\S+) of the logit scale, bound \S+ for "
                      rf"{quant_type}\); this GGUF is not this model$", errors[0])
    assert match, errors
    assert 2 * PARITY_BOUND[quant_type] <= float(match.group(1)) <= 5 * PARITY_BOUND[quant_type]  # the calibration


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


REMOVED = object()


def copy_with_metadata(reader, path: Path, changes: dict) -> Path:
    """A copy of the GGUF `reader` holds, written by gguf-py's GGUFWriter, with metadata fields changed (`REMOVED`
    drops one); tensors and every other field as they were (gguf-py's gguf_new_metadata.py does the same)."""
    from gguf import GGUFValueType, GGUFWriter, Keys

    writer = GGUFWriter(str(path), reader.fields[Keys.General.ARCHITECTURE].contents())
    for field in reader.fields.values():
        if field.name == Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):  # the writer adds these
            continue
        value = changes.get(field.name, field.contents())
        if value is not REMOVED:
            sub_type = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, value, field.types[0], sub_type=sub_type)
    for tensor in reader.tensors:
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes,
                               tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data)
    writer.close()
    return path


@pytest.fixture(scope="module")
def gguf_with(gguf_file, tiny_model, tmp_path_factory):
    """gguf_with(name, {field: value}): the tiny model's q4_k_m GGUF (no training needed: only metadata is edited) with those metadata fields changed. The file is
    parsed once (gguf-py's reader takes seconds on a 151k-token vocabulary); a copy without changes is byte-identical,
    so a refusal of an edited copy comes from its one edit."""
    from gguf import GGUFReader

    source = gguf_file(tiny_model, "q4_k_m")
    reader = GGUFReader(str(source))
    folder = tmp_path_factory.mktemp("edited-gguf")
    assert copy_with_metadata(reader, folder / "unchanged.gguf", {}).read_bytes() == source.read_bytes()
    return lambda name, changes: copy_with_metadata(reader, folder / f"{name}.gguf", changes)


@pytest.mark.parametrize("field, value, problem", [
    # LM Studio would apply its default prompt format instead of the model's own
    pytest.param("tokenizer.chat_template", REMOVED, "the GGUF has no chat template (tokenizer.chat_template); LM "
                 "Studio would fall back to a wrong prompt format", id="chat_template_removed"),
    # <|endoftext|>, the base tokenizer's end token, where the chat model ends its turn with <|im_end|>
    pytest.param("tokenizer.ggml.eos_token_id", 151643, f"GGUF eos id 151643 differs from the tokenizer's {IM_END} "
                 "(<|im_end|>); replies would not stop", id="wrong_eos_id"),
    # Llama 3's pre-tokenizer (digits in threes): on these prompts llama.cpp's ids still match, only this check sees it
    pytest.param("tokenizer.ggml.pre", "llama-bpe", "tokenizer.ggml.pre is 'llama-bpe', expected 'qwen2' for a Qwen "
                 "model", id="wrong_pre_tokenizer"),
    # Qwen adds no BOS; a runner would prepend <|endoftext|> to every prompt
    pytest.param("tokenizer.ggml.add_bos_token", True, "tokenizer.ggml.add_bos_token is true, Qwen needs false",
                 id="add_bos_flipped"),
])
def test_check_refuses_wrong_chat_metadata(gguf_with, tiny_model, capsys, field, value, problem):
    """A real converted GGUF with one metadata field edited through gguf-py is refused in one line that names it."""
    edited = gguf_with(field.rsplit(".", 1)[-1], {field: value})
    code = main(["check-gguf", str(edited), "--model_path", str(tiny_model)])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, errors
    assert errors[0].startswith(f"error: GGUF check failed for {edited}: ") and problem in errors[0], errors


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


def test_a_nan_on_any_check_prompt_fails_parity():
    """Python's max() keeps the first of [1e-6, nan]: NaN logits on the second or third prompt passed (a review)."""
    import numpy as np

    from deepred.export.check import compare_logits

    reference = [np.ones((3, 5), dtype=np.float32), np.ones((2, 5), dtype=np.float32)]
    broken = [reference[0] + 1e-7, np.full((2, 5), np.nan, dtype=np.float32)]
    assert not compare_logits(reference, broken)["relative_diff"] <= 1e-3
    assert compare_logits(reference, [reference[0] + 1e-7, reference[1]])["relative_diff"] <= 1e-3


def test_a_model_folder_without_a_chat_template_is_one_line(gguf_file, merged_model, tmp_path, capsys):
    """The check renders conversations with the folder's chat template: without one it was a ValueError traceback."""
    folder = tmp_path / "no-template"
    folder.mkdir()
    for item in merged_model.iterdir():
        if item.name != "chat_template.jinja":
            (folder / item.name).symlink_to(item)
    assert main(["check-gguf", str(gguf_file(merged_model, "f16")), "--model_path", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {folder} has no chat template") and err.count("\n") == 1, err
