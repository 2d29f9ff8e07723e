"""Conversion with llama.cpp's converter and quantiser: a file appears only when complete and checked, a killed
conversion leaves nothing under the output name, a wrong conversion cannot hide behind quantisation, inputs are
never overwritten."""

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

from deepred.config import ConvertConfig
from deepred.errors import DeepRedError
import deepred.export.convert as C
from deepred.files import remove_stale_partials
from deepred.quant_types import QUANT_TYPES

from ..conftest import REPO, with_scaled_final_norm

SCRIPT = REPO / "scripts" / "convert_to_gguf.py"
IM_END = 151645

pytestmark = pytest.mark.slow


def quiet(*args, **kwargs):
    pass


def partials(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.partial"))


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
    assert remove_stale_partials(out) == sorted(sizes)
    assert partials(tmp_path) == []


def test_failed_check_publishes_nothing(merged_model, tmp_path, monkeypatch):
    def fake_converter(source, out, outtype, config):
        out.write_bytes(b"GGUF fake")

    def failing_check(path, model, log=print, label=None):
        assert path.exists() and path.name.endswith(".partial")  # checked before it is published
        raise DeepRedError("token ids differ")

    monkeypatch.setattr(C, "run_converter", fake_converter)
    monkeypatch.setattr(C, "check_gguf", failing_check)
    out = tmp_path / "m.gguf"
    with pytest.raises(DeepRedError, match="not written"):
        C.convert(ConvertConfig(model_path=str(merged_model), output_path=str(out), quant_type="f16"), log=quiet)
    assert not out.exists() and partials(tmp_path) == []

    monkeypatch.setattr(C, "check_gguf", lambda *a, **k: {"ok": True})
    assert C.convert(ConvertConfig(model_path=str(merged_model), output_path=str(out), quant_type="f16"),
                     log=quiet) == out
    assert out.read_bytes() == b"GGUF fake" and partials(tmp_path) == []


@pytest.mark.parametrize("quant_type", ["q4_k_m", "q8_0"])
def test_a_wrong_conversion_cannot_hide_behind_quantisation(merged_model, tiny_model, tmp_path, monkeypatch, quant_type):
    """Fault injection: the converter writes the untrained base model instead of the merged one. A quantised file's
    logits are only reported, so the lossless intermediate must be held to the strict bound before quantising."""
    real_converter = C.run_converter

    def wrong_model(source, out, outtype, config):
        real_converter(tiny_model, out, outtype, config)

    monkeypatch.setattr(C, "run_converter", wrong_model)
    out = tmp_path / "deepred.gguf"
    with pytest.raises(DeepRedError, match=r"logits differ.*not written"):
        C.convert(ConvertConfig(model_path=str(merged_model), output_path=str(out), quant_type=quant_type), log=quiet)
    assert not out.exists() and partials(tmp_path) == []


def test_a_corruption_just_above_the_f32_bound_cannot_hide_behind_quantisation(gguf_file, merged_model, tmp_path,
                                                                              monkeypatch):
    """Fault injection: the converter's lossless f32 intermediate is the model's final RMSNorm weight x (1 + 3e-4)
    away from the folder being converted (the honest f32 GGUF of the merged model, made for a folder whose norm is
    divided by 1 + 3e-4): 3.0e-4 of the logit scale measured, 3x the f32 bound (1e-4). The q4_k_m file itself is only
    reported, and its own rounding differs from the model by 0.54 of the logit scale here, 1,800x more; so the
    intermediate must be held to the f32 bound before quantising, and nothing is written."""
    honest_f32 = gguf_file(merged_model, "f32")
    other = with_scaled_final_norm(merged_model, tmp_path / "merged-rescaled", 1 / (1 + 3e-4))

    def slightly_wrong_model(source, out, outtype, config):
        assert outtype == "f32"  # a float32 folder's lossless intermediate
        shutil.copyfile(honest_f32, out)

    monkeypatch.setattr(C, "run_converter", slightly_wrong_model)
    out = tmp_path / "deepred.gguf"
    with pytest.raises(DeepRedError, match=r"lossless f32 before quantising.*logits differ from the HF model by \S+ "
                                           r"\(0\.0003 of the logit scale, bound \S+ for f32\).*not written"):
        C.convert(ConvertConfig(model_path=str(other), output_path=str(out), quant_type="q4_k_m"), log=quiet)
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
            C.convert(ConvertConfig(model_path=str(model_path), output_path=str(output_path), quant_type="f16",
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
    with C.converter_input(model, model_config, log=quiet) as view:
        assert view != model and view.name == model.name
        assert json.loads((view / "tokenizer_config.json").read_text())["add_bos_token"] is False
        assert (view / "model.safetensors").resolve() == (model / "model.safetensors").resolve()
    assert not view.exists()
    assert config_path.read_text() == original


def test_the_tokenizer_view_of_the_current_folder_is_named_after_it(merged_model, tmp_path, monkeypatch):
    """`deepred convert --model_path .`: Path(".").name is empty, and the view was the temporary folder itself
    ('File exists'; a review)."""
    model = tmp_path / "saved-by-transformers5"
    shutil.copytree(merged_model, model)
    config_path = model / "tokenizer_config.json"
    config_path.write_text(json.dumps({k: v for k, v in json.loads(config_path.read_text()).items()
                                       if k != "add_bos_token"}))
    monkeypatch.chdir(model)
    with C.converter_input(Path("."), json.loads((model / "config.json").read_text()), log=quiet) as view:
        assert view.name == model.name and (view / "config.json").is_file()


def test_stale_partials_of_dead_processes_are_removed(tmp_path):
    out = tmp_path / "m.gguf"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".m.gguf.{dead.pid}.f32.partial"
    ours = tmp_path / f".m.gguf.{os.getpid()}.f32.partial"
    other_output = tmp_path / f".n.gguf.{dead.pid}.f32.partial"
    for path in (stale, ours, other_output):
        path.write_bytes(b"x")
    assert remove_stale_partials(out) == [stale]
    assert ours.exists() and other_output.exists()


def test_lossless_intermediate_matches_the_weights():
    assert C.lossless_intermediate({"dtype": "float32"}) == "f32"
    assert C.lossless_intermediate({"torch_dtype": "bfloat16"}) == "bf16"
    assert C.lossless_intermediate({"dtype": "float16"}) == "f16"
    assert C.lossless_intermediate({}) == "f32"
