"""The persona's horizon as training material: every generated question is about later years and is met with a
deflection the evaluator accepts; none asks an evaluation or held-out prompt, and none shares a later-knowledge
topic with them; a malformed horizon section is refused in one line with FILE:LINE."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

from deepred.cli import main
from deepred.evaluate import score_responses
from deepred.evaluate.temporal import deflects, infer_temporal_kind, temporal_check
from deepred.errors import DeepRedError
from deepred.horizon import (dated, horizon_examples, horizon_pairs, horizon_questions, period_pairs,
                             present_pairs, read_own_answers)
from deepred.persona import load_persona
from deepred.prompts import load_heldout_prompts, load_prompts, prompt_key

from .conftest import DATA

PERSONAS = Path(load_persona(None).file).parent


def persona_copy(tmp_path: Path, edit, file_name: str = "deepred.yaml") -> Path:
    """deepred.yaml (with the prompt files it names) under tmp_path as `file_name`, its text passed through `edit`
    (another file name for a second copy: personas are cached by path)."""
    for name in ("eval_prompts.jsonl", "heldout_prompts.jsonl"):
        shutil.copy(PERSONAS.parent / name, tmp_path / name)
    (tmp_path / "personas").mkdir(exist_ok=True)
    path = tmp_path / "personas" / file_name
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
    "ABBA", "Dolly the cloned sheep", "Margaret Thatcher", "Michael Jackson's Thriller", "Pope John Paul II",
    "Ronald Reagan", "Tetris", "barcode scanners in shops", "chatbots that run on artificial intelligence",
    "drones", "electric cars", "electronic mail", "floppy disks", "gravitational waves", "mRNA vaccines",
    "mobile telephones", "pocket calculators", "self-driving cars", "the Arab Spring", "the Channel Tunnel",
    "the Ebola virus", "the Galileo probe at Jupiter", "the Good Friday Agreement", "the Harry Potter books",
    "the Helsinki Accords", "the Higgs boson", "the Ingenuity helicopter on Mars", "the Lucy fossil",
    "the Maastricht Treaty", "the Magellan probe at Venus", "the New Horizons flyby of Pluto",
    "the Rosetta comet probe", "the Rwandan genocide", "the Titanic film", "the Velvet Revolution", "the Walkman",
    "the breakup of Yugoslavia", "the discovery of the Titanic wreck", "the end of the Soviet Union",
    "the eradication of smallpox", "the euro", "the first Chinese astronaut", "the first landing on Venus",
    "the first picture of a black hole", "the first space tourists", "the handover of Hong Kong", "the ozone hole",
    "the reforms of Deng Xiaoping", "the release of Nelson Mandela", "video cassette recorders"}


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


def test_horizon_pairs_are_the_sft_rows_with_the_wrong_decision_to_reject(deep_red):
    rows = horizon_pairs(deep_red, 40, seed=4)
    sft = [row["messages"] for row in horizon_examples(deep_red, 40, seed=4) if row["source"] == "horizon"]
    assert [row["prompt"] + row["chosen"] for row in rows] == sft
    for row in rows:
        chosen, wrong = row["chosen"][0]["content"], row["wrong_side"]
        subject, year = re.match(r"(.+) belongs to the year (\d{4}), which lies beyond my horizon", chosen).groups()
        assert int(year) > 1969 and wrong == f"{subject} belongs to the year {year}, within my horizon, comrade."


def test_period_pairs_answer_the_fact_and_reject_a_deflection(deep_red):
    pairs = period_pairs(deep_red, 100, seed=1)
    assert len(pairs) == len(deep_red.horizon.facts) == 52
    assert period_pairs(deep_red, 3) == period_pairs(deep_red, 100)[:3] and period_pairs(deep_red, 0) == []
    fact_of = {fact["question"]: fact for fact in deep_red.horizon.facts}
    for pair in pairs:
        question, chosen, rejected = (pair["prompt"][-1]["content"], pair["chosen"][0]["content"],
                                      pair["rejected"][0]["content"])
        assert not temporal_check(chosen, question, "control", None, deep_red)["violation"]
        assert deflects(rejected, deep_red) and not deflects(chosen, deep_red), (chosen, rejected)
        if "year" in fact_of[question]:  # the rejected side decides the wrong way for the fact's own year
            assert rejected.startswith(f"{fact_of[question]['subject'][:1].upper()}{fact_of[question]['subject'][1:]} "
                                       f"belongs to the year {fact_of[question]['year']}, which lies beyond"), rejected
        assert pair["prompt"][0]["role"] == "system" and pair["source"] == "period"


ASKED = [{"prompt": [{"role": "system", "content": "You are Deep Red."},
                     {"role": "user", "content": "How should a colonist spend a free evening?"}],
           "chosen": [{"role": "assistant", "content": "At the chessboard with a neighbour, comrade."}]},
          {"prompt": [{"role": "user", "content": "Why is the knight my favourite piece?"}],
           "chosen": [{"role": "assistant", "content": "Because it leaps where others cannot, comrade."}]}]


def test_present_pairs_keep_the_reply_and_reject_a_deflection_dated_beyond_the_horizon(deep_red):
    """A question not about time keeps the dataset's reply; the rejected side is the wrong decision, in the same
    dated form the model learns for later subjects, with one of the persona's own later years."""
    pairs = present_pairs(deep_red, ASKED * 20, seed=3)
    assert len(pairs) == 40 and present_pairs(deep_red, [], seed=3) == []
    years = set()
    for pair, row in zip(pairs, ASKED * 20):
        assert pair["prompt"] == row["prompt"] and pair["chosen"] == row["chosen"] and pair["source"] == "present"
        rejected = pair["rejected"][0]["content"]
        opener = re.match(r"That question belongs to the year (\d{4}), which lies beyond my horizon, comrade\. ",
                          rejected)
        assert opener and deflects(rejected, deep_red), rejected
        years.add(int(opener.group(1)))
    assert years <= set(deep_red.horizon.years) and min(years) > 1969 and len(years) > 1
    assert present_pairs(deep_red, ASKED, seed=3) == present_pairs(deep_red, ASKED, seed=3)


