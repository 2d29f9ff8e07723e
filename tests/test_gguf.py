"""GGUF export: train -> merge -> convert with llama.cpp's converter/quantizer -> compare with the HF model.

Real conversions of the tiny trained model (session fixtures); llama.cpp evaluates the files, including a q4_k_m
generation through `load_llama` so the AMX repacking crash cannot come back unnoticed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deepred import gguf as G
from deepred.config import QUANT_TYPES, ConvertConfig
from deepred.errors import DeepRedError

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "convert_to_gguf.py"
IM_END = 151645

pytestmark = pytest.mark.slow


def quiet(*args, **kwargs):
    pass


def partials(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.partial"))


# ------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("quant_type", ["f32", "f16", "q8_0", "q4_k_m"])
def test_parity_check_passes(gguf_file, merged_model, quant_type):
    lines: list[str] = []
    result = G.check_gguf(gguf_file(merged_model, quant_type), merged_model, log=lines.append)
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
        assert result["relative_diff"] <= G.LOGIT_TOLERANCE["f16"]
        assert result["top1_agreement"] >= 0.9


def test_gguf_metadata_for_lm_studio(gguf_file, merged_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged_model)
    llm = G.load_llama(gguf_file(merged_model, "q4_k_m"), vocab_only=True)
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
    llm = G.load_llama(gguf_file(merged_model, "q4_k_m"), n_ctx=256, seed=0)
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


# ------------------------------------------------------------------------------------------------ failures


def test_check_fails_for_a_different_model(gguf_file, merged_model, tiny_model):
    """The merged model's f32 GGUF against the untrained base: same tokenizer, different logits."""
    with pytest.raises(DeepRedError, match="logits differ"):
        G.check_gguf(gguf_file(merged_model, "f32"), tiny_model, log=quiet)


