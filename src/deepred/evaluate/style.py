"""Style: is the answer written in the persona's style? Lexical evidence from the persona's style fields, semantic
evidence from the embedding margin (persona anchors minus generic-assistant anchors, see embeddings.py).

score = 0.5 lexical + 0.5 semantic. lexical = (persona fields present, capped at 3) / 3, minus 0.2 per
generic-assistant marker (at most 3), clipped to [0, 1]; a field counts only for words the answer adds beyond the
prompt, and a field the prompt itself belongs to counts one half. semantic = embedding margin mapped linearly from
[-MARGIN_SPAN, +MARGIN_SPAN] to [0, 1]. In style: score >= STYLE_THRESHOLD, at least one field, readable text.
"""

from __future__ import annotations

from typing import Iterable

from ..persona import Persona, default_persona
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


def prompt_topics(prompt: str, persona: Persona | None = None) -> set[str]:
    """Fields the question itself belongs to (a question about the persona's game is about that game)."""
    return {field for field, pattern in (persona or default_persona()).style_fields.items() if pattern.search(prompt)}


def generic_markers(response: str, prompt: str = "") -> list[str]:
    """Generic-assistant phrases the answer adds beyond the prompt."""
    return sorted(distinct_matches(GENERIC_MARKERS, response) - distinct_matches(GENERIC_MARKERS, prompt))


def style_score(fields: dict[str, list[str]], generic: Iterable[str], margin: float,
                topics: Iterable[str] = ()) -> float:
    """0.5 lexical + 0.5 semantic; a field the question already belongs to is half the evidence."""
    topics = set(topics)
    evidence = sum(0.5 if field in topics else 1.0 for field in fields)
    generic_count = min(len(set(generic)), 3)
    lexical = min(evidence, 3) / 3 - 0.2 * generic_count
    semantic = (margin + MARGIN_SPAN) / (2 * MARGIN_SPAN)
    return round(0.5 * clip(lexical) + 0.5 * clip(semantic), 4)