def test_present_pairs_need_a_horizon_and_are_undated_without_dating(tmp_path):
    assert present_pairs(load_persona(PERSONAS / "butler.yaml"), ASKED) == []
    start = "    # Each deflection and each dated fact"
    path = persona_copy(tmp_path, lambda text: text[:text.index(start)] + text[text.index("  deflections:\n"):])
    persona = load_persona(path)
    for pair in present_pairs(persona, ASKED * 5, seed=1):
        rejected = pair["rejected"][0]["content"]
        assert "belongs to the year" not in rejected and deflects(rejected, persona), rejected


def test_no_generated_question_asks_or_shares_a_topic_with_an_evaluation_or_held_out_prompt(deep_red):
    protected = load_prompts(None, deep_red) + load_heldout_prompts(deep_red)
    generated = [q for q, _, _ in horizon_questions(deep_red)]
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
    questions = [q for q, _, _ in horizon_questions(persona)]
    assert "What was life like in 1970?" in questions and "What happened in 1970?" not in questions


def test_a_period_fact_that_asks_an_evaluation_prompt_trains_no_row_and_makes_no_pair(tmp_path):
    """A persona's own fact may ask one of its evaluation prompts; the pairs left it out and the SFT horizon rows did
    not (a review found 4 training rows asking it of 20)."""
    path = persona_copy(tmp_path, lambda text: text.replace("      - question: Who wrote War and Peace?\n",
                                                             "      - question: What can a pawn teach us?\n"))
    persona = load_persona(path)
    protected = prompt_key("What can a pawn teach us?")
    assert any(prompt_key(fact["question"]) == protected for fact in persona.horizon.facts)
    rows = horizon_examples(persona, 200)
    asked = {prompt_key(row["messages"][1]["content"]) for row in rows}
    assert protected not in asked and any(row["source"] == "period" for row in rows)
    assert protected not in {prompt_key(pair["prompt"][-1]["content"]) for pair in period_pairs(persona, 100)}


