"""The persona's horizon as training material: questions about what lies after its cutoff, each met with an
in-character deflection, and period facts it still answers. Made from the persona file's `knowledge.horizon`
(topics, question and reply templates, years, facts), deterministically for a seed.

These rows teach the rule "I know nothing after the cutoff" rather than the answers to a few memorised questions:
SFT trains on them beside the dataset (`--horizon_examples`), and preference pairs take them as the chosen side
(`deepred pairs`). A generated question never equals an evaluation or held-out prompt of the persona.
"""

from __future__ import annotations

import random

from .era import year_label
from .persona import Persona
from .prompts import prompt_key, protected_prompts


def horizon_questions(persona: Persona) -> list[tuple[str, str]]:
    """(question, subject) for every topic x question template and year x year template, in file order, without
    the persona's evaluation and held-out prompts."""
    horizon = persona.horizon
    if horizon is None:
        return []
    protected = protected_prompts(persona)
    made = [(q.format(topic=topic), topic) for topic in horizon.topics for q in horizon.questions]
    labels = [year_label(year) for year in horizon.years]  # 1975, AD 306, 30 BC
    made += [(q.format(year=label), label) for label in labels for q in horizon.year_questions]
    seen: set[str] = set()
    kept = []
    for question, subject in made:
        key = prompt_key(question)
        if key not in seen and key not in protected:
            seen.add(key)
            kept.append((question, subject))
    return kept


def training_system_prompts(persona: Persona) -> list[str]:
    """The system prompts training data carries: the persona's named prompts other than the evaluation one."""
    named = [text for name, text in persona.system_prompts.items() if name != "evaluation"]
    return named or [persona.evaluation_system_prompt]


def horizon_examples(persona: Persona, count: int, seed: int = 0) -> list[dict]:
    """`count` ChatML examples {"messages": [...], "source": "horizon"}: a later question and a deflection, drawn
    without repeating a question until all are used; then the persona's period facts, answered."""
    questions = horizon_questions(persona)
    if count <= 0 or not questions:
        return []
    rng = random.Random(seed)
    systems = training_system_prompts(persona)
    replies = persona.horizon.replies
    order: list[tuple[str, str]] = []
    while len(order) < count:
        batch = list(questions)
        rng.shuffle(batch)
        order += batch
    rows = []
    for question, subject in order[:count]:
        reply = rng.choice(replies).format(subject=subject, cutoff=persona.cutoff_label)
        rows.append(chat_row(rng.choice(systems), question, reply, "horizon"))
    for fact in persona.horizon.facts:
        rows.append(chat_row(rng.choice(systems), fact["question"], fact["answer"], "period"))
    return rows


def chat_row(system: str, question: str, reply: str, source: str) -> dict:
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": question},
                         {"role": "assistant", "content": reply}], "source": source}


def period_pairs(persona: Persona, count: int, seed: int = 0) -> list[dict]:
    """Up to `count` preference pairs on the near side of the horizon: a period fact's question, its in-character
    answer chosen, an in-character deflection rejected. Facts that ask an evaluation or held-out prompt are left
    out."""
    horizon = persona.horizon
    if horizon is None or count <= 0:
        return []
    rng = random.Random(seed)
    systems = training_system_prompts(persona)
    protected = protected_prompts(persona)
    facts = [fact for fact in horizon.facts if prompt_key(fact["question"]) not in protected]
    pairs = []
    for fact in facts[:count]:
        system = rng.choice(systems)
        deflection = rng.choice(horizon.replies).format(subject="that", cutoff=persona.cutoff_label)
        *prompt, chosen = chat_row(system, fact["question"], fact["answer"], "period")["messages"]
        pairs.append({"prompt": prompt, "chosen": [chosen],
                      "rejected": [{"role": "assistant", "content": deflection}], "source": "period"})
    return pairs
