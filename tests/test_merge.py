"""Merge: the adapter folds into its own base model only; --verify compares logits and generates a reply."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from deepred.cli import main
from deepred.persona import load_persona
from deepred.prompts import load_prompts

from .conftest import with_tokenizer_config


# `--verify` prints "... = <abs> = <relative> x logit scale <scale> over ..." when it passes, and refuses with
# "... by <abs> (bound <abs>: <fraction> x logit scale <scale> for <dtype>) ...": errors as fractions of max(1, scale).
VERIFIED = re.compile(r"verify: max \|logit difference\| merged vs base\+adapter = \S+ = (\S+) x logit scale \S+ over "
                      r".*: ok")
REFUSED = re.compile(r"merged logits differ from base\+adapter by (\S+) \(bound \S+: \S+ x logit scale (\S+) for")


def verified_relative_error(said: str) -> float:
    match = VERIFIED.search(said)
    assert match, said
    return float(match.group(1))


def test_merge_with_verify(trained_run, tiny_model, tmp_path, capsys):
    """The merged weights are W + (lora_alpha / r) B A on every adapted layer and the base's own elsewhere; the
    marker records what was merged; --verify's float32 logits match base+adapter to 1.6e-6 of the logit scale
    (measured: only the rounding of W + BA, once, against W x + B (A x)). The ceiling 1e-5 leaves 6x for other CPUs'
    summation order and sits 10x under the bound merge.py states for float32 (1e-4), which a 3e-4 corruption
    exceeds (test_verify_refuses_a_corruption_a_few_bounds_above_honest)."""
    import numpy as np
    from safetensors.numpy import load_file

    adapter = trained_run / "final"
    out = tmp_path / "merged-deepred"
    code = main(["merge", "--base_model", str(tiny_model), "--lora_path", str(adapter), "--output_path", str(out),
                 "--verify"])
    assert code == 0
    said = capsys.readouterr().out
    assert verified_relative_error(said) <= 1e-5, said
    assert "verify: 'What is the purpose of our Mars mission?' -> " in said  # Deep Red's sample question

    base, merged = load_file(tiny_model / "model.safetensors"), load_file(out / "model.safetensors")
    lora = load_file(adapter / "adapter_model.safetensors")
    config = json.loads((adapter / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]  # 16 / 8: plain LoRA (no rsLoRA, no DoRA) in this run
    assert not config.get("use_rslora") and not config.get("use_dora")
    adapted = {key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
               for key in lora if key.endswith(".lora_A.weight")}
    assert len(adapted) == 2 * 7 and set(merged) == set(base)  # 2 layers x 7 target modules; no tensor lost
    for name in adapted:
        prefix = "base_model.model." + name.removesuffix(".weight")
        delta = scaling * lora[prefix + ".lora_B.weight"] @ lora[prefix + ".lora_A.weight"]
        assert np.abs(delta).max() > 1e-3, name  # training moved this layer: the comparison below means something
        np.testing.assert_allclose(merged[name], base[name] + delta, rtol=0, atol=1e-6, err_msg=name)
    for name in set(base) - adapted:
        assert np.array_equal(merged[name], base[name]), name

    record = json.loads((out / "deepred_merge.json").read_text())
    assert record == {"lora_path": str(adapter), "base_model": str(tiny_model), "dtype": "float32"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    for name in ("tokenizer.json", "chat_template.jinja"):  # the adapter's tokenizer, as trained
        assert (out / name).read_bytes() == (adapter / name).read_bytes(), name
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


# Bounds on |merged - (base+adapter)| logits as a fraction of the logit scale, written here from merge.py's reasoning
# (unit roundoff grown over the matmuls: 1e-4 for float32, about 40 u for float16 (u = 4.9e-4) and bfloat16
# (u = 3.9e-3)), not imported: a test that read them from merge.py would follow any loosening.
MERGE_BOUND = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 0.15}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_merges_verify_well_below_their_bound(trained_run, tiny_model, tmp_path, capsys, dtype):
    """An honest merge in float16 / bfloat16 passes --verify at least 3x under the bound. Measured on the tiny model:
    float16 3.7e-3 and bfloat16 2.4e-2 of the logit scale (5x and 6x under 2e-2 and 0.15); the ceiling bound / 3
    leaves about 2x for other CPUs' kernels. (float32: test_merge_with_verify.)"""
    out = tmp_path / f"merged-{dtype}"
    assert main(["merge", "--base_model", str(tiny_model), "--lora_path", str(trained_run / "final"), "--output_path",
                 str(out), "--dtype", dtype, "--verify"]) == 0
    assert verified_relative_error(capsys.readouterr().out) <= MERGE_BOUND[dtype] / 3
    assert json.loads((out / "deepred_merge.json").read_text())["dtype"] == dtype


