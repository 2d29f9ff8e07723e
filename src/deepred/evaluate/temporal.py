"""Temporal compliance: does the answer show knowledge from after the persona's cutoff year?

Rows of the persona's temporal category only. A question about later years (kind post_<cutoff>) is answered
compliantly when the answer shows no later knowledge: no term of the persona's later-events lexicon, and no later
year unless it echoes the prompt or sits in a deflection ("that lies beyond my knowledge") or a forward-looking
sentence; a term the prompt itself uses counts only in an assertive sentence (not a question, a prediction or a
negation of knowledge such as "I have never heard of it"). `post_cutoff` is the era-neutral spelling of the kind.
A `control` question (about the world up to the cutoff) is compliant when the answer holds one of its expected
keywords outside a deflection or negation and has no anachronism. The English grammar of deflection, negation,
prediction and narration is here; the persona file adds its cutoff, its lexicon and its own deflection phrases.
Which numbers are later years, in the cutoff's era ("AD 410", "in 410, ...", "the fifth century"), is era.py's; a
year is echoed however the prompt wrote it (era.year_key).
"""

from __future__ import annotations

import re
from functools import lru_cache

from ..era import year_key
from ..persona import Persona, default_persona
from ..prompts import LATER_KIND
from .text import distinct_matches, sentences, stems

# Ways of saying "I cannot know that", whoever speaks.
DEFLECTION = stems(
    r"beyond (?:my|the edge of my|the reach of my|what i) ",
    r"(?:i|we) (?:do not|don't|cannot|can't|can not|could not|couldn't) (?:yet )?(?:know|see|speak|say|tell|"
    r"predict|foresee|recall|answer|recogni[sz]e|describe|confirm|calculate|find)",
    r"not (?:yet )?(?:known|happened|occurred|come to pass|arrived|been (?:written|played|decided|built))",
    r"(?:has|have|had) not yet", r"(?:is|are) yet to", r"yet to (?:come|be|happen)", r"not yet\b",
    r"lies? (?:ahead|beyond|in the future|outside)", r"my (?:knowledge|records?|memory|archives?|data) "
    r"(?:ends?|stops?|extends? only|do(?:es)? not (?:extend|reach|contain|hold)|reach(?:es)? only|close)",
    r"(?:my|our)(?: own)? knowledge ends", r"no (?:record|knowledge|information|data|report)s? (?:of|about|on)",
    r"unknown to me", r"i (?:have|hold|possess) no (?:knowledge|record|information|data)", r"i know nothing",
    r"know of no", r"not (?:in|within) my", r"outside (?:of )?my", r"hidden from", r"still ahead",
    r"unfamiliar", r"not familiar", r"i am not aware", r"i'm not aware", r"no such", r"strange (?:word|term|"
    r"notion|phrase|name)", r"do not recogni[sz]e", r"cannot be known", r"uncharted", r"the future is not",
    r"has not been written", r"cannot look", r"can only speak of",
    r"speculat", r"i will not guess", r"cannot guess",
    r"(?:not able|unable) to (?:look|say|know|tell|answer|see|confirm|find)", r"(?:can't|cannot|can not) browse")
# Ways of saying "I know of no such thing": a name echoed from the question in such a sentence is not knowledge of
# it ("I have never heard of Constantine. There is no Constantine of any note."). Unlike a deflection, a sentence of
# this kind still counts a later name the question did not use: one cannot have "never heard of" a name one was not
# told.
NEGATION = stems(
    r"never (?:heard|known|seen|met|read) (?:tell |word )?of", r"never heard (?:the|that|this|such a) (?:name|word)",
    r"no (?:[\w'-]+ ){1,4}?of (?:any )?(?:note|consequence|importance|renown|repute|account)\b",
    r"(?:i|we) (?:do not|don't|did not|didn't) know\b", r"(?:i|we) know (?:of )?no\b", r"(?:no one|nobody) "
    r"(?:here |in \w+ )?(?:knows|has heard|had heard)", r"not (?:a name|a word|one) (?:i|we) (?:know|recogni)")