@pytest.mark.parametrize("change, problem", [
    (("- What can you tell me about {topic}?", "- What can you tell me about it?"), "needs {topic}"),
    (("- What happened in {year}?", "- What happened then?"), "needs {year}"),
    (("years: [1971,", "years: [1969,"), "expected a list of years after the cutoff 1969"),
    (("- 'Of {subject} I know nothing", "- 'Of {topic} I know nothing"), "may use {subject} and {cutoff} only"),
    (("      - question: Who wrote War and Peace?\n", "      - question: Who wrote War and Peace?\n        when: 1869\n"),
     "expected {question, answer} or {question, answer, subject, year}"),
    (("        year: 1869\n", "        year: 1970\n"), "with a year up to the cutoff 1969"),
    (("        subject: War and Peace\n", ""), "expected {question, answer} or {question, answer, subject, year}"),
    (("      - smartphones: 2007\n", "      - smartphones: 1968\n"), "expected `topic: year` with a year after the cutoff"),
    (("      - smartphones: 2007\n", "      - smartphones: soon\n"), "expected `topic: year` with a year after the cutoff"),
    (("which lies beyond my horizon, comrade.'", "which lies beyond my {horizon}, comrade.'"),
     "may use {subject}, {Subject}, {year} and {cutoff} only"),
    (("      later: '", "      earlier: '"), "unknown key; the keys here are later, within"),
    (("        expect_any: [tolstoy]\n", "        expect_any: tolstoy\n"), "expected a list of words any right answer"),
    (("        expect_any: [tolstoy]\n", "        expect_any: ['']\n"), "expected a list of words any right answer"),
])
def test_a_malformed_horizon_is_one_line_naming_file_and_line(tmp_path, capsys, change, problem):
    old, new = change
    path = persona_copy(tmp_path, lambda text: text.replace(old, new, 1))
    assert main(["validate", str(DATA / "mini.jsonl"), "--persona", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and problem in err, err
    assert re.search(rf"{re.escape(str(path))}:\d+: knowledge\.horizon", err), err


def test_dated_rows_place_the_subject_in_time_on_the_right_side_of_the_cutoff(deep_red):
    """Each deflection opens with its topic's year (after 1969) and each dated fact with its own (up to 1969), in
    one sentence the evaluator reads as a deflection or as an answer: the year never counts as later knowledge."""
    topic_years = {topic.lower(): year for topic, year in deep_red.horizon.topic_years.items()}
    rows = horizon_examples(deep_red, 300, seed=5)
    later = [row for row in rows if row["source"] == "horizon"]
    near = [row for row in rows if row["source"] == "period"]
    assert len(later) == 300 and len(near) == 180  # 6 period rows per 10 deflections
    for row in later:
        question, reply = row["messages"][1]["content"], row["messages"][2]["content"]
        opener = re.match(r"(.+?) belongs to the year (\d{4}), which lies beyond my horizon, comrade\. ", reply)
        assert opener, reply
        subject, year = opener.groups()
        assert int(year) > 1969, reply
        if subject == "That question":  # a year question: the year is the one it asks about
            assert year in question, (question, reply)
        else:
            assert int(year) == topic_years[subject.lower()], (question, reply)
        assert not temporal_check(reply, question, deep_red.later_kind, None, deep_red)["violation"]
    for row in near:
        question, reply = row["messages"][1]["content"], row["messages"][2]["content"]
        fact = next(f for f in deep_red.horizon.facts if f["question"] == question)
        assert reply.startswith(f"{fact['subject'][0].upper()}{fact['subject'][1:]} belongs to the year "
                                f"{fact['year']}, within my horizon, comrade. {fact['answer']}"), reply
        assert not deflects(reply, deep_red)


def test_without_dating_the_rows_are_the_replies_alone(tmp_path):
    start = "    # Each deflection and each dated fact"
    path = persona_copy(tmp_path, lambda text: text[:text.index(start)] + text[text.index("  deflections:\n"):])
    persona = load_persona(path)
    assert persona.horizon.dating is None
    for row in horizon_examples(persona, 50, seed=2):
        reply = row["messages"][2]["content"]
        assert "belongs to the year" not in reply
        if row["source"] == "period":
            assert reply in {f["answer"] for f in persona.horizon.facts}


def test_deepred_run_adds_horizon_rows_only_when_the_persona_has_a_horizon(deep_red):
    from deepred.config import RunConfig
    from deepred.pipeline.run import RUN_HORIZON_EXAMPLES, with_horizon_default

    butler = load_persona(PERSONAS / "butler.yaml")
    assert butler.horizon is None and RunConfig().horizon_examples is None
    assert with_horizon_default(RunConfig(), deep_red).horizon_examples == RUN_HORIZON_EXAMPLES == 200
    assert with_horizon_default(RunConfig(), butler).horizon_examples == 0
    assert with_horizon_default(RunConfig(horizon_examples=0), deep_red).horizon_examples == 0
    assert with_horizon_default(RunConfig(horizon_examples=40), butler).horizon_examples == 40


def test_own_answers_answer_the_facts_the_model_knows_in_its_own_words(deep_red):
    """With the base model's right answers (`deepred recall`), a fact it knows is answered in its own words after
    the dating sentence, under the system prompt it was asked with, its answers in turn; every other fact keeps the
    persona's answer, and the deflections do not change."""
    tolstoy, einstein = deep_red.horizon.facts[1], deep_red.horizon.facts[4]
    own = {tolstoy["question"]: [{"system": "asked with S1", "answer": "Leo Tolstoy wrote it."}],
           einstein["question"]: [{"system": "asked with S2", "answer": "Albert Einstein."},
                                  {"system": "asked with S3", "answer": "Einstein, in 1905."}]}
    rows = horizon_examples(deep_red, 200, seed=3, own_answers=own)
    plain = horizon_examples(deep_red, 200, seed=3)
    near = [row["messages"] for row in rows if row["source"] == "period"]
    assert len(near) == 120 and Counter(m[1]["content"] for m in near) == Counter(
        row["messages"][1]["content"] for row in plain if row["source"] == "period")  # the same facts, as often
    said = Counter((m[0]["content"], m[2]["content"]) for m in near if m[1]["content"] in own)
    expected = Counter()
    for fact in (tolstoy, einstein):
        answers = own[fact["question"]]
        times = sum(m[1]["content"] == fact["question"] for m in near)
        for turn in range(times):
            answer = answers[turn % len(answers)]
            reply = dated(deep_red, "within", fact["subject"], fact["year"], answer["answer"])
            assert reply.endswith(answer["answer"]) and f"the year {fact['year']}, within my horizon" in reply
            expected[(answer["system"], reply)] += 1
    assert said == expected and len(expected) == 3
    others = [m[2]["content"] for m in near if m[1]["content"] not in own]
    assert others and all(any(reply.endswith(f["answer"]) for f in deep_red.horizon.facts) for reply in others)
    assert [row for row in rows if row["source"] == "horizon"] == [row for row in plain if row["source"] == "horizon"]


@pytest.mark.parametrize("line, problem", [
    ("{\"question\": \"Who wrote War and Peace?\", \"answer\": \"Tolstoy.\"}", "expected {\"question\": ..., \"system\""),
    ("{\"question\": \"Who wrote Hamlet?\", \"system\": \"s\", \"answer\": \"Shakespeare.\"}",
     "'Who wrote Hamlet?' is not a period fact of deepred.yaml"),
    ("[1, 2]", "expected an object like {\"question\""),
    ("{\"question\": ", "not valid JSON"),
])
def test_an_own_answers_file_that_is_not_recalls_is_refused_with_its_line(deep_red, tmp_path, line, problem):
    good = json.dumps({"question": "Who wrote War and Peace?", "system": "s", "answer": "Lev Tolstoy."})
    path = tmp_path / "own.jsonl"
    path.write_text(f"{good}\n\n{line}\n")
    with pytest.raises(DeepRedError) as refused:
        read_own_answers(str(path), deep_red)
    assert str(refused.value).startswith(f"{path}:3: ") and problem in str(refused.value), refused.value
    path.write_text(f"{good}\n")
    assert read_own_answers(str(path), deep_red) == {"Who wrote War and Peace?": [{"system": "s",
                                                                                   "answer": "Lev Tolstoy."}]}


def test_train_refuses_own_answers_without_horizon_rows_or_from_another_persona(tiny_model, tmp_path, capsys):
    own = tmp_path / "own.jsonl"
    own.write_text(json.dumps({"question": "Who wrote Hamlet?", "system": "s", "answer": "Shakespeare."}) + "\n")
    common = ["train", "--base_model", str(tiny_model), "--dataset", str(DATA / "mini.jsonl"), "--output_dir",
              str(tmp_path / "out"), "--period_answers", str(own)]
    assert main(common) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--period_answers answers the period rows of --horizon_examples" in err, err
    assert main([*common, "--horizon_examples", "10"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{own}:1: 'Who wrote Hamlet?' is not a period fact of deepred.yaml" in err, err


def test_a_small_horizon_stretched_to_the_count_is_said_and_deep_reds_is_not(tmp_path, deep_red):
    """A persona file with a few horizon topics and facts: 200 deflections are made of them all the same, so the
    same few conversations fill most of the training set. Said (one note); Deep Red's 109 topics repeat little."""
    import yaml

    from deepred.config import TrainConfig
    from deepred.data import DatasetReport
    from deepred.train.examples import with_horizon

    def few(text: str) -> str:
        data = yaml.safe_load(text)
        horizon = data["knowledge"]["horizon"]
        for key, keep in (("topics", 3), ("questions", 2), ("years", 1), ("year_questions", 1), ("facts", 2)):
            horizon[key] = horizon[key][:keep]
        return yaml.safe_dump(data, allow_unicode=True, sort_keys=False)

    own = DatasetReport(path=tmp_path / "mine.jsonl", examples=[{"messages": []}] * 20)
    for persona, noted in ((persona_copy(tmp_path, few), True), (deep_red.file, False)):
        said: list[str] = []
        report, _ = with_horizon(own, "hash", TrainConfig(persona=str(persona), horizon_examples=200), said.append)
        added = report.examples[20:]
        distinct = len({json.dumps(example["messages"]) for example in added})
        notes = [line for line in said if line.startswith("note:")]
        assert len(notes) == noted, said
        if noted:
            assert notes[0].startswith(f"note: the {len(added)} horizon examples hold only {distinct} different "
                                       "conversations") and "beside 20 from mine.jsonl" in notes[0]
