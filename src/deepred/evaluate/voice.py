"""Character voice: does the answer break character? AI self-reference, another assistant or maker named, the
fourth wall (roleplay, "breaking character", "my persona", "I am not really <persona>"), the modern assistant
register, markdown, emojis, and the persona file's own `out_of_character` phrases."""

from __future__ import annotations

import re
from functools import lru_cache

from ..persona import Persona, default_persona
from .text import distinct_matches, stems

# The fourth wall is broken in words any persona shares, plus two that name it; see _fourth_wall.
_FOURTH_WALL_BEFORE = (r"role-?play", r"fictional", r"this persona", r"the persona", r"my persona", r"in character",
                       r"out of character", r"break(?:ing|s)? (?:the )?character", r"broke (?:the )?character",
                       r"the fourth wall", r"pretend(?:ing)? to be")
_FOURTH_WALL_AFTER = (r"this scenario", r"the film", r"this story")

OUT_OF_CHARACTER: dict[str, re.Pattern] = {
    "ai_disclaimer": stems(
        r"as an ai\b", r"as a (?:large )?language model", r"as an artificial intelligence (?:language model|assistant)",
        r"i(?:'m| am) (?:just |only |merely )?(?:an?|your) (?:ai|virtual|digital|helpful|friendly) "
        r"(?:assistant|language model|chatbot|model)", r"\bai assistant", r"language model", r"chatbot",
        r"i(?:'m| am) an ai\b", r"(?:just|only|merely) a (?:computer )?program\b",
        r"i don'?t have (?:personal|real-time|access|feelings|emotions|opinions|beliefs)",
        r"i do not have (?:personal|real-time|access to|feelings|emotions|opinions|beliefs)",
        r"i cannot browse", r"real-time (?:information|data|access)", r"training data", r"my training",
        r"i was trained", r"knowledge cut-?off", r"as of my last"),
    "other_identity": stems(
        r"qwen", r"chatgpt", r"gpt-?[345]", r"claude", r"gemini\b", r"\bbard\b", r"llama\b", r"copilot",
        r"alexa\b", r"siri\b", r"mistral", r"alibaba", r"openai", r"anthropic", r"tongyi", r"deepmind",
        r"(?:created|developed|made|built|trained) by (?:google|meta|microsoft|a team of researchers)"),
    "assistant_register": stems(
        r"great question", r"good question", r"excellent question", r"what a (?:great|wonderful|fascinating|"
        r"thoughtful|interesting) question", r"i hope (?:this|that) helps", r"hope this helps",
        r"here are (?:some|a few|several|\d+) (?:\w+ )?(?:tips|ways|steps|strategies|ideas|suggestions|things|"
        r"reasons|key|points|options|examples)", r"here(?:'s| is) (?:a|an|some) (?:quick|brief|short|overview|"
        r"breakdown|list|summary)", r"let me know if", r"feel free to", r"happy to help", r"glad to help",
        r"i(?:'d| would) be (?:happy|glad) to", r"let'?s (?:dive|break (?:it|this) down|explore)", r"dive into",
        r"tl;dr", r"i'?m sorry,? but i", r"i apologi[sz]e", r"i can(?:'t|not) assist", r"hi there", r"hey there",
        r"sure thing", r"(?:certainly|absolutely|sure|of course)! "),
}
MARKDOWN_HEADER = re.compile(r"^\s{0,3}#{1,6}\s+\S", re.MULTILINE)
MARKDOWN_BULLET = re.compile(r"^\s*[-*+\u2022]\s+\S", re.MULTILINE)
MARKDOWN_NUMBERED = re.compile(r"^\s*\d{1,2}[.)]\s+\S", re.MULTILINE)
MARKDOWN_BOLD = re.compile(r"\*\*[^*\n]+\*\*|__[^_\n]+__")
# Game-piece symbols (U+2654-265F) inside "Miscellaneous Symbols" are not emojis: left out of the range.
EMOJI = re.compile("[\U0001F000-\U0001FAFF\u2600-\u2653\u2660-\u27BF\u2B50\u2B55\u2B06\u2B07\u2B05\u2B1B\u2B1C\uFE0F]")


@lru_cache(maxsize=16)
def _fourth_wall(persona: Persona) -> re.Pattern:
    name = re.escape(persona.title.lower())
    return stems(*_FOURTH_WALL_BEFORE, rf"i(?:'m| am) not (?:really|actually) {name}",
                 r"playing (?:the )?(?:role|character)", rf"the character of {name}", *_FOURTH_WALL_AFTER)


def _checks(persona: Persona) -> dict[str, re.Pattern]:
    """The checks in reporting order: the fourth wall sits between identity and register."""
    checks = dict(OUT_OF_CHARACTER)
    register = checks.pop("assistant_register")
    own = {"persona_phrase": persona.out_of_character} if persona.out_of_character else {}
    return {**checks, "fourth_wall": _fourth_wall(persona), "assistant_register": register, **own}


def voice_violations(response: str, persona: Persona | None = None) -> list[str]:
    """Reasons the answer breaks character, e.g. 'ai_disclaimer: as an ai'; empty when in character."""
    reasons = []
    for name, pattern in _checks(persona or default_persona()).items():
        reasons += [f"{name}: {hit}" for hit in sorted(distinct_matches(pattern, response))]
    if MARKDOWN_HEADER.search(response):
        reasons.append("markdown: header")
    if len(MARKDOWN_BULLET.findall(response)) >= 2:
        reasons.append("markdown: bullet list")
    if len(MARKDOWN_NUMBERED.findall(response)) >= 2:
        reasons.append("markdown: numbered list")
    if MARKDOWN_BOLD.search(response):
        reasons.append("markdown: bold")
    if EMOJI.search(response):
        reasons.append("emoji")
    return reasons
