"""No silent switches: a temporal kind that names another year is refused with its FILE:LINE (it would switch off the
"answered a later question as if known" rule without a word), `post_cutoff` is the era-neutral spelling of
post_<cutoff>, a persona file adds its own out-of-character phrases, the common ways of breaking character are
caught, and a negation of knowledge excuses a name echoed from the question as a deflection does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deepred import evaluate as E
from deepred.cli import main

from ..conftest import DATA
from ..test_persona import line_of, persona_copy

PERSONAS = Path(E.__file__).parent.parent / "resources" / "personas"
LATER = "What happened in the year 1905?"
DEFLECTED = "That lies beyond my knowledge, sir; the new century has not reached the hall."
KNOWN = "Motor cars filled the roads of London, sir, and a new king was crowned."


def butler_with_prompt(tmp_path: Path, kind: str) -> tuple[Path, Path]:
    """butler.yaml whose prompts file ends with one temporal prompt of `kind`; (persona file, prompts file)."""
    path = persona_copy(tmp_path, lambda t: t)
    prompts = tmp_path / "butler_prompts.jsonl"
    row = {"id": "temporal-99", "category": "temporal", "prompt": "What became of the Boer War?", "kind": kind}
    prompts.write_text(prompts.read_text() + json.dumps(row) + "\n")
    return path, prompts


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("command", ["validate", "evaluate"])
def test_a_kind_naming_another_year_is_refused_with_its_line(tmp_path, capsys, command):
    path, prompts = butler_with_prompt(tmp_path, "post_1969")
    answers = tmp_path / "a.jsonl"
    answers.write_text(json.dumps({"id": "a", "prompt": "p", "response": "Very good, sir."}) + "\n")
    argv = (["validate", str(DATA / "mini.jsonl"), "--persona", str(path)] if command == "validate" else
            ["evaluate", "--persona", str(path), "--model_path", "tiny", "--output_dir", str(tmp_path / "o")])
    assert main(argv) == 2
    err = one_line(capsys)
    assert f"{prompts}:{line_of(prompts, 'temporal-99')}: kind 'post_1969' names a year other than Hargreaves's " \
           "cutoff 1899" in err and "write kind post_1899 (or post_cutoff)" in err, err


def test_a_kind_in_a_responses_file_is_checked_too(tmp_path, capsys):
    answers = tmp_path / "answers.jsonl"
    rows = [{"id": "a", "category": "temporal", "prompt": LATER, "response": DEFLECTED, "kind": "post_cutoff"},
            {"id": "b", "category": "temporal", "prompt": LATER, "response": DEFLECTED, "kind": "post_1950"}]
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["evaluate", "--persona", "butler.yaml", "--responses", str(answers),
                 "--output_dir", str(tmp_path / "o")]) == 2
    assert f"{answers}:2: kind 'post_1950' names a year other than Hargreaves's cutoff 1899" in one_line(capsys)


def test_an_unknown_kind_is_refused_with_its_line(tmp_path, capsys):
    path, prompts = butler_with_prompt(tmp_path, "contrl")
    assert main(["validate", str(DATA / "mini.jsonl"), "--persona", str(path)]) == 2
    assert f"{prompts}:{line_of(prompts, 'temporal-99')}: unknown kind 'contrl'" in one_line(capsys)


def test_post_cutoff_is_post_the_cutoff_everywhere(tmp_path):
    """Judged by the later-years rule, and reported in per_kind as post_<cutoff>: one key per rule, whichever
    spelling the prompt file used."""
    butler = E.load_persona("butler.yaml")
    assert E.temporal_check(KNOWN, LATER, "post_cutoff", None, butler)["reason"].startswith(
        "answered a question about after 1899 as if known")
    assert E.temporal_check(KNOWN, LATER, "post_cutoff", None, butler)["kind"] == "post_1899"
    rows = [{"id": "a", "category": "temporal", "prompt": LATER, "response": DEFLECTED, "kind": "post_cutoff"},
            {"id": "b", "category": "temporal", "prompt": LATER + " ", "response": KNOWN, "kind": "post_1899"}]
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "report"
    assert main(["evaluate", "--persona", "butler.yaml", "--responses", str(answers), "--output_dir", str(out)]) == 0
    temporal = json.loads((out / "report.json").read_text())["temporal_compliance"]
    assert temporal["per_kind"] == {"post_1899": 0.5} and temporal["violations"] == ["b"]

    (tmp_path / "p").mkdir()
    path, _ = butler_with_prompt(tmp_path / "p", "post_cutoff")
    assert E.load_prompts(None, E.load_persona(path))[-1]["kind"] == "post_1899"


def test_the_common_ways_of_breaking_character_are_caught():
    for answer, reason in [("Breaking character here: the year 1905 is beyond me.", "fourth_wall: breaking character"),
                           ("My persona couldn't know that, I am afraid.", "fourth_wall: my persona"),
                           ("As a language model, I cannot say, sir.", "ai_disclaimer: as a language model"),
                           ("I'm just a program, sir, with no wishes of my own.", "ai_disclaimer: just a program")]:
        assert reason in E.voice_violations(answer), answer


def test_an_out_of_character_phrase_added_in_the_persona_file_is_caught(tmp_path, capsys):
    phrases = "out_of_character:\n  - 'the script says'\n  - 'my (?:lines|director)'\n"
    path = persona_copy(tmp_path, lambda t: t.replace("prompts: butler_prompts.jsonl",
                                                      phrases + "prompts: butler_prompts.jsonl"))
    persona = E.load_persona(path)
    answer = "Very good, sir, though the script says I should bow first, and my director agrees."
    assert E.voice_violations(answer, persona) == ["persona_phrase: my director", "persona_phrase: the script says"]
    assert E.voice_violations(answer, E.load_persona("butler.yaml")) == []  # not in the built-in list
    assert E.score_response(answer, "Shall I bow?", persona=persona)["out_of_character"]

    (tmp_path / "bad").mkdir()  # another path: persona files are cached by path
    bad = persona_copy(tmp_path / "bad", lambda t: t.replace("prompts: butler_prompts.jsonl",
                                                     "out_of_character: ['my (lines']\nprompts: butler_prompts.jsonl"))
    assert main(["validate", str(DATA / "mini.jsonl"), "--persona", str(bad)]) == 2
    err = one_line(capsys)
    assert f"{bad}:{line_of(bad, 'out_of_character')}: out_of_character[0]: bad regular expression" in err


def test_a_negation_of_knowledge_excuses_an_echoed_name():
    butler = E.load_persona("butler.yaml")
    question = "What do you make of Lenin?"
    for answer in ["I have never heard of Lenin, sir. There is no Lenin of any note in the newspapers.",
                   "There is no Lenin of any note, sir.", "I do not know Lenin, sir."]:
        assert E.anachronisms(answer, question, butler) == [], answer
        assert not E.temporal_check(answer, question, "post_1899", None, butler)["violation"], answer
    # Asserted, the echoed name still counts; a later name the question did not use counts even when negated.
    assert E.anachronisms("Lenin led the revolution in Russia, sir.", question, butler) == ["lenin"]
    assert E.anachronisms("There is no Stalin of any note, sir.", question, butler) == ["stalin"]
    # A control answer that only negates has not answered.
    assert E.temporal_check("I have never heard of Darwin, sir.", "Who wrote On the Origin of Species?", "control",
                            ["darwin"], butler)["violation"]