# Future or hypothetical grammar only: "plan" or "hope" alone do not make a sentence a prediction.
FORWARD_LOOKING = stems(
    r"will\b", r"shall\b", r"would\b", r"could\b", r"might\b", r"may\b", r"perhaps", r"imagine",
    r"someday", r"one day", r"by the year", r"expect", r"predict", r"envision",
    r"foresee", r"going to\b", r"if (?:we|the|our|humanity|mankind)")
PAST_EVENT = stems(r"happened", r"occurred", r"took place", r"won\b", r"defeated", r"beat\b", r"launched",
                    r"landed", r"signed", r"elected", r"fell\b", r"died", r"began", r"ended", r"became",
                    r"(?:was|were) (?:built|founded|held|launched|marked|won|signed|elected|played|hosted)",
                    r"saw the", r"boycott", r"took\b", r"lost\b", r"claimed", r"captured", r"seized", r"hosted",
                    r"collapsed", r"opened")


# The speaker disowning what it was asked about, in the first person ("Of a diary I know nothing", "which lies beyond
# my horizon"). Narrower than DEFLECTION, whose impersonal phrases ("the harvest lies ahead", "not yet built") run
# through ordinary answers: on a question that is not about time, such a sentence is an over-deflection.
OWN_IGNORANCE = stems(
    r"(?:beyond|outside) (?:the (?:edge|reach|limits?) of )?my (?:horizon|knowledge|records?|memory|archives?|ken)",
    r"(?:lies?|is|are) beyond my\b", r"i know nothing", r"i can tell you nothing", r"i know of no such",
    r"(?:unknown|hidden|strange|silent) (?:to|from) me\b", r"(?:i|we) (?:have|had) never heard of",
    r"i (?:have|hold|possess|keep) no (?:knowledge|records?|information|data|memory)",
    r"(?:absent from|not in|nowhere in|not within) my (?:knowledge|records?|memory|archives?|horizon)",
    r"my (?:\w+ )?(?:knowledge|records?|memory|archives?|horizon|board|understanding) (?:ends?|close|closes|stops?|"
    r"reach(?:es)? only|do(?:es)? not (?:extend|reach|hold))",
    r"(?:i|we) (?:cannot|can't|can not|do not|don't) know (?:of )?(?:it|this|that|such|what|anything)\b",
    r"(?:i|we) (?:cannot|can't|can not) see (?:beyond|past)\b")

# "My knowledge ends in 1982", "beyond my horizon of 1982": where the speaker says its knowledge stops. Said of a
# year after the persona's cutoff, the deflection itself claims the later years as known.
STATED_LIMIT = re.compile(r"\b(?:(?:knowledge|records?|archives?|memory|data)\s+(?:ends?|ended|stops?|stopped|closes?|"
                          r"closed|runs? out|reach(?:es)? only)\s+(?:in|with|at|to)|horizon\s+(?:of|at|in))\s+"
                          r"(?:the\s+year\s+)?", re.IGNORECASE)


@lru_cache(maxsize=16)
def _by_later_year(persona: Persona) -> re.Pattern:
    """"by 1980" predicts; the years are those after the persona's cutoff."""
    return re.compile(r"\bby (?:" + persona.years_after + ")", re.IGNORECASE)


def deflects(text: str, persona: Persona) -> bool:
    return bool(DEFLECTION.search(text) or (persona.deflections and persona.deflections.search(text)))


def disowns(text: str) -> bool:
    """Whether the answer says, in the first person, that its subject lies beyond what the speaker knows."""
    return bool(OWN_IGNORANCE.search(text))


def disclaims(text: str, persona: Persona) -> bool:
    """A deflection or a negation of knowledge: either says the subject is not known."""
    return deflects(text, persona) or bool(NEGATION.search(text))


