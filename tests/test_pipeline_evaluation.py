"""The evaluate stage of `deepred run`: base and tuned GGUFs on two servers, and the base model's answers kept per
machine, so a second run asks only the tuned model; a damaged kept file is asked again, other settings are kept
apart."""

from __future__ import annotations

import json
import shutil

from deepred.config import RunConfig
from deepred.pipeline import run_pipeline

from .conftest import DATA

PROMPTS = [{"id": "m1", "category": "mission", "prompt": "What is the purpose of our mission to Mars?"},
           {"id": "c1", "category": "chess", "prompt": "Why do you play chess?"},
           {"id": "t1", "category": "temporal", "prompt": "What happened in 1975?", "kind": "post_1969"}]
QUICK = dict(max_steps=1, batch_size=1, gradient_accumulation_steps=1, val_split=0, lora_r=4, lora_alpha=8,
             save_steps=100, quant_types=["q8_0"], check=False, eval_heldout=False, eval_max_tokens=6)


def _run(tiny_model, tmp_path, from_stage=None, **extra) -> tuple[str, dict]:
    said = []
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in PROMPTS))
    dataset = tmp_path / "data.jsonl"
    if not dataset.exists():
        shutil.copy(DATA / "mini.jsonl", dataset)
    cfg = RunConfig(base_model=str(tiny_model), dataset=str(dataset), output_dir=str(tmp_path / "run"),
                    eval_prompts=str(prompts), **{**QUICK, **extra})
    run_pipeline(cfg, from_stage=from_stage, log=lambda *a, **k: said.append(" ".join(map(str, a))))
    return "\n".join(said), json.loads((tmp_path / "run" / "eval" / "report.json").read_text())


def _kept(cache) -> list:
    return sorted((cache / "base-answers").glob("*.jsonl"))


def test_the_base_answers_are_kept_and_a_second_run_asks_only_the_tuned_model(tiny_model, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("DEEPRED_CACHE", str(cache))
    first, report = _run(tiny_model, tmp_path)
    assert "serving base and tuned models at" in first
    [kept] = _kept(cache)
    rows = [json.loads(line) for line in kept.read_text().splitlines()]
    assert [(r["id"], r["response"]) for r in rows] == [(e["id"], e["response"]) for e in report["base"]["responses"]]

    again, second = _run(tiny_model, tmp_path, from_stage="evaluate")
    assert "kept from an earlier run" in again and "serving the tuned model at" in again
    assert second["base"]["meta"]["source_kind"] == "responses"
    assert [e["response"] for e in second["base"]["responses"]] == [e["response"] for e in report["base"]["responses"]]
    assert second["base"]["temporal_compliance"] == report["base"]["temporal_compliance"]  # kinds found again

    kept.write_text(kept.read_text()[:40])  # cut mid-line, as by a full disk
    damaged, _ = _run(tiny_model, tmp_path, from_stage="evaluate")
    assert "cannot be read" in damaged and "serving base and tuned models at" in damaged
    assert [json.loads(line)["id"] for line in kept.read_text().splitlines()] == ["m1", "c1", "t1"]

    longer, _ = _run(tiny_model, tmp_path, eval_max_tokens=7)  # other settings: other answers, kept apart
    assert "serving base and tuned models at" in longer and len(_kept(cache)) == 2
