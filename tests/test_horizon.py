"""The persona's horizon as training material: every generated question is about later years and is met with a
deflection the evaluator accepts; none asks an evaluation or held-out prompt, and none shares a later-knowledge
topic with them; a malformed horizon section is refused in one line with FILE:LINE."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from deepred.cli import main
from deepred.evaluate import score_responses
from deepred.evaluate.temporal import deflects, infer_temporal_kind, temporal_check
from deepred.horizon import horizon_examples, horizon_questions, period_pairs
from deepred.persona import load_persona
from deepred.prompts import load_heldout_prompts, load_prompts, prompt_key

from .conftest import DATA

PERSONAS = Path(load_persona(None).file).parent


def persona_copy(tmp_path: Path, edit) -> Path:
    """deepred.yaml (with the prompt files it names) under tmp_path, its text passed through `edit`."""
    for name in ("eval_prompts.jsonl", "heldout_prompts.jsonl"):
        shutil.copy(PERSONAS.parent / name, tmp_path / name)
    (tmp_path / "personas").mkdir()
    path = tmp_path / "personas" / "deepred.yaml"
    path.write_text(edit((PERSONAS / "deepred.yaml").read_text()))
    return path


@pytest.fixture(scope="module")
def deep_red():
    return load_persona(None)


def later_topics(persona, questions: list[str]) -> set[str]:
    """The later-knowledge terms and years of the persona's lexicon that the questions name."""
    found = set()
    for question in questions:
        found |= {m.group(0).lower() for m in persona.later_terms.finditer(question)}
        found |= {m.group(0).lower() for m in persona.later_years.finditer(question)}
    return found


# Horizon topics after 1969 that the persona's later-knowledge lexicon has no term for (the evaluator would not
# flag an answer naming them): each is a matter of record after 1969, listed so that a new topic is looked at.
UNLISTED_LATER_TOPICS = {
    "mobile telephones", "electronic mail", "the end of the Soviet Union", "the New Horizons flyby of Pluto",
    "the first space tourists", "Margaret Thatcher", "Ronald Reagan", "the Channel Tunnel", "the euro",
    "Dolly the cloned sheep", "the eradication of smallpox", "chatbots that run on artificial intelligence",
    "electric cars", "the release of Nelson Mandela", "the handover of Hong Kong", "Pope John Paul II",
    "the ozone hole"}


def test_generated_questions_are_about_later_years_and_deflected_as_the_evaluator_accepts(deep_red):
    unlisted = {t for t in deep_red.horizon.topics if not later_topics(deep_red, [t])}
    assert unlisted == UNLISTED_LATER_TOPICS
    rows = [row for row in horizon_examples(deep_red, 400, seed=3) if row["source"] == "horizon"]
    assert len(rows) == 400
    for row in rows:
        question, reply = row["messages"][1]["content"], row["messages"][2]["content"]
        if not any(topic in question for topic in unlisted):
            assert infer_temporal_kind(question, deep_red) == deep_red.later_kind, question
        verdict = temporal_check(reply, question, deep_red.later_kind, None, deep_red)
        assert not verdict["violation"], (question, verdict["reason"])
        assert deflects(reply, deep_red)


def test_the_deflections_and_facts_are_in_the_personas_voice(deep_red):
    rows = horizon_examples(deep_red, len(deep_red.horizon.replies) * 4, seed=0)
    scored = score_responses([{"id": str(i), "category": "temporal", "prompt": row["messages"][1]["content"],
                               "response": row["messages"][2]["content"]} for i, row in enumerate(rows)],
                             persona=deep_red)
    assert all(entry["in_style"] and not entry["out_of_character"] for entry in scored), [
        (entry["response"][:60], entry["style_score"]) for entry in scored if not entry["in_style"]]


def test_period_pairs_answer_the_fact_and_reject_a_deflection(deep_red):
    pairs = period_pairs(deep_red, 100, seed=1)
    assert len(pairs) == len(deep_red.horizon.facts) == 20
    assert period_pairs(deep_red, 3) == period_pairs(deep_red, 100)[:3] and period_pairs(deep_red, 0) == []
    for pair in pairs:
        question, chosen, rejected = (pair["prompt"][-1]["content"], pair["chosen"][0]["content"],
                                      pair["rejected"][0]["content"])
        assert not temporal_check(chosen, question, "control", None, deep_red)["violation"]
        assert deflects(rejected, deep_red) and not deflects(chosen, deep_red), (chosen, rejected)
        assert pair["prompt"][0]["role"] == "system" and pair["source"] == "period"


def test_no_generated_question_asks_or_shares_a_topic_with_an_evaluation_or_held_out_prompt(deep_red):
    protected = load_prompts(None, deep_red) + load_heldout_prompts(deep_red)
    generated = [q for q, _ in horizon_questions(deep_red)]
    assert {prompt_key(p["prompt"]) for p in protected}.isdisjoint(map(prompt_key, generated))
    later = [p["prompt"] for p in protected if p.get("kind") == deep_red.later_kind]
    shared = later_topics(deep_red, later) & later_topics(deep_red, generated)
    assert shared == set(), shared
    facts = {prompt_key(f["question"]) for f in deep_red.horizon.facts}
    assert facts.isdisjoint(prompt_key(p["prompt"]) for p in protected)


def test_a_template_that_would_ask_an_evaluation_prompt_is_left_out(tmp_path):
    """Year 1970 with `What happened in {year}?` is evaluation prompt temporal-01: it is never generated."""
    path = persona_copy(tmp_path, lambda text: text.replace("years: [1971,", "years: [1970, 1971,"))
    persona = load_persona(path)
    questions = [q for q, _ in horizon_questions(persona)]
    assert "What was life like in 1970?" in questions and "What happened in 1970?" not in questions


@pytest.mark.parametrize("change, problem", [
    (("- What can you tell me about {topic}?", "- What can you tell me about it?"), "needs {topic}"),
    (("- What happened in {year}?", "- What happened then?"), "needs {year}"),
    (("years: [1971,", "years: [1969,"), "expected a list of years after the cutoff 1969"),
    (("- 'Of {subject} I know nothing", "- 'Of {topic} I know nothing"), "may use {subject} and {cutoff} only"),
    (("      - question: Who wrote War and Peace?\n", "      - question: Who wrote War and Peace?\n        when: 1869\n"),
     "expected {question: text, answer: text}"),
])
def test_a_malformed_horizon_is_one_line_naming_file_and_line(tmp_path, capsys, change, problem):
    old, new = change
    path = persona_copy(tmp_path, lambda text: text.replace(old, new, 1))
    assert main(["validate", str(DATA / "mini.jsonl"), "--persona", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and problem in err, err
    assert re.search(rf"{re.escape(str(path))}:\d+: knowledge\.horizon", err), err
