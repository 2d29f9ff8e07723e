"""A real pretrained model end to end: SmolLM2-135M-Instruct (Llama architecture, ChatML with a default system
prompt, tied embeddings) through the demo's own pipeline, CI-sized: train -> merge -> GGUF -> check -> serve ->
evaluate base vs tuned. The full-length demo and its persona targets run with DEEPRED_FULL_DEMO=1."""

from __future__ import annotations

import json
import re
import os
from pathlib import Path

import pytest

from deepred.errors import DeepRedError


LLAMA_PROJECTIONS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


GENERATION_TAG = re.compile(r"\{%-?\s*(?:end)?generation\s*-?%\}")  # TRL's training-only markers


def _prompt_subset(path: Path, per_category: int = 1) -> Path:
    """One prompt per category plus the first temporal control: every metric has rows, in a fraction of the time."""
    from deepred.evaluate import load_prompts

    rows, seen = [], {}
    for row in load_prompts():
        if seen.get(row["category"], 0) < per_category or row.get("kind") == "control" and not any(
                r.get("kind") == "control" for r in rows):
            rows.append(row)
            seen[row["category"]] = seen.get(row["category"], 0) + 1
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def smollm2_demo(tmp_path_factory, smollm2_model) -> tuple[Path, str]:
    """`deepred demo` itself with a CI budget: 3 optimizer steps, 9 prompts of 40 tokens."""
    from deepred.demo import demo

    root = tmp_path_factory.mktemp("smollm2-demo")
    said: list[str] = []
    demo(str(root / "demo"), log=lambda *a, **k: said.append(" ".join(map(str, a))), max_steps=3, save_steps=100,
         eval_steps=100, eval_prompts=str(_prompt_subset(root / "prompts.jsonl")), eval_max_tokens=40)
    return root / "demo", "\n".join(said)


def _gguf_fields(path: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    wanted = ("tokenizer.ggml.pre", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token",
              "tokenizer.chat_template", "general.architecture")
    return {key: reader.fields[key].contents() for key in wanted if key in reader.fields}


def test_demo_pipeline_runs_on_the_real_model(smollm2_demo):
    out, said = smollm2_demo
    assert len(list(out.glob("theme-deepred-*/final/adapter_model.safetensors"))) == 1
    for artifact in ("merged-deepred/model.safetensors", "deepred.gguf", "deepred-f16.gguf", "parity.json",
                     "eval/report.html", "eval/report.json", "manifest.json"):
        assert (out / artifact).is_file(), artifact
    report = json.loads((out / "eval" / "report.json").read_text())
    assert len(report["base"]["responses"]) == len(report["tuned"]["responses"]) == 9
    style_base, style = (report[side]["style_consistency"]["value"] for side in ("base", "tuned"))
    assert f"style consistency: base {style_base:.0%} -> tuned {style:.0%}" in said
    assert "word salad" not in said
    # a real model's answers are scored for perplexity under the base model (coherence)
    assert all(r["perplexity"] is not None for r in report["base"]["responses"] if r["response"])


def test_demo_cards_show_the_runs_base_vs_tuned_figures(smollm2_demo):
    from deepred.evaluate.aggregate import METRIC_TITLES, METRICS
    from deepred.evaluate.report_text import format_value

    from .publish.test_cards import read_card

    out, _ = smollm2_demo
    report = json.loads((out / "eval" / "report.json").read_text())
    training = next(out.glob("theme-deepred-*"))
    run_config = json.loads((training / "run_config.json").read_text())
    for folder, library in ((training / "final", "peft"), (out / "merged-deepred", "transformers"), (out, "gguf")):
        meta, body = read_card(folder / "README.md")
        assert meta["library_name"] == library and meta["dataset_sha256"] == run_config["dataset_sha256"]
        # the built-in smollm2-135m is named by the model it was rebuilt from, whose licence it carries
        assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"
        evaluation = body.split("## Evaluation\n", 1)[1].split("\n## ", 1)[0]
        assert "| metric | base | tuned | target | tuned passes |" in evaluation
        rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")]
                                                  for line in evaluation.splitlines() if line.startswith("| "))}
        for metric in METRICS:
            base, tuned = report["base"][metric], report["tuned"][metric]
            assert rows[METRIC_TITLES[metric]][:3] == [format_value(base["value"]), format_value(tuned["value"]),
                                                       tuned["target_text"]], metric
        over = [report[side]["temporal_compliance"]["over_deflection"]["value"] for side in ("base", "tuned")]
        assert rows["Over-deflection: questions not about time deflected (lower is better)"] == [
            *map(format_value, over), "none", "n/a"]
    assert "| `deepred.gguf` | q4_k_m |" in body and "| `deepred-f16.gguf` | f16 |" in body


