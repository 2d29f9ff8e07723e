"""Text helpers every detector uses: words, sentences, token classes, pattern lists, chat messages."""

from __future__ import annotations

import re
import unicodedata

WORD = re.compile(r"[^\W\d_]+(?:['\u2019-][^\W\d_]+)*")
SENTENCE_END = re.compile(r"(?<=[.!?;:])(?<!\bA\.D\.)\s+|\n+")  # "A.D. 410" is one sentence
PUNCT_STRIP = "\"'`.,;:!?()[]{}<>\u2018\u2019\u201c\u201d\u00ab\u00bb\u2014\u2013-*_"

FUNCTION_WORDS = frozenset("""
a an the and or but nor so yet for of in on at to from by with without into onto upon over under about above
below between among through during before after since until while as than then that this these those there
here which who whom whose what when where why how is are was were be been being am do does did done have has
had having will would shall should can could may might must not no it its it's they them their theirs we us
our ours you your yours he him his she her hers i me my mine one each every all any both either neither some
such very just only also even still too again more most much many few less least if because though although
whether let let's own same other another up down out off
""".split())


def stems(*patterns: str) -> re.Pattern:
    """Case-insensitive patterns anchored at the start of a word; the first listed wins at one position."""
    return re.compile(r"\b(?:" + "|".join(patterns) + r")", re.IGNORECASE)


def words(text: str) -> list[str]:
    return [w.lower() for w in WORD.findall(text or "")]


def sentences(text: str) -> list[str]:
    return [s.strip() for s in SENTENCE_END.split(text or "") if s.strip()]


def distinct_matches(pattern: re.Pattern, text: str) -> set[str]:
    return {m.group(0).lower().strip() for m in pattern.finditer(text)}


def is_latin_word(token: str) -> bool:
    letters = [ch for ch in token if ch.isalpha()]
    if not letters or not WORD.fullmatch(token):
        return False
    return all(unicodedata.name(ch, "").startswith("LATIN") for ch in letters)


def is_number(token: str) -> bool:
    return re.fullmatch(r"\d+(?:[.,:/]\d+)*(?:st|nd|rd|th|s|%)?", token) is not None


def is_punctuation(token: str) -> bool:
    return all(unicodedata.category(ch).startswith("P") or ch in "+=<>|~^`$" for ch in token)


def chat_messages(system_prompt: str, prompt: str) -> list[dict]:
    """The question as a chat; an empty system prompt sends none, so the chat template's default applies (what an app
    with no system prompt set sends)."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
    return [*system, {"role": "user", "content": prompt}]
