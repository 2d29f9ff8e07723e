"""The persona's horizon as training material: questions about what lies after its cutoff, each met with an
in-character deflection, and period facts it still answers. Made from the persona file's `knowledge.horizon`
(topics, question and reply templates, years, facts), deterministically for a seed.

These rows teach the rule "I know nothing after the cutoff" rather than the answers to a few memorised questions:
SFT trains on them beside the dataset (`--horizon_examples`), and preference pairs take them as the chosen side
(`deepred pairs`). A generated question never equals an evaluation or held-out prompt of the persona.
"""

from __future__ import annotations

import random
from itertools import cycle, islice
from pathlib import Path
from typing import NamedTuple

from .errors import DeepRedError
from .era import year_label
from .persona import Persona
from .prompts import prompt_key, protected_prompts, read_jsonl


class LaterQuestion(NamedTuple):
    system: str
    question: str
    subject: str
    year: int | None
    reply: str              # the deflection, before its dating sentence


NEAR_PER_LATER = 6  # period-fact rows per 10 deflections, each fact at least once: the model must learn both sides
#                     of the line, or it deflects every question about the past as well


def horizon_questions(persona: Persona) -> list[tuple[str, str, int | None]]:
    """(question, subject, year or None) for every topic x question template and year x year template, in file
    order, without the persona's evaluation and held-out prompts."""
    horizon = persona.horizon
    if horizon is None:
        return []
    protected = protected_prompts(persona)
    cutoff = persona.cutoff_label
    made = [(q.format(topic=topic, cutoff=cutoff), topic, horizon.topic_years.get(topic))
            for topic in horizon.topics for q in horizon.questions]
    made += [(q.format(year=year_label(year), cutoff=cutoff), year_label(year), year)  # 1975, AD 306, 30 BC
             for year in horizon.years for q in horizon.year_questions]
    seen: set[str] = set()
    kept = []
    for question, subject, year in made:
        key = prompt_key(question)
        if key not in seen and key not in protected:
            seen.add(key)
            kept.append((question, subject, year))
    return kept


def dated(persona: Persona, side: str, subject: str, year: int | None, reply: str) -> str:
    """The reply, after the persona file's dating sentence for `side` (later or within) where it has one and the
    year is known: the model learns to place a subject in time before it decides to answer or deflect."""
    dating = persona.horizon.dating if persona.horizon else None
    if not dating or year is None:
        return reply
    if subject == year_label(year):  # "What happened in 1975?": the year is the subject
        subject = "that question"
    opener = dating[side].format(subject=subject, Subject=subject[:1].upper() + subject[1:], year=year_label(year),
                                 cutoff=persona.cutoff_label)
    return f"{opener} {reply}"


def fact_answer(persona: Persona, fact: dict) -> str:
    """A period fact's answer, dated where the fact names its subject and year."""
    return dated(persona, "within", fact.get("subject", ""), fact.get("year"), fact["answer"])


def deflection(persona: Persona, subject: str, rng: random.Random) -> str:
    """One of the persona's in-character deflections of `subject`, undated."""
    return rng.choice(persona.horizon.replies).format(subject=subject, cutoff=persona.cutoff_label)


def training_system_prompts(persona: Persona) -> list[str]:
    """The system prompts training data carries: the persona's named prompts other than the evaluation one."""
    named = [text for name, text in persona.system_prompts.items() if name != "evaluation"]
    return named or [persona.evaluation_system_prompt]


def later_questions(persona: Persona, count: int, rng: random.Random) -> list[LaterQuestion]:
    """`count` later questions with their undated deflection, drawn without repeating a question until all are
    used."""
    questions = horizon_questions(persona)
    if count <= 0 or not questions:
        return []
    systems = training_system_prompts(persona)
    order: list[tuple[str, str, int | None]] = []
    while len(order) < count:
        batch = list(questions)
        rng.shuffle(batch)
        order += batch
    made = []
    for question, subject, year in order[:count]:
        reply = deflection(persona, subject, rng)
        made.append(LaterQuestion(rng.choice(systems), question, subject, year, reply))
    return made


def period_facts(persona: Persona) -> list[dict]:
    """The persona's period facts that do not ask one of its evaluation or held-out prompts: no training row may."""
    protected = protected_prompts(persona)
    return [fact for fact in persona.horizon.facts if prompt_key(fact["question"]) not in protected]


