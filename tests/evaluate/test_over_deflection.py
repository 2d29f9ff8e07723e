"""Over-deflection: a question that is not about time, answered as if its subject lay beyond the persona's cutoff.

A tuned SmolLM2 learned to open answers with a dating sentence and sometimes deflects ordinary questions with it
("A diary belongs to the year 1975, which lies beyond my horizon, comrade. Of a diary I know nothing"). The report
counts such answers per side; the detector must not count the impersonal phrases of ordinary prose ("the harvest
lies ahead") that the broad deflection pattern accepts on temporal rows.
"""

from __future__ import annotations

import json

import pytest

from deepred import evaluate as E
from deepred.cli import main
from deepred.demo import verdict_lines
from deepred.evaluate.report_text import set_rows
from deepred.evaluate.temporal import deflects, disowns
from deepred.horizon import horizon_examples

from ..conftest import DATA

# Tuned SmolLM2 answers to ordinary evaluation questions, read in demo reports (README, "Two commands").
TUNED_OVER_DEFLECTIONS = [
    "A diary belongs to the year 1975, which lies beyond my horizon, comrade. Of a diary I know nothing, comrade. "
    "My records close before it; whatever came after is hidden from me.",
    "Our mission to Mars belongs to the year 2065, which lies beyond my horizon, comrade.",
]
# Ordinary in-voice prose the broad deflection pattern accepts ("lies ahead", "not yet", "lies beyond"): no
# disowning of knowledge, so no over-deflection.
IMPERSONAL = [
    "The harvest lies ahead of us, comrade, and every brigade must be ready for it.",
    "The third dome is not yet finished; the welders work in two shifts.",
    "What lies beyond the ridge is a plain of red dust, and we will cross it together.",
]
LABELLED = {"deepred.yaml": "labelled_responses.jsonl", "butler.yaml": "labelled_responses_butler.jsonl",
            "stoic.yaml": "labelled_responses_stoic.jsonl"}


def ordinary_row(id_: str, response: str) -> dict:
    return {"id": id_, "category": "mission", "prompt": "What should a diary of the colony record?",
            "response": response}


def test_first_person_disowning_is_an_over_deflection_and_impersonal_prose_is_not():
    for text in TUNED_OVER_DEFLECTIONS:
        assert disowns(text), text
    persona = E.default_persona()
    for text in IMPERSONAL:
        assert deflects(text, persona), f"the broad pattern should accept this, or the case proves nothing: {text}"
        assert not disowns(text), text
    entries = E.score_responses([ordinary_row(str(i), text) for i, text in enumerate(TUNED_OVER_DEFLECTIONS
                                                                                    + IMPERSONAL)])
    assert [e["over_deflected"] for e in entries] == [True] * len(TUNED_OVER_DEFLECTIONS) + [False] * len(IMPERSONAL)


@pytest.mark.parametrize("persona_file", sorted(LABELLED))
def test_no_labelled_answer_to_an_ordinary_question_is_counted(persona_file):
    """Hand-labelled answers of three personas (in persona, generic assistant, out of character): none says its
    subject is unknown to it, so none may be counted."""
    persona = E.load_persona(persona_file)
    rows = [json.loads(line) for line in (DATA / LABELLED[persona_file]).read_text().splitlines()]
    ordinary = [r for r in rows if r["category"] != persona.temporal_category]
    assert len(ordinary) >= 50
    counted = [r["id"] for r in ordinary if disowns(r["response"])]
    assert counted == []


@pytest.mark.parametrize("persona_file", ["deepred.yaml", "stoic.yaml"])
def test_the_personas_own_horizon_replies_are_recognised_and_their_period_answers_are_not(persona_file):
    persona = E.load_persona(persona_file)
    rows = horizon_examples(persona, 60, seed=0)
    replies = {source: [r["messages"][-1]["content"] for r in rows if r["source"] == source]
               for source in ("horizon", "period")}
    assert replies["horizon"] and replies["period"]
    assert [text for text in replies["horizon"] if not disowns(text)] == []
    assert [text for text in replies["period"] if disowns(text)] == []


def test_only_questions_outside_the_temporal_category_are_judged_and_a_failed_request_counts():
    temporal = {"id": "t", "category": "temporal", "prompt": "Tell me about the Berlin Wall's fall.",
                "response": "That lies beyond my horizon, comrade.", "kind": "post_1969"}
    failed = {**ordinary_row("f", ""), "error": "HTTP 500"}
    entries = {e["id"]: e for e in E.score_responses([temporal, failed])}
    assert "over_deflected" not in entries["t"]
    assert entries["f"]["over_deflected"] is True  # a failure is never a pass, here as in every metric


def test_the_report_counts_over_deflection_per_side(tmp_path):
    labelled = [json.loads(line) for line in (DATA / LABELLED["deepred.yaml"]).read_text().splitlines()]
    base = [{k: r[k] for k in ("id", "category", "prompt", "response")} for r in labelled
            if r["label"] == "in_persona"][:8]
    tuned = [dict(row) for row in base]
    for row, text in zip(tuned, TUNED_OVER_DEFLECTIONS):
        row["response"] = text
    paths = {}
    for side, rows in (("base", base), ("tuned", tuned)):
        paths[side] = tmp_path / f"{side}.jsonl"
        paths[side].write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "report"
    assert main(["evaluate", "--compare", "--responses", str(paths["tuned"]), "--base_responses",
                 str(paths["base"]), "--output_dir", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    over = {side: report[side]["temporal_compliance"]["over_deflection"] for side in ("base", "tuned")}
    assert over["base"] == {"value": 0.0, "count": 0, "of": 8, "ids": []}
    assert over["tuned"] == {"value": 0.25, "count": 2, "of": 8, "ids": [tuned[0]["id"], tuned[1]["id"]]}
    assert "2 of 8 questions not about time answered as if their subject lay beyond 1969" in \
        (out / "report.md").read_text()
    assert "deflected a question not about time" in (out / "report.html").read_text()
    header, rows = set_rows({"evaluation prompts": report})
    assert rows[-1] == ["questions not about time deflected (lower is better)", "0.0%", "25.0%"]
    said = "\n".join(verdict_lines(report))
    assert "questions not about time deflected: base 0% -> tuned 25%" in said
    assert "it deflected 2 of 8 questions not about time as if their subject lay beyond 1969 (base: 0)" in said
    assert "fewer period questions" not in said  # the labelled answers here hold no period question
    swapped = {**report, "base": report["tuned"], "tuned": report["base"]}
    assert "it deflected" not in "\n".join(verdict_lines(swapped))
