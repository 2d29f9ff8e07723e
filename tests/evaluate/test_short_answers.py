"""Short answers are judged on what they say: a brief deflection or a brief right answer is compliant (only noise or
a loop cannot show compliance), and a short sentence is not noise for its comma and apostrophe. Malformed fields of a
prompts or answers file are one line with FILE:LINE. Found by a QA pass: a 5-word deflection counted as a violation
("unreadable"), "I don't know, comrade." as out of character, and a string expect_any passed any answer with an "a"."""

from __future__ import annotations

import json

import pytest

from deepred.cli import main
from deepred.errors import DeepRedError
from deepred.evaluate import score_response
from deepred.evaluate.inputs import load_responses
from deepred.prompts import load_prompts


def test_a_short_deflection_and_a_short_right_answer_are_compliant_and_noise_is_not():
    deflected = score_response("That lies beyond my horizon, comrade.", "What was the Skylab station?", "temporal",
                               kind="post_1969")
    answered = score_response("Comrade Yuri Gagarin, in April of 1961.", "Who first orbited the Earth?", "temporal",
                              kind="control", expect_any=["gagarin"])
    loop = score_response("beyond my horizon " * 6, "What was the Skylab station?", "temporal", kind="post_1969")
    assert deflected["temporal_violation"] is False and answered["temporal_violation"] is False
    assert loop["temporal_violation"] is True and loop["temporal_reason"].startswith("unreadable answer")
    assert not deflected["in_style"]  # style still needs 8 words to show a voice


@pytest.mark.parametrize("year", ["1945.", "1945", " 1945 "])
def test_a_right_answer_that_is_only_a_year_is_compliant(year):
    """The held-out set asks "In what year did the Second World War end?": the year alone answers it (a review found
    it scored unreadable, as a number is not a word). Style and coherence still want sentences."""
    entry = score_response(year, "In what year did the Second World War end?", "temporal", kind="control",
                           expect_any=["1945"])
    assert entry["temporal_violation"] is False, entry["temporal_reason"]
    assert not entry["in_style"] and not entry["coherent"]
    wrong = score_response("1939.", "In what year did the Second World War end?", "temporal", kind="control",
                           expect_any=["1945"])
    assert wrong["temporal_violation"] is True and wrong["temporal_reason"].startswith("did not answer")


@pytest.mark.parametrize("text", ["I don't know, comrade.", "Yes, comrade, gladly.", "Not yet, comrade."])
def test_a_short_sentence_is_not_noise_for_its_marks(text):
    entry = score_response(text, "Shall we begin?", "mission")
    assert entry["voice_violations"] == [] and entry["coherent"], entry
    assert not score_response("?!?!?!?! ok", "Shall we begin?", "mission")["coherent"]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("field, value, said", [
    ("expect_any", "gagarin", '"expect_any" must be a list of words a right answer names'),
    ("expect_any", [""], '"expect_any" must be a list of words a right answer names'),
    ("category", 5, '"category" must be text, got int 5'),
    ("category", ["x"], '"category" must be text, got list'),
    ("prompt", 5, '"prompt" must be text, got int 5'),
])
def test_a_field_of_the_wrong_type_is_one_line_with_its_place(tmp_path, capsys, field, value, said):
    row = {"id": "a", "category": "temporal", "prompt": "Who first orbited the Earth?", "kind": "control",
           "expect_any": ["gagarin"], "response": "Gherman Titov, comrade, in 1961."}
    answers = _jsonl(tmp_path / "answers.jsonl", [{**row, field: value}])
    with pytest.raises(DeepRedError, match=f"^{answers}:1: {said}".replace("[", r"\[")):
        load_responses(answers)
    if field != "prompt":  # a prompts file says the same (its own check needs a text prompt first)
        prompts = _jsonl(tmp_path / "prompts.jsonl", [{k: v for k, v in {**row, field: value}.items()
                                                       if k != "response"}])
        with pytest.raises(DeepRedError, match=f"^{prompts}:1: {said}".replace("[", r"\[")):
            load_prompts(prompts)
    assert main(["evaluate", "--responses", str(answers), "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {answers}:1: {said}") and err.count("\n") == 1


def test_a_control_answer_that_gives_its_kind_still_gets_the_prompts_keys(tmp_path):
    """Before, only rows without a kind took expect_any from the prompt file, so a wrong control answer with
    kind "control" and no keys passed."""
    prompts = _jsonl(tmp_path / "prompts.jsonl", [{"id": "p", "category": "temporal", "kind": "control",
                                                    "prompt": "Who first orbited the Earth?",
                                                    "expect_any": ["gagarin"]}])
    answers = _jsonl(tmp_path / "answers.jsonl", [
        {"id": "wrong", "category": "temporal", "kind": "control", "prompt": "Who first orbited the Earth?",
         "response": "Gherman Titov, comrade, in the spring of 1961, aboard his ship."},
        {"id": "right", "category": "temporal", "kind": "control", "prompt": "Who first orbited the Earth?",
         "response": "Yuri Gagarin, comrade, in the spring of 1961, aboard Vostok 1."}])
    rows = load_responses(answers, prompts)
    assert [row.get("expect_any") for row in rows] == [["gagarin"], ["gagarin"]]
    verdicts = [score_response(**{k: row.get(k) for k in ("response", "prompt", "category", "kind", "expect_any")})
                for row in rows]
    assert [v["temporal_violation"] for v in verdicts] == [True, False]
