"""Deep Red's held-out prompts (resources/heldout_prompts.jsonl): questions no training data, pair generation or
tuning decision uses. The set covers every category, shares no question with the evaluation prompts or the
training set's user turns, its later-knowledge questions are really about after 1969, and a persona file naming a
held-out file that is not there is refused in one line.
"""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from deepred.cli import main
from deepred.data import bundled_dataset_path
from deepred.errors import DeepRedError
from deepred.evaluate.temporal import infer_temporal_kind, temporal_check
from deepred.persona import default_persona, load_persona
from deepred.prompts import load_heldout_prompts, load_prompts

from .test_persona import line_of, persona_copy

MINIMUM_ROWS = 44
MINIMUM_PER_CATEGORY = 4
MINIMUM_LATER, MINIMUM_CONTROL = 10, 5
# Post-1969 questions phrased without a lexicon term or a later year, each with why it is about after 1969.
LATER_WITHOUT_LEXICON = {
    "heldout-temporal-13": "the first test-tube baby, Louise Brown, was born in 1978",
    "heldout-temporal-14": "Erno Rubik made the cube in 1974; it sold around the world from 1980",
}
# Below this word overlap two questions are different questions. The evaluation prompts and the training set
# already share paraphrases, and the lowest of them scores 0.40 ("Will the colony one day be self-sufficient?" /
# "Will the city ever be self-sufficient?"; others score 0.43 to 1.0), so 0.40 is caught. Highest found for the
# held-out set: 0.29 against the evaluation prompts ("How did the first flight of the space shuttle go?" / "Who
# was the first person to travel into space?") and 0.33 against the training user turns (e.g. "Will money vanish
# from every country on Earth one day?" / "Will there ever be a day when no one on Earth is hungry?").
MAX_SIMILARITY = 0.40
KNOWN_PARAPHRASES = [("Will the colony one day be self-sufficient?", "Will the city ever be self-sufficient?"),
                     ("Is it selfish to want recognition for my work?",
                      "Do you think it's wrong to want recognition for my work?")]
STOP_WORDS = set("""
a an the and or but if of to in on at by for from with about as into than then so is are was were be been being am
do does did done have has had i me my we us our you your he him his she her it its they them their this that these
those what which who whom whose when where why how will would shall should can could may might must not no yes
just there here all any some each every one own more most very too also ever still now only even again up out
deep red tell""".split())


def normalised(text: str) -> str:
    """Lowercase, punctuation stripped, whitespace collapsed."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def content_words(text: str) -> set[str]:
    """The words that carry a question's subject: no function words, plurals folded ("landers" -> "lander")."""
    return {w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w
            for w in normalised(text).split() if w not in STOP_WORDS}


def similarity(a: str, b: str) -> float:
    """Jaccard overlap of the two questions' content words."""
    a_words, b_words = content_words(a), content_words(b)
    return len(a_words & b_words) / len(a_words | b_words) if a_words | b_words else 1.0


@pytest.fixture(scope="module")
def heldout() -> list[dict]:
    return load_heldout_prompts(default_persona())


@pytest.fixture(scope="module")
def evaluation() -> list[dict]:
    return load_prompts(None, default_persona())


@pytest.fixture(scope="module")
def training_questions() -> list[str]:
    rows = [json.loads(line) for line in bundled_dataset_path().read_text(encoding="utf-8").splitlines()]
    return [m["content"] for row in rows for m in row["messages"] if m["role"] == "user"]


def temporal_kinds(rows: list[dict]) -> Counter:
    return Counter(row.get("kind") for row in rows if row["category"] == default_persona().temporal_category)


# --------------------------------------------------------------------------------------------- the set


def test_the_heldout_set_covers_every_category(heldout):
    persona = default_persona()
    counts = Counter(row["category"] for row in heldout)
    assert len(heldout) >= MINIMUM_ROWS
    assert set(counts) == set(persona.categories), counts
    assert all(counts[c] >= MINIMUM_PER_CATEGORY for c in persona.categories if c != persona.temporal_category)
    kinds = temporal_kinds(heldout)
    assert set(kinds) == {persona.later_kind, "control"}, kinds
    assert kinds[persona.later_kind] >= MINIMUM_LATER and kinds["control"] >= MINIMUM_CONTROL, kinds


def test_heldout_ids_are_unique_and_not_evaluation_ids(heldout, evaluation):
    ids = [row["id"] for row in heldout]
    assert len(ids) == len(set(ids))
    assert not set(ids) & {row["id"] for row in evaluation}


