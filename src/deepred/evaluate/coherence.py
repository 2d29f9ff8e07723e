"""Coherence: is the answer readable English prose? No language model needed; perplexity is added by the scorer.

A response is coherent when it is not empty, has at least 3 words, its repeated word 3-gram ratio is <= 0.3, at
most 20 % of its tokens are non-words, at least 10 % of its words are English function words (texts of 12+
words), it is no word salad and no degenerate loop, and its perplexity (when a model is available) is <= PPL_LIMIT.
"""

from __future__ import annotations

import re
from collections import Counter

from .text import FUNCTION_WORDS, PUNCT_STRIP, is_latin_word, is_number, is_punctuation, words

MAX_REPEATED_NGRAM_RATIO = 0.3
MAX_NON_WORD_RATIO = 0.2
MIN_FUNCTION_WORD_RATIO = 0.10
# Degenerate loops that 3-gram repetition misses (", word.., and the.., word., word."): one word dominating,
# too few distinct words, punctuation instead of prose. English prose: "the" is ~6 % of words, punctuation ~3 %
# of characters, and a 50-word answer has ~60-80 % distinct words.
MIN_WORDS_FOR_STYLE = 8
MAX_TOP_WORD_SHARE = 0.25
MIN_DISTINCT_WORD_RATIO = 0.4
# The share of distinct words falls as a text grows (Heaps' law): the bundled dataset's replies run together hold 78 %
# over 100 words, 50 % over 800 and 39 % over 2,000. So it is the mean over every window of this many words (the
# moving-average type-token ratio, Covington & McFall 2010), which does not depend on length; a shorter answer is
# one window.
DISTINCT_WORD_WINDOW = 100
MAX_PUNCTUATION_RATIO = 0.15
# ...but a short sentence is mostly its marks: "I don't know, friend." has 3 (an apostrophe, a comma, a full stop)
# in 18 characters, 17 %. Up to 3 marks never make an answer noise.
SHORT_ANSWER_MARKS = 3
# Word salad ("the is a and, and let for is dignity. I the plan") passes the checks above. Closed-class words
# cannot follow each other freely in English: "the to", "a,", "with of", "I the", "I is" almost never occur in
# prose, nor does a sentence starting in lowercase. Rate of such pairs per word: at most 2.0 % on the 100 fluent
# labelled answers and 1.5 % on the 350 answers of the bundled dataset; 4-25 % in the tiny demo model's salad.
MAX_GRAMMAR_CLASH_RATIO = 0.04
PPL_LIMIT = 300.0  # under SmolLM2-135M-Instruct: fluent prose <= 261 (350 texts), the same words shuffled >= 192,
                   # 97-100 % above 300 (docs/metrics.md, "Perplexity"); larger models score fluent text lower

_DETERMINERS = frozenset("the a an our your my their its every".split())
_PREPOSITIONS = frozenset("of to in on at for with by from into upon than".split())
_CONJUNCTIONS = frozenset("and or nor".split())
_CLAUSE_FINAL_NEVER = frozenset("to than into upon".split())  # "to." / "than," end no clause
_FINITE_VERBS = frozenset("is are was were must would shall could".split())
_SUBJECTS = frozenset("i we they he she".split())
_NEVER_AFTER_DETERMINER = _DETERMINERS | _PREPOSITIONS | _CONJUNCTIONS | _FINITE_VERBS
_NEVER_AFTER_PREPOSITION = _PREPOSITIONS | _CONJUNCTIONS | _FINITE_VERBS
_NEVER_AFTER_SUBJECT = _DETERMINERS | _SUBJECTS | {"."}
_DISAGREEMENTS = frozenset({("i", "is"), ("i", "are"), ("we", "is"), ("we", "was"), ("they", "is"), ("they", "was"),
                            ("he", "are"), ("he", "were"), ("she", "are"), ("she", "were")})


LOWERCASE_SENTENCE_START = re.compile(r"(?<![A-Za-z]\.[A-Za-z])([.!?])\s+([a-z]+)")
PUNCTUATION_AFTER_SENTENCE_END = re.compile(r"(?<!\.)[.!?]\s*[,;:]")
GRAMMAR_TOKEN = re.compile(r"[^\W\d_]+(?:['\u2019][^\W\d_]+)?|[.,;:!?]")


def grammar_clashes(text: str) -> list[str]:
    """Adjacent pairs English does not allow: a sentence that starts in lowercase ("is. because"), determiner +
    function word or punctuation ("the to", "a,"), "to"/"than" before punctuation,
    preposition + preposition/conjunction/finite verb ("with of"), conjunction + conjunction or sentence end
    ("and and", "and."), two finite verbs ("is must"), subject pronoun + determiner, pronoun, full stop or a verb
    that disagrees ("I the", "I you", "I.", "I is"), punctuation right after a full stop ("board.,")."""
    tokens = [t.lower() for t in GRAMMAR_TOKEN.findall(text or "")]
    clashes = [f"{m.group(1)} {m.group(2)}" for m in LOWERCASE_SENTENCE_START.finditer(text or "")]
    clashes += PUNCTUATION_AFTER_SENTENCE_END.findall(text or "")
    for first, second in zip(tokens, tokens[1:]):
        punct = not second[0].isalpha()
        if ((first in _DETERMINERS and (punct or second in _NEVER_AFTER_DETERMINER))
                or (first in _PREPOSITIONS and second in _NEVER_AFTER_PREPOSITION)
                or (first in _CLAUSE_FINAL_NEVER and second in ".,;:")
                or (first in _CONJUNCTIONS and (second in _CONJUNCTIONS or second in ".!?;:"))
                or (first in _FINITE_VERBS and second in _FINITE_VERBS)
                or (first in _SUBJECTS and (second in _NEVER_AFTER_SUBJECT or (first, second) in _DISAGREEMENTS))):
            clashes.append(f"{first} {second}" if not punct else f"{first}{second}")
    return clashes


