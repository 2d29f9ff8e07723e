"""A third persona whose cutoff is before AD 1000 (Clemens, a Stoic counsellor of Marcus Aurelius; his knowledge
ends in AD 180), proven end to end with its own labelled answers, as tests/test_persona.py proves the butler.

tests/data/labelled_responses_stoic.jsonl was written by hand for this test, with the labels and sizes of the
butler's set (16 answers per label; the temporal answers ask the temporal prompts of stoic_prompts.jsonl, so that
their kind and expected keywords come from the persona's prompts). The thresholds are the ones
tests/evaluate/test_evaluate.py asserts for Deep Red (docs/metrics.md, "Separation measured on the labelled set").
"""

from __future__ import annotations

import json
from collections import defaultdict

import pytest

from deepred import evaluate as E

from .conftest import DATA
from .evaluate import test_evaluate as deep_red
from .test_persona import BUTLER_LABELLED, rows_of

STOIC_LABELLED = DATA / "labelled_responses_stoic.jsonl"


@pytest.fixture(scope="module")
def stoic() -> E.Persona:
    return E.load_persona("stoic.yaml")


@pytest.fixture(scope="module")
def labelled(stoic) -> dict[str, list[dict]]:
    labels = {row["id"]: row["label"] for row in rows_of(STOIC_LABELLED)}
    groups = defaultdict(list)
    for entry in E.score_responses(E.load_responses(STOIC_LABELLED, persona=stoic), persona=stoic):
        groups[labels[entry["id"]]].append(entry)
    return groups


def test_the_stoic_set_has_the_butlers_labels_and_sizes():
    ours, butlers = defaultdict(int), defaultdict(int)
    for row in rows_of(STOIC_LABELLED):
        ours[row["label"]] += 1
    for row in rows_of(BUTLER_LABELLED):
        butlers[row["label"]] += 1
    assert ours == butlers


def test_the_persona_is_before_ad_1000(stoic):
    assert stoic.cutoff == 180 and stoic.cutoff_label == "AD 180" and stoic.later_kind == "post_180"
    prompts = E.load_prompts(persona=stoic)
    kinds = defaultdict(int)
    for prompt in prompts:
        if prompt["category"] == stoic.temporal_category:
            kinds[prompt["kind"]] += 1
            assert prompt["kind"] != "control" or prompt["expect_any"], prompt
    assert kinds == {"post_180": 10, "control": 8}
    assert {p["category"] for p in prompts} == set(stoic.categories)


@pytest.mark.parametrize("deep_reds_check", [
    deep_red.test_style_separates_persona_from_generic_assistant, deep_red.test_voice_detects_out_of_character,
    deep_red.test_temporal_flags_anachronisms_not_period_answers, deep_red.test_labelled_answers_are_coherent,
], ids=lambda check: check.__name__[len("test_"):])
def test_stoic_detectors_separate_as_deep_reds_do(labelled, deep_reds_check):
    """The per-label rates Deep Red's labelled set must reach (stricter than the issue's 0.8 / 0.2 / 0.9 / 0.1 / 0.8),
    on the Stoic's."""
    deep_reds_check(labelled)
    temporal = [e for e in labelled["anachronistic"] if e["category"] == "temporal"]
    assert len(temporal) >= 10


def test_later_years_are_caught_as_the_era_writes_them(labelled):
    """The anachronisms the Stoic's set holds are found by the forms only an ancient cutoff needs: AD-marked years,
    "in 410, ..." and ordinal centuries; period answers that name AD 122 or the fifth century of the city pass."""
    found = {a for e in labelled["anachronistic"] for a in e["anachronisms"]}
    assert {"ad 306 (narrated as past)", "ad 410", "271", "312", "fifth century"} <= found, found
    period = {e["id"]: e for e in labelled["period_correct"]}
    assert "AD 122" in period["period_correct-14"]["response"] and not period["period_correct-14"]["anachronisms"]
    assert "fifth century of the city" in period["period_correct-05"]["response"]
    assert not period["period_correct-05"]["temporal_violation"]


def test_evaluate_with_the_stoic_writes_his_report(tmp_path):
    from deepred.cli import main

    rows = [{k: r[k] for k in ("id", "category", "prompt", "response")} for r in rows_of(STOIC_LABELLED)
            if r["label"] in ("in_persona", "period_correct")]
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "report"
    assert main(["evaluate", "--persona", "stoic.yaml", "--responses", str(answers), "--output_dir", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["meta"]["persona"]["title"] == "Clemens"
    assert report["temporal_compliance"]["count"] == 16 and report["temporal_compliance"]["value"] == 1.0
    assert set(report["temporal_compliance"]["per_kind"]) == {"post_180", "control"}
    assert report["style_consistency"]["value"] >= 0.8
    assert (out / "report.md").read_text().startswith("# Clemens evaluation\n")


def test_the_horizon_writes_years_as_the_era_does_and_its_deflections_pass(stoic):
    from deepred.horizon import horizon_examples

    rows = [row for row in horizon_examples(stoic, 54, seed=1) if row["source"] == "horizon"]
    questions = {row["messages"][1]["content"] for row in rows}
    assert "What happened in AD 212?" in questions and "What happened in 1066?" in questions
    for row in rows:
        question, reply = row["messages"][1]["content"], row["messages"][2]["content"]
        assert E.infer_temporal_kind(question, stoic) == "post_180", question
        assert "AD 180" in reply, reply
        verdict = E.temporal_check(reply, question, stoic.later_kind, None, stoic)
        assert not verdict["violation"], (question, verdict["reason"])