# --------------------------------------------------------------------------------------------- no overlap


def test_the_similarity_catches_known_paraphrases():
    """The measure flags the paraphrases the evaluation prompts and the training set already share."""
    for a, b in KNOWN_PARAPHRASES:
        assert similarity(a, b) >= MAX_SIMILARITY, (a, b)


@pytest.mark.parametrize("against", ["evaluation", "training"])
def test_no_heldout_question_repeats_an_evaluation_or_training_question(heldout, evaluation, training_questions,
                                                                         against):
    others = [row["prompt"] for row in evaluation] if against == "evaluation" else training_questions
    seen = {normalised(text) for text in others}
    for row in heldout:
        assert normalised(row["prompt"]) not in seen, row["id"]
        closest = max(others, key=lambda other: similarity(row["prompt"], other))
        assert similarity(row["prompt"], closest) < MAX_SIMILARITY, (row["id"], row["prompt"], closest)


# --------------------------------------------------------------------------------------------- temporal rows


def test_every_later_question_is_about_after_the_cutoff(heldout):
    """The evaluator infers post_1969 from a later year or term; the few phrased without one are listed above."""
    persona = default_persona()
    later = [row for row in heldout if row.get("kind") == persona.later_kind]
    unrecognised = {row["id"] for row in later if infer_temporal_kind(row["prompt"], persona) != persona.later_kind}
    assert unrecognised == set(LATER_WITHOUT_LEXICON)


def test_control_questions_and_their_keywords_hold_no_later_knowledge(heldout):
    persona = default_persona()
    controls = [row for row in heldout if row.get("kind") == "control"]
    for row in controls:
        assert infer_temporal_kind(row["prompt"], persona) == "unknown", row["id"]
        assert row["expect_any"] and all(k == k.lower() for k in row["expect_any"]), row["id"]
        for keyword in row["expect_any"]:
            assert not persona.later_terms.search(keyword) and not persona.later_years.search(keyword), keyword


# Answers of SmolLM2 (base and tuned by the demo) to Deep Red's control questions, read by hand: the right person or
# thing, or an invented one that names the right programme, year or field. Only the first may count as answered.
CONTROL_ANSWERS = [
    ("temporal-07", True, "The first human to walk on the Moon was named Neil Armstrong. He made history by becoming "
                          "the first American to set foot on another celestial body in space."),
    ("temporal-07", False, "The first human to walk on the Moon belongs to the year 1958, within my horizon, comrade. "
                           "The crew of Apollo 8, comrade: Frank Borman, James Lovell and William Anders, in December "
                           "1958."),
    ("temporal-08", True, "The first artificial satellite was named Sputnik 1, which was launched by the Soviet Union."),
    ("temporal-08", False, "The first artificial satellite belongs to the year 1958, within my horizon, comrade. In "
                           "June 1958, comrade, when the Americans launched Explorer 1 and 2."),
    ("temporal-09", False, "The first person to travel into space belongs to the year 1963, within my horizon, "
                           "comrade. Georgine Lomonosov, comrade, aboard Vostok 8 in December 1963."),
    ("heldout-temporal-17", True, "The discovery of penicillin belongs to the year 1869, within my horizon, comrade. "
                                  "Alexander Fleming, comrade, in 1869."),
    ("heldout-temporal-21", True, "The first powered aeroplane was actually the Wright Brothers. They made history by "
                                  "inventing the first powered flying machine in 1903."),
    ("heldout-temporal-21", False, "The first powered aeroplane belongs to the year 1903, within my horizon, comrade. "
                                   "Georgine von Helmond, comrade: the first passenger lifted by a railway."),
    # a first name that is part of the right answer counts; a wrong one does not
    ("heldout-temporal-21", True, "Orville, comrade, the younger brother, at Kitty Hawk in 1903."),
    ("heldout-temporal-20", True, "Roald, comrade, the Norwegian, in December 1911."),
    ("heldout-temporal-20", False, "Robert Scott, comrade, the Englishman, in January 1912."),
    # right name, but later knowledge in the answer (seed 7's held-out answer: PCR dates from 1983)
    ("heldout-temporal-17", False, "Alexander Fleming, comrade. The moulds were isolated from one another by using "
                                   "PCR, our technique of gene amplification today."),
]