def coherence_stats(response: str) -> dict:
    """Fluency signals that need no language model: length, repetition, non-words, function words."""
    tokens = [t.strip(PUNCT_STRIP) for t in (response or "").split()]
    raw_tokens = (response or "").split()
    counted = [t for t, raw in zip(tokens, raw_tokens) if t and not is_punctuation(raw)]
    non_words = [t for t in counted if not (is_latin_word(t) or is_number(t))]
    word_list = words(response)
    trigrams = list(zip(word_list, word_list[1:], word_list[2:]))
    repeated = 1 - len(set(trigrams)) / len(trigrams) if trigrams else 0.0
    function = sum(w in FUNCTION_WORDS for w in word_list) / len(word_list) if word_list else 0.0
    lowered = [w.lower() for w in word_list]
    top_share = max(lowered.count(w) for w in set(lowered)) / len(lowered) if lowered else 1.0
    visible = [c for c in (response or "") if not c.isspace()]
    punctuation = sum(not c.isalnum() for c in visible) / len(visible) if visible else 1.0
    clashes = grammar_clashes(response)
    return {"n_words": len(word_list), "n_tokens": len(counted), "repeated_ngram_ratio": round(repeated, 4),
            "grammar_clash_ratio": round(len(clashes) / len(word_list), 4) if word_list else 0.0,
            "grammar_clashes": clashes[:5],
            "non_word_ratio": round(len(non_words) / len(counted), 4) if counted else 1.0,
            "function_word_ratio": round(function, 4),
            "distinct_word_ratio": round(distinct_word_ratio(lowered), 4),
            "top_word_share": round(top_share, 4), "punctuation_ratio": round(punctuation, 4),
            "punctuation_marks": sum(not c.isalnum() for c in visible)}


def distinct_word_ratio(lowered: list[str], window: int = DISTINCT_WORD_WINDOW) -> float:
    """The mean share of distinct words over every run of `window` words (all of them when fewer)."""
    if len(lowered) <= window:
        return len(set(lowered)) / len(lowered) if lowered else 0.0
    counts = Counter(lowered[:window])
    total = len(counts)
    for leaving, entering in zip(lowered, lowered[window:]):
        counts[leaving] -= 1
        if not counts[leaving]:
            del counts[leaving]
        counts[entering] += 1
        total += len(counts)
    return total / (len(lowered) - window + 1) / window


def degenerate(stats: dict) -> list[str]:
    reasons = []
    if stats["n_words"] >= 8 and stats["top_word_share"] > MAX_TOP_WORD_SHARE:
        reasons.append(f"one word is {stats['top_word_share']:.0%} of the answer")
    if stats["n_words"] >= 8 and stats["distinct_word_ratio"] < MIN_DISTINCT_WORD_RATIO:
        reasons.append(f"only {stats['distinct_word_ratio']:.0%} distinct words")
    if stats["punctuation_ratio"] > MAX_PUNCTUATION_RATIO and stats["punctuation_marks"] > SHORT_ANSWER_MARKS:
        reasons.append(f"punctuation is {stats['punctuation_ratio']:.0%} of the characters")
    return reasons


def legible(stats: dict) -> bool:
    """Words (or numbers: "1945."), not noise or a loop, however short."""
    return (stats["n_tokens"] > 0 and stats["non_word_ratio"] <= MAX_NON_WORD_RATIO
            and stats["repeated_ngram_ratio"] <= MAX_REPEATED_NGRAM_RATIO and not degenerate(stats))


def readable(stats: dict) -> bool:
    """Style is only judged on text a person could read: legible and long enough to show a voice."""
    return stats["n_words"] >= MIN_WORDS_FOR_STYLE and legible(stats)


def incoherence_reasons(stats: dict, perplexity: float | None, use_perplexity: bool) -> list[str]:
    reasons = []
    if stats["n_tokens"] == 0:
        reasons.append("empty")
    elif stats["n_words"] < 3:
        reasons.append("fewer than 3 words")
    if stats["repeated_ngram_ratio"] > MAX_REPEATED_NGRAM_RATIO:
        reasons.append(f"repetitive ({stats['repeated_ngram_ratio']:.0%} repeated 3-grams)")
    if stats["non_word_ratio"] > MAX_NON_WORD_RATIO:
        reasons.append(f"non-word tokens ({stats['non_word_ratio']:.0%})")
    if stats["n_words"] >= 12 and stats["function_word_ratio"] < MIN_FUNCTION_WORD_RATIO:
        reasons.append(f"no sentence structure ({stats['function_word_ratio']:.0%} function words)")
    if len(stats["grammar_clashes"]) >= 2 and stats["grammar_clash_ratio"] > MAX_GRAMMAR_CLASH_RATIO:
        reasons.append(f"word salad ({stats['grammar_clash_ratio']:.0%} impossible word pairs such as "
                       f"'{stats['grammar_clashes'][0]}')")
    reasons.extend(degenerate(stats))
    if use_perplexity and perplexity is not None and perplexity > PPL_LIMIT:
        reasons.append(f"perplexity {perplexity:.0f} > {PPL_LIMIT:.0f}")
    return reasons

