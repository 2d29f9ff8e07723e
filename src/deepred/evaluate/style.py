"""Style: is the answer written in the persona's style, and not in another persona's? Lexical evidence from the
persona's style fields, semantic evidence from the embedding margins (persona anchors against generic-assistant
anchors, and against the other personas' anchors: contrast.py, embeddings.py).

score = 0.5 lexical + 0.5 semantic. lexical = (persona fields present, capped at 3) / 3, minus 0.2 per
generic-assistant marker (at most 3), clipped to [0, 1]; a field counts only for words the answer adds beyond the
prompt, and a field the prompt itself belongs to counts one half. semantic = margin mapped linearly from
[-MARGIN_SPAN, +MARGIN_SPAN] to [0, 1], where margin = generic margin + min(0, contrast margin): an answer nearer
another persona's anchors than its own loses the difference, one nearer its own loses nothing. In style: score >=
STYLE_THRESHOLD, at least one field of the persona's own (a hit no other persona's fields also match), readable text.
"""

from __future__ import annotations

from typing import Iterable

from ..persona import Persona, default_persona
from .contrast import shared_spans
from .stats import clip
from .text import distinct_matches, stems

STYLE_THRESHOLD = 0.5
MARGIN_SPAN = 0.1              # embedding margin -0.1 -> semantic 0, +0.1 -> semantic 1

# The modern assistant's register, whoever the persona is.
GENERIC_MARKERS = stems(
    r"it'?s important to", r"it is important to", r"it depends", r"depends on (?:your|the specific|various)",
    r"ultimately\b", r"there are (?:several|many|a few|various|some)", r"here are", r"here's", r"(?:some|a few) tips",
    r"consider (?:the|your|whether|talking)", r"you might (?:want|consider|find)", r"you may want", r"feel free",
    r"self-care", r"mental health", r"boundaries", r"personal growth", r"well-?being", r"perspectives",
    r"pros and cons", r"work-life", r"i hope", r"let me know", r"help you", r"happy to", r"great question",
    r"good question", r"everyone is different", r"one-size", r"your goals", r"open (?:communication|dialogue)",
    r"active listening", r"i statements", r"respectful", r"divers(?:e|ity)", r"inclusiv", r"stakeholder",
    r"individual (?:needs|preferences|rights|freedoms?|circumstances)", r"personal (?:values|preferences|goals)",
    r"key (?:factors|points|takeaways)", r"in summary", r"in conclusion", r"overall,", r"a variety of",
    r"can help you", r"tips?\b", r"steps? you can", r"practical steps", r"reach out", r"professional help",
    r"as an ai", r"language model", r"assistant\b")


def style_fields(response: str, prompt: str = "", persona: Persona | None = None) -> dict[str, list[str]]:
    """Persona fields present in the answer, with the words found; words the prompt already used do not count."""
    fields = (persona or default_persona()).style_fields
    echoed = {field: distinct_matches(pattern, prompt) for field, pattern in fields.items()}
    found = {}
    for field, pattern in fields.items():
        hits = sorted(distinct_matches(pattern, response) - echoed[field])
        if hits:
            found[field] = hits
    return found


def own_fields(response: str, prompt: str = "", persona: Persona | None = None) -> list[str]:
    """Fields with a word of the persona's own in the answer: a hit the prompt did not use and no other persona's
    fields also match (`shall`, `duty`, `the queen` are Deep Red's and the butler's alike). Shared words alone do
    not make an answer in style."""
    persona = persona or default_persona()
    shared = shared_spans(response, persona)
    own = []
    for field, pattern in persona.style_fields.items():
        echoed = distinct_matches(pattern, prompt)
        for match in pattern.finditer(response):
            start, end = match.span()
            if match.group(0).lower().strip() not in echoed and not any(s < end and start < e for s, e in shared):
                own.append(field)
                break
    return own


def prompt_topics(prompt: str, persona: Persona | None = None) -> set[str]:
    """Fields the question itself belongs to (a question about the persona's game is about that game)."""
    return {field for field, pattern in (persona or default_persona()).style_fields.items() if pattern.search(prompt)}


def generic_markers(response: str, prompt: str = "") -> list[str]:
    """Generic-assistant phrases the answer adds beyond the prompt."""
    return sorted(distinct_matches(GENERIC_MARKERS, response) - distinct_matches(GENERIC_MARKERS, prompt))


def style_score(fields: dict[str, list[str]], generic: Iterable[str], margin: float,
                topics: Iterable[str] = (), contrast_margin: float | None = None) -> float:
    """0.5 lexical + 0.5 semantic; a field the question already belongs to is half the evidence. `margin` is the
    generic margin; a negative `contrast_margin` (nearer another persona than this one) is taken off it."""
    topics = set(topics)
    if contrast_margin is not None:
        margin += min(0.0, contrast_margin)
    evidence = sum(0.5 if field in topics else 1.0 for field in fields)
    generic_count = min(len(set(generic)), 3)
    lexical = min(evidence, 3) / 3 - 0.2 * generic_count
    semantic = (margin + MARGIN_SPAN) / (2 * MARGIN_SPAN)
    return round(0.5 * clip(lexical) + 0.5 * clip(semantic), 4)