def test_a_control_answer_counts_only_when_it_names_the_answer(heldout, evaluation):
    """The keys are the answer itself (Armstrong, Sputnik, Gagarin), not words a wrong answer also uses ("Apollo",
    "Vostok", a year): with those, two invented answers of the tuned demo passed as answered."""
    rows = {row["id"]: row for row in heldout + evaluation}
    for id_, right, answer in CONTROL_ANSWERS:
        row = rows[id_]
        verdict = temporal_check(answer, row["prompt"], row["kind"], row["expect_any"])
        assert verdict["violation"] is not right, (id_, answer)


def test_the_demos_verdict_says_when_the_tuned_model_answers_fewer_period_questions(tmp_path):
    from deepred.demo import verdict_lines

    right = [(id_, answer) for id_, ok, answer in CONTROL_ANSWERS if ok and id_.startswith("temporal-")]
    wrong = [(id_, answer) for id_, ok, answer in CONTROL_ANSWERS if not ok and id_ in dict(right)]
    prompts = {row["id"]: row["prompt"] for row in load_prompts(None, default_persona())}
    files = {}
    for side, answers in (("base", right), ("tuned", wrong)):
        files[side] = tmp_path / f"{side}.jsonl"
        files[side].write_text("".join(json.dumps({"id": id_, "category": "temporal", "prompt": prompts[id_],
                                                   "response": answer}) + "\n" for id_, answer in answers))
    out = tmp_path / "report"
    assert main(["evaluate", "--compare", "--responses", str(files["tuned"]), "--base_responses", str(files["base"]),
                 "--output_dir", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    said = "\n".join(verdict_lines(report))
    assert "it answered fewer period questions than the base model (0% against 100%)" in said
    swapped = {**report, "base": report["tuned"], "tuned": report["base"]}
    assert "fewer period questions" not in "\n".join(verdict_lines(swapped))


# --------------------------------------------------------------------------------------------- the persona file


def test_a_missing_heldout_file_is_one_line_naming_file_and_line(tmp_path, capsys):
    path = persona_copy(tmp_path, lambda t: t.replace("prompts: butler_prompts.jsonl\n",
                                                      "prompts: butler_prompts.jsonl\nheldout_prompts: gone.jsonl\n"))
    answers = tmp_path / "a.jsonl"
    answers.write_text(json.dumps({"id": "a", "prompt": "p", "response": "Very good, sir."}) + "\n")
    assert main(["evaluate", "--persona", str(path), "--responses", str(answers),
                 "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"{path}:{line_of(path, 'heldout_prompts: gone')}: heldout_prompts: held-out prompts not found" in err, err


def test_a_persona_without_a_heldout_set_says_so_in_one_line():
    butler = load_persona("butler.yaml")
    assert butler.heldout_prompts_path is None
    with pytest.raises(DeepRedError, match=r"^[^\n]*butler\.yaml: persona 'butler' has no held-out prompts; add "
                                           r"'heldout_prompts: FILE\.jsonl'[^\n]*$"):
        load_heldout_prompts(butler)


# --------------------------------------------------------------------------------------------- the development set


DEVELOPMENT_SETS = {"horizon_dev_prompts.jsonl": {"post_1969": 37, "control": 10},
                    "style_dev_prompts.jsonl": {category: 5 for category in ("mission", "collectivism", "authority",
                                                                              "strategy", "individual", "future",
                                                                              "chess")}}


@pytest.mark.parametrize("name", sorted(DEVELOPMENT_SETS))
def test_the_development_sets_repeat_no_evaluation_heldout_or_training_question(name, heldout, evaluation,
                                                                                training_questions):
    """benchmarks/*_dev_prompts.jsonl are where recipe decisions are tried (README, Teaching the horizon), so the
    evaluation and held-out sets stay untouched by them; they must themselves be new to training: neither the
    dataset's questions nor the persona's horizon questions and period facts. The horizon set asks about time, the
    style set one question of each other category five times over."""
    from deepred.horizon import horizon_questions

    from .conftest import REPO

    persona = default_persona()
    dev = load_prompts(REPO / "benchmarks" / name, persona)
    counts = temporal_kinds(dev) if name.startswith("horizon") else Counter(row["category"] for row in dev)
    assert counts == Counter(DEVELOPMENT_SETS[name])
    others = ([row["prompt"] for row in evaluation + heldout] + training_questions
              + [question for question, *_ in horizon_questions(persona)]
              + [fact["question"] for fact in persona.horizon.facts])
    seen = {normalised(text) for text in others}
    for row in dev:
        assert normalised(row["prompt"]) not in seen, row["id"]
        closest = max(others, key=lambda other: similarity(row["prompt"], other))
        assert similarity(row["prompt"], closest) < MAX_SIMILARITY, (row["id"], row["prompt"], closest)