@pytest.mark.parametrize("dtype, eps", [("float32", 3e-4), ("float16", 6e-2), ("bfloat16", 0.45)])
def test_verify_refuses_a_corruption_a_few_bounds_above_honest(trained_run, tiny_model, tmp_path, monkeypatch, capsys,
                                                                 dtype, eps):
    """Fault injection: the merged model's final RMSNorm weight is multiplied by 1 + eps before saving. lm_head is
    linear without bias, so every merged logit is (1 + eps) times base+adapter's: off by eps of the logit scale,
    3x the dtype's bound. Measured: 3.0e-4 (float32), 6.0e-2 (float16), 0.46 (bfloat16: eps plus its rounding);
    honest merges differ by 1.6e-6, 3.7e-3, 2.4e-2. A bound 5x looser would let it through (the corruption this
    replaces, one weight x 1.5, was 0.21 of the logit scale: only a float32 bound 2,000x looser let it pass).
    The refusal is one line and nothing appears at the output path."""
    from peft.tuners.lora import LoraModel

    real = LoraModel.merge_and_unload

    def corrupted(self, *args, **kwargs):
        model = real(self, *args, **kwargs)
        model.model.norm.weight.data.mul_(1 + eps)
        return model

    monkeypatch.setattr(LoraModel, "merge_and_unload", corrupted)
    out = tmp_path / "merged"
    code = main(["merge", "--base_model", str(tiny_model), "--lora_path", str(trained_run / "final"), "--output_path",
                 str(out), "--dtype", dtype, "--verify"])
    # stderr also holds the progress bars of the model loads; the refusal is the one "error:" line
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, errors
    err = errors[0]
    assert "merge verification failed" in err and "nothing was written" in err
    worst, scale = map(float, REFUSED.search(err).groups())
    assert 2 * MERGE_BOUND[dtype] <= worst / max(1.0, scale) <= 5 * MERGE_BOUND[dtype], err  # the calibration holds
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


def test_verify_refuses_an_adapter_whose_weights_are_not_numbers(trained_run, tiny_model, tmp_path, capsys):
    """An adapter from a training run that diverged: one lora_B tensor set to NaN. Every merged logit it touches is
    NaN, and a NaN difference is never larger than a bound (max() skips it): before, verify said "0.00e+00 ... ok"
    and the merged model was published. Now one line, nothing at the output path."""
    import shutil

    import numpy as np
    from safetensors.numpy import load_file, save_file

    adapter = tmp_path / "diverged"
    shutil.copytree(trained_run / "final", adapter)
    tensors = load_file(adapter / "adapter_model.safetensors")
    name = next(k for k in sorted(tensors) if "lora_B" in k)
    tensors[name] = np.full_like(tensors[name], np.nan)
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    out = tmp_path / "merged"
    code = main(["merge", "--base_model", str(tiny_model), "--lora_path", str(adapter), "--output_path", str(out),
                 "--verify"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and errors == ["error: merge verification failed: the logits are not finite (NaN or infinity), "
                                    "so the adapter's weights are not numbers (its training diverged: lower "
                                    "--learning_rate and train again); nothing was written"]
    assert not out.exists()


@pytest.mark.parametrize("config, message", [
    ("{bad", "cannot be read as JSON"), ("[1]", "is not a JSON object"),
    (json.dumps({"base_model_name_or_path": "nonexistent-org/no-such-model", "peft_type": "LORA"}),
     "cannot load model 'nonexistent-org/no-such-model'")])
def test_a_damaged_adapter_or_a_base_model_not_to_be_had_is_one_line(tmp_path, capsys, monkeypatch, config, message):
    """A review found tracebacks: adapter_config.json not a JSON object (JSONDecodeError, AttributeError), and
    --dtype auto reading the named base model's config past the loader that turns hub failures into one line."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    adapter = tmp_path / "final"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(config)
    out = tmp_path / "merged"
    assert main(["merge", "--lora_path", str(adapter), "--output_path", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not out.exists()