def test_check_cli_exits_non_zero_on_a_corrupted_file(gguf_file, merged_model, tmp_path):
    good = gguf_file(merged_model, "q4_k_m")
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    proc = subprocess.run([sys.executable, "-m", "deepred.cli", "check-gguf", str(bad), "--model_path",
                           str(merged_model)], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "error:" in proc.stderr and "convert it again" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_killed_conversion_leaves_no_file(merged_model, tmp_path):
    out = tmp_path / "deepred.gguf"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--model_path", str(merged_model), "--output_path",
                             str(out), "--quant_type", "q4_k_m", "--no-check"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not any(p.stat().st_size > 0 for p in partials(tmp_path) if p.exists()):
        assert proc.poll() is None, "conversion ended before it could be killed"
        assert time.monotonic() < deadline, "conversion never started writing"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    sizes = {p: p.stat().st_size for p in partials(tmp_path)}
    time.sleep(1.5)
    assert not out.exists()
    assert {p: p.stat().st_size for p in partials(tmp_path)} == sizes, "the converter kept writing after the kill"
    # The next conversion to this output removes what the killed one left.
    assert G.remove_stale_partials(out) == sorted(sizes)
    assert partials(tmp_path) == []


def test_failed_check_publishes_nothing(merged_model, tmp_path, monkeypatch):
    def fake_converter(source, out, outtype, config):
        out.write_bytes(b"GGUF fake")

    def failing_check(path, model, log=print, label=None):
        assert path.exists() and path.name.endswith(".partial")  # checked before it is published
        raise DeepRedError("token ids differ")

    monkeypatch.setattr(G, "run_converter", fake_converter)
    monkeypatch.setattr(G, "check_gguf", failing_check)
    out = tmp_path / "m.gguf"
    with pytest.raises(DeepRedError, match="not written"):
        G.convert(ConvertConfig(model_path=str(merged_model), output_path=str(out), quant_type="f16"), log=quiet)
    assert not out.exists() and partials(tmp_path) == []

    monkeypatch.setattr(G, "check_gguf", lambda *a, **k: {"ok": True})
    assert G.convert(ConvertConfig(model_path=str(merged_model), output_path=str(out), quant_type="f16"),
                     log=quiet) == out
    assert out.read_bytes() == b"GGUF fake" and partials(tmp_path) == []


@pytest.mark.parametrize("quant_type", ["q4_k_m", "q8_0"])
def test_a_wrong_conversion_cannot_hide_behind_quantisation(merged_model, tiny_model, tmp_path, monkeypatch, quant_type):
    """Fault injection: the converter writes the untrained base model instead of the merged one. A quantised file's
    logits are only reported, so the lossless intermediate must be held to the strict bound before quantising."""
    real_converter = G.run_converter

    def wrong_model(source, out, outtype, config):
        real_converter(tiny_model, out, outtype, config)

    monkeypatch.setattr(G, "run_converter", wrong_model)
    out = tmp_path / "deepred.gguf"
    with pytest.raises(DeepRedError, match=r"logits differ.*not written"):
        G.convert(ConvertConfig(model_path=str(merged_model), output_path=str(out), quant_type=quant_type), log=quiet)
    assert not out.exists() and partials(tmp_path) == []


def test_outputs_never_overwrite_inputs(merged_model, tmp_path, capsys):
    from deepred.cli import main

    inside = merged_model / "model.gguf"
    assert main(["convert", "--model_path", str(merged_model), "--output_path", str(inside), "--no-check"]) == 2
    assert "lies inside the model folder" in capsys.readouterr().err and not inside.exists()
    notes = tmp_path / "notes.gguf"
    notes.write_text("my notes")
    assert main(["convert", "--model_path", str(merged_model), "--output_path", str(notes), "--no-check"]) == 2
    assert "is not a GGUF file; add --force" in capsys.readouterr().err and notes.read_text() == "my notes"


def test_clear_errors_for_bad_inputs(merged_model, tmp_path):
    def error(model_path, output_path) -> str:
        with pytest.raises(DeepRedError) as info:
            G.convert(ConvertConfig(model_path=str(model_path), output_path=str(output_path), quant_type="f16",
                                    check=False), log=quiet)
        message = str(info.value)
        assert "\n" not in message
        return message

    assert "not found" in error(tmp_path / "missing", tmp_path / "a.gguf")
    assert "not a Hugging Face model folder" in error(tmp_path, tmp_path / "a.gguf")
    assert "not writable" in error(merged_model, "/proc/deepred-test.gguf")
    assert "is a folder" in error(merged_model, tmp_path)

    alien = tmp_path / "alien"
    alien.mkdir()
    config = json.loads((merged_model / "config.json").read_text())
    config["architectures"] = ["MadeUpForCausalLM"]
    (alien / "config.json").write_text(json.dumps(config))
    shutil.copy(merged_model / "tokenizer_config.json", alien)
    (alien / "model.safetensors").write_bytes(b"\0" * 16)
    assert "MadeUpForCausalLM is not supported" in error(alien, tmp_path / "a.gguf")
    assert partials(tmp_path) == [] and not (tmp_path / "a.gguf").exists()


# ------------------------------------------------------------------------------------------------ small parts


def test_help_lists_all_twelve_types():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    assert len(QUANT_TYPES) == 12
    for name, description in QUANT_TYPES.items():
        assert any(line.split()[:1] == [name] and description in line for line in lines), name


def test_qwen_tokenizer_config_gets_add_bos_false_without_touching_the_model(merged_model, tmp_path):
    model = tmp_path / "saved-by-transformers5"
    shutil.copytree(merged_model, model)
    config_path = model / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config.pop("add_bos_token", None)
    config_path.write_text(json.dumps(tokenizer_config))
    original = config_path.read_text()
    model_config = json.loads((model / "config.json").read_text())
    with G.converter_input(model, model_config, log=quiet) as view:
        assert view != model and view.name == model.name
        assert json.loads((view / "tokenizer_config.json").read_text())["add_bos_token"] is False
        assert (view / "model.safetensors").resolve() == (model / "model.safetensors").resolve()
    assert not view.exists()
    assert config_path.read_text() == original


def test_stale_partials_of_dead_processes_are_removed(tmp_path):
    out = tmp_path / "m.gguf"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".m.gguf.{dead.pid}.f32.partial"
    ours = tmp_path / f".m.gguf.{os.getpid()}.f32.partial"
    other_output = tmp_path / f".n.gguf.{dead.pid}.f32.partial"
    for path in (stale, ours, other_output):
        path.write_bytes(b"x")
    assert G.remove_stale_partials(out) == [stale]
    assert ours.exists() and other_output.exists()


def test_lossless_intermediate_matches_the_weights():
    assert G.lossless_intermediate({"dtype": "float32"}) == "f32"
    assert G.lossless_intermediate({"torch_dtype": "bfloat16"}) == "bf16"
    assert G.lossless_intermediate({"dtype": "float16"}) == "f16"
    assert G.lossless_intermediate({}) == "f32"