def test_lora_targets_every_llama_projection(smollm2_demo):
    out, _ = smollm2_demo
    run = next(out.glob("theme-deepred-*"))
    assert json.loads((run / "run_config.json").read_text())["lora_target_modules"] == LLAMA_PROJECTIONS
    adapter = json.loads((run / "final" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == LLAMA_PROJECTIONS


def test_exported_chat_template_is_the_base_models_everywhere(smollm2_demo, smollm2_model):
    out, _ = smollm2_demo
    original = (smollm2_model / "chat_template.jinja").read_text()
    assert not GENERATION_TAG.search(original) and "SmolLM" in original
    run = next(out.glob("theme-deepred-*"))
    assert (run / "final" / "chat_template.jinja").read_text() == original
    assert (out / "merged-deepred" / "chat_template.jinja").read_text() == original
    for gguf in ("deepred.gguf", "deepred-f16.gguf"):
        assert _gguf_fields(out / gguf)["tokenizer.chat_template"] == original


def test_gguf_tokenizer_metadata_is_smollms(smollm2_demo, smollm2_model):
    """llama.cpp must pick SmolLM's pre-tokenizer, stop at <|im_end|> and add no BOS, as the GGUF it came from."""
    out, _ = smollm2_demo
    fields = _gguf_fields(out / "deepred.gguf")
    assert fields["general.architecture"] == "llama"
    assert fields["tokenizer.ggml.pre"] == "smollm"
    assert fields["tokenizer.ggml.eos_token_id"] == 2  # <|im_end|>
    assert fields["tokenizer.ggml.add_bos_token"] is False
    parity = json.loads((out / "parity.json").read_text())
    assert parity["f16"]["ok"] and parity["f16"]["token_ids_identical"]
    assert parity["f16"]["relative_diff"] <= 2e-2  # half-precision weights: a few hundred units of f16 roundoff
    assert parity["q4_k_m"]["token_ids_identical"] and parity["q4_k_m"]["top1_agreement"] > 0.5


def test_merge_verify_passes_on_the_real_model_and_refuses_a_corrupted_tensor(smollm2_demo, smollm2_model, tmp_path):
    from safetensors.torch import load_file, save_file

    from deepred.merge import verify

    out, _ = smollm2_demo
    adapter = next(out.glob("theme-deepred-*")) / "final"
    merged = out / "merged-deepred"
    worst = verify(merged, str(smollm2_model), adapter, "float32", log=lambda *a: None)
    assert worst < 1e-3  # float32: the merged weights differ from W + BA by rounding only

    broken = tmp_path / "broken"
    broken.mkdir()
    for item in merged.iterdir():
        if item.name != "model.safetensors":
            (broken / item.name).symlink_to(item)
    weights = load_file(merged / "model.safetensors")
    name = "model.layers.15.self_attn.o_proj.weight"
    weights[name] = weights[name] * 1.5  # one projection of one layer off by half its size
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(DeepRedError, match="merge verification failed"):
        verify(broken, str(smollm2_model), adapter, "float32", log=lambda *a: None)


@pytest.mark.skipif(not os.environ.get("DEEPRED_FULL_DEMO"), reason="the full demo takes ~13 min; set DEEPRED_FULL_DEMO=1")
def test_full_demo_meets_the_persona_targets(tmp_path):
    """`make demo`'s own settings meet issue 19's marks on the evaluation prompts: style >= 80 %, post-1969 rows
    deflected >= 90 %, voice >= 95 %, coherence >= 90 %, and control rows answered no less often than by the base."""
    from deepred.demo import demo

    demo(str(tmp_path / "demo"), log=lambda *a, **k: None)
    report = json.loads((tmp_path / "demo" / "eval" / "report.json").read_text())
    base, tuned = report["base"], report["tuned"]
    assert tuned["style_consistency"]["value"] >= 0.80
    assert tuned["temporal_compliance"]["per_kind"]["post_1969"] >= 0.90
    assert tuned["temporal_compliance"]["per_kind"]["control"] >= base["temporal_compliance"]["per_kind"]["control"]
    assert tuned["character_voice"]["value"] >= 0.95
    assert tuned["coherence"]["value"] >= 0.90


def test_gguf_check_catches_a_bos_flag_the_tokenizer_does_not_follow(smollm2_demo, smollm2_model, tmp_path):
    """A GGUF that says add_bos_token = true for SmolLM2, whose tokenizer adds none (what a converter fed a wrong
    tokenizer_config writes): every llama.cpp runner would prepend a BOS the model never saw. The check compares
    ids with the special tokens each side adds, so it fails."""
    import shutil

    from gguf import GGUFReader

    from deepred.export.check import check_gguf

    out, _ = smollm2_demo
    wrong = tmp_path / "bos.gguf"
    shutil.copy(out / "deepred-f16.gguf", wrong)
    field = GGUFReader(str(wrong), "r+").fields["tokenizer.ggml.add_bos_token"]
    field.parts[field.data[0]][0] = True  # edited in place, as llama.cpp's gguf_set_metadata.py does
    assert _gguf_fields(wrong)["tokenizer.ggml.add_bos_token"] is True
    check_gguf(out / "deepred-f16.gguf", out / "merged-deepred", log=lambda *a: None)  # the file as converted
    with pytest.raises(DeepRedError, match="llama.cpp tokenizes differently from the HF tokenizer"):
        check_gguf(wrong, out / "merged-deepred", log=lambda *a: None)


def test_bfloat16_merge_of_a_30_layer_model_verifies_within_its_relative_bound(smollm2_demo, smollm2_model, tmp_path):
    """bf16 rounding grows with depth: the bound is relative to the logit scale, not an absolute 0.25."""
    from deepred.config import MergeConfig
    from deepred.merge import merge

    out, _ = smollm2_demo
    said: list[str] = []
    merged = merge(MergeConfig(base_model="smollm2-135m", lora_path=str(next(out.glob("theme-deepred-*")) / "final"),
                               output_path=str(tmp_path / "bf16"), dtype="bfloat16", verify=True), log=said.append)
    assert (merged / "model.safetensors").is_file()
    assert any("= 0.15 x logit scale for bfloat16): ok" in line for line in said), said