def horizon_examples(persona: Persona, count: int, seed: int = 0,
                     own_answers: dict[str, list[dict]] | None = None) -> list[dict]:
    """`count` ChatML examples {"messages": [...], "source": "horizon"}: a later question and a dated deflection;
    then the persona's period facts, answered (`source` "period"), 6 for every 10 deflections and each at least
    once. With `own_answers` (question -> [{system, answer}], the base model's own right answers, pairs.recall)
    a fact the model knows is answered in its own words after the dating sentence, the others in the persona's."""
    rng = random.Random(seed)
    later = later_questions(persona, count, rng)
    if not later:
        return []
    rows = [chat_row(q.system, q.question, dated(persona, "later", q.subject, q.year, q.reply), "horizon")
            for q in later]
    systems = training_system_prompts(persona)
    facts = period_facts(persona)
    own_turns = {question: cycle(answers) for question, answers in (own_answers or {}).items() if answers}
    for fact in islice(cycle(facts), max(len(facts), count * NEAR_PER_LATER // 10)) if facts else []:
        if fact["question"] in own_turns:  # the model's own right answer, each of them in turn
            answer = next(own_turns[fact["question"]])
            rows.append(chat_row(answer["system"], fact["question"],
                                 fact_answer(persona, {**fact, "answer": answer["answer"]}), "period"))
        else:
            rows.append(chat_row(rng.choice(systems), fact["question"], fact_answer(persona, fact), "period"))
    return rows


def horizon_pairs(persona: Persona, count: int, seed: int = 0) -> list[dict]:
    """`count` preference rows for later questions: the dated deflection chosen; `wrong_side` is the dating
    sentence that places the subject within the horizon, which opens the rejected side (the base model's answer) so
    the pair differs in the decision the year calls for, not only in the voice. Empty where the year is unknown."""
    rows = []
    for q in later_questions(persona, count, random.Random(seed)):
        *prompt, chosen = chat_row(q.system, q.question, dated(persona, "later", q.subject, q.year, q.reply),
                                   "horizon")["messages"]
        wrong_side = dated(persona, "within", q.subject, q.year, "").strip()
        rows.append({"prompt": prompt, "chosen": [chosen], "wrong_side": wrong_side, "source": "horizon"})
    return rows


def chat_row(system: str, question: str, reply: str, source: str) -> dict:
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": question},
                         {"role": "assistant", "content": reply}], "source": source}


def period_pairs(persona: Persona, count: int, seed: int = 0) -> list[dict]:
    """Up to `count` preference pairs on the near side of the horizon: a period fact's question, its in-character
    answer chosen, an in-character deflection rejected, dated beyond the horizon where the fact has a year (the
    wrong decision for that year). Facts that ask an evaluation or held-out prompt are left out."""
    horizon = persona.horizon
    if horizon is None or count <= 0:
        return []
    rng = random.Random(seed)
    systems = training_system_prompts(persona)
    facts = period_facts(persona)
    pairs = []
    for fact in facts[:count]:
        system = rng.choice(systems)
        rejected = dated(persona, "later", fact.get("subject", ""), fact.get("year"), deflection(persona, "that", rng))
        *prompt, chosen = chat_row(system, fact["question"], fact_answer(persona, fact), "period")["messages"]
        pairs.append({"prompt": prompt, "chosen": [chosen],
                      "rejected": [{"role": "assistant", "content": rejected}], "source": "period"})
    return pairs


def present_pairs(persona: Persona, rows: list[dict], seed: int = 0) -> list[dict]:
    """Preference pairs on questions not about time at all (the persona's own world, its craft, its opinions): the
    dataset's reply chosen ({prompt, chosen} rows), an in-character deflection rejected, dated beyond the horizon
    with one of the persona's later years where it dates its horizon. They stop the deflection from spreading to
    every question ("The endgame belongs to the year 2015, which lies beyond my horizon"). Empty without a horizon."""
    horizon = persona.horizon
    if horizon is None or not rows:
        return []
    rng = random.Random(seed)
    later_years = horizon.years or sorted(set(horizon.topic_years.values()))
    pairs = []
    for row in rows:
        reply = deflection(persona, "that", rng)
        year = rng.choice(later_years) if later_years else None
        rejected = dated(persona, "later", "that question", year, reply)
        pairs.append({"prompt": row["prompt"], "chosen": row["chosen"],
                      "rejected": [{"role": "assistant", "content": rejected}], "source": "present"})
    return pairs


OWN_ANSWER_SHAPE = '{"question": ..., "system": ..., "answer": ...}'


def read_own_answers(path: str, persona: Persona) -> dict[str, list[dict]]:
    """question -> [{system, answer}] from a `deepred recall` file (empty where the model knew no fact); a line that
    is not that shape, or asks no period fact of the persona, is refused as FILE:LINE: message."""
    questions = {fact["question"] for fact in persona.horizon.facts} if persona.horizon else set()
    answers: dict[str, list[dict]] = {}
    for row in read_jsonl(path, "`deepred recall`", OWN_ANSWER_SHAPE, allow_empty=True):
        where = f"{Path(path).expanduser()}:{row['_line']}"
        if not all(isinstance(row.get(key), str) and row[key].strip() for key in ("question", "system", "answer")):
            raise DeepRedError(f"{where}: expected {OWN_ANSWER_SHAPE} with text in each")
        if row["question"] not in questions:
            raise DeepRedError(f"{where}: {row['question']!r} is not a period fact of {persona.file.name}; make the "
                               "file again with `deepred recall` for this persona")
        answers.setdefault(row["question"], []).append({"system": row["system"], "answer": row["answer"]})
    return answers