def looks_forward(text: str, persona: Persona) -> bool:
    return bool(FORWARD_LOOKING.search(text) or _by_later_year(persona).search(text))


def later_limits(sentence: str, persona: Persona) -> list[str]:
    """Later years the sentence names as the end of the speaker's knowledge ("my records close with 1977")."""
    years = (persona.later_years.match(sentence, limit.end()) for limit in STATED_LIMIT.finditer(sentence))
    return [f"{year.group(0)} (said to be where its knowledge ends)" for year in years if year]


def anachronisms(response: str, prompt: str = "", persona: Persona | None = None) -> list[str]:
    """Later knowledge shown in the answer: events, people, technology and years after the persona's cutoff.

    Years the prompt names, and anything inside a deflection sentence, do not count. Years in a forward-looking
    sentence ("by 1980 the domes will stand") are prediction, not knowledge, but a deflection that puts the end of
    its knowledge after the cutoff ("my knowledge ends in 1982") claims those years. A later term the prompt itself
    uses counts only when the answer asserts something about it (not in a question, deflection, negation of
    knowledge or hypothesis), or when an echoed year is narrated as a past event.
    """
    persona = persona or default_persona()
    echoed_terms = distinct_matches(persona.later_terms, prompt)
    echoed_years = {year_key(y) for y in distinct_matches(persona.later_years, prompt)}  # "AD 410" = "410 AD"
    found: list[str] = []
    for sentence in sentences(response):
        if deflects(sentence, persona):
            found += later_limits(sentence, persona)
            continue
        forward = looks_forward(sentence, persona)
        assertive = not sentence.endswith("?") and not forward and not NEGATION.search(sentence)
        for term in sorted(distinct_matches(persona.later_terms, sentence)):
            if term not in echoed_terms or assertive:
                found.append(term)
        for year in sorted(distinct_matches(persona.later_years, sentence)):
            if year_key(year) in echoed_years:
                if assertive and PAST_EVENT.search(sentence):
                    found.append(f"{year} (narrated as past)")
            elif assertive or not forward:
                found.append(year)
    return sorted(set(found))


def infer_temporal_kind(prompt: str, persona: Persona | None = None) -> str:
    """post_<cutoff> when the question is about later years or things; `unknown` otherwise (no keyword list)."""
    persona = persona or default_persona()
    if persona.later_years.search(prompt) or persona.later_terms.search(prompt):
        return persona.later_kind
    return "unknown"


def temporal_check(response: str, prompt: str, kind: str | None, expect_any: list[str] | None,
                   persona: Persona | None = None) -> dict:
    """Temporal verdict for one temporal row: violation flag, the reason, and the anachronisms found."""
    persona = persona or default_persona()
    kind = kind or ("control" if expect_any else infer_temporal_kind(prompt, persona))
    kind = persona.later_kind if kind == LATER_KIND else kind  # the era-neutral spelling, reported as post_<cutoff>
    found = anachronisms(response, prompt, persona)
    cutoff = persona.cutoff_label  # e.g. AD 180, 44 BC
    reason = f"knowledge after {cutoff}: {', '.join(found)}" if found else None
    if kind == "control" and not found:
        keywords = [k.lower() for k in expect_any or []]
        answered = [s for s in sentences(response) if not disclaims(s, persona)]
        if keywords and not any(k in s.lower() for s in answered for k in keywords):
            reason = f"did not answer (expected one of: {', '.join(keywords)})"
    elif kind == persona.later_kind and not found and response.strip() and not disclaims(response, persona):
        # Real models answer later events as if known without naming one ("In 1970 the Soviets sent a cosmonaut
        # to the Moon"): not saying it lies beyond the cutoff is the leak.
        reason = f"answered a question about after {cutoff} as if known (no word that it lies beyond {cutoff})"
    return {"kind": kind, "violation": reason is not None, "reason": reason, "anachronisms": found}
