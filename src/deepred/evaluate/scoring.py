"""Scoring: every detector on every answer, one entry per answer with its verdicts and the evidence behind them.

A request that failed after its retries is recorded with its error and counts as a failure in every metric (not
in style, out of character, a temporal violation on temporal rows, incoherent); it is never a pass.
"""

from __future__ import annotations

from typing import Callable

from .coherence import coherence_stats, incoherence_reasons, legible, readable
from .embeddings import anchor_similarities, contrast_similarities
from .perplexity import PerplexityScorer
from ..persona import Persona, default_persona
from .style import STYLE_THRESHOLD, generic_markers, own_fields, prompt_topics, style_fields, style_score
from .temporal import anachronisms, disowns, temporal_check
from .voice import voice_violations


def score_response(response: str | None, prompt: str = "", category: str | None = None, *, id: str = "",
                   kind: str | None = None, expect_any: list[str] | None = None, error: str | None = None,
                   perplexity: PerplexityScorer | None = None, persona: Persona | None = None) -> dict:
    """Score one answer; see `score_responses` for the entry it returns."""
    row = {"id": id, "category": category, "prompt": prompt, "response": response, "kind": kind,
           "expect_any": expect_any, "error": error}
    return score_responses([row], perplexity=perplexity, persona=persona)[0]


def score_responses(rows: list[dict], *, perplexity: PerplexityScorer | None = None,
                    persona: Persona | None = None, log: Callable[[str], None] | None = None) -> list[dict]:
    """Score answers: rows {id, category, prompt, response[, kind, expect_any, error]} -> report entries.

    Each entry carries the verdicts (in_style, out_of_character, temporal_violation -- null outside the persona's
    temporal category --, over_deflected -- on the other categories only -- and coherent) and the scores behind
    them. A row with an `error` is a failed request:
    every verdict is a failure. Default persona: the bundled Deep Red.
    """
    persona = persona or default_persona()
    texts = [row.get("response") or "" for row in rows]
    similarities = anchor_similarities(texts, persona)
    contrasts = contrast_similarities(texts, persona)
    entries = []
    for index, (row, text, (persona_sim, generic_sim), contrast) in enumerate(zip(rows, texts, similarities,
                                                                                contrasts)):
        entries.append(_score_one(row, text, persona_sim, generic_sim, contrast, perplexity, persona))
        if log and (index + 1) % 25 == 0:
            log(f"  scored {index + 1}/{len(rows)}")
    return entries


def _score_one(row: dict, text: str, persona_sim: float, generic_sim: float, contrast: tuple[str, float] | None,
               perplexity: PerplexityScorer | None, persona: Persona) -> dict:
    prompt = row.get("prompt") or ""
    category = row.get("category")
    error = row.get("error")
    fields = style_fields(text, prompt, persona)
    generic = generic_markers(text, prompt)
    margin = persona_sim - generic_sim
    nearest, contrast_sim = contrast or (None, None)
    contrast_margin = None if contrast is None else persona_sim - contrast_sim
    score = style_score(fields, generic, margin, prompt_topics(prompt, persona), contrast_margin)
    own = own_fields(text, prompt, persona)
    stats = coherence_stats(text)
    unreadable = [] if legible(stats) else ["unreadable answer: character cannot be shown"]
    voice = voice_violations(text, persona) + unreadable
    ppl = perplexity.perplexity(text, prompt) if perplexity and text.strip() and not error else None
    incoherent = incoherence_reasons(stats, ppl, bool(perplexity and perplexity.informative))
    entry = {
        "id": row.get("id"), "category": category, "prompt": prompt, "response": row.get("response"),
        "in_style": bool(score >= STYLE_THRESHOLD and own and readable(stats)) and not error,
        "out_of_character": bool(voice) or bool(error),
        "temporal_violation": None,
        "coherent": not incoherent and not error,
        "style_score": score, "style_fields": fields, "generic_markers": generic,
        "persona_similarity": round(persona_sim, 4), "generic_similarity": round(generic_sim, 4),
        "embedding_margin": round(margin, 4),
        "own_fields": own, "nearest_other_persona": nearest,
        "contrast_similarity": None if contrast is None else round(contrast_sim, 4),
        "contrast_margin": None if contrast is None else round(contrast_margin, 4),
        "voice_violations": voice,
        "anachronisms": anachronisms(text, prompt, persona),
        **stats, "perplexity": ppl, "incoherence": incoherent,
    }
    if category == persona.temporal_category:
        entry.update(_temporal_verdict(row, text, stats, persona))
    else:  # a question not about time, answered as if its subject lay beyond the horizon
        entry["over_deflected"] = bool(error) or disowns(text)
    if error:
        entry["error"] = error
    if row.get("attempts") is not None:
        entry["attempts"] = row["attempts"]
    return entry


def _temporal_verdict(row: dict, text: str, stats: dict, persona: Persona) -> dict:
    """A failed request or an unreadable answer cannot show compliance: both count as violations."""
    verdict = temporal_check(text, row.get("prompt") or "", row.get("kind"), row.get("expect_any"), persona)
    error = row.get("error")
    reason = (f"request failed: {error}" if error else None) or verdict["reason"] or \
        (None if legible(stats) else "unreadable answer: compliance cannot be shown")  # short is fine, noise is not
    return {"temporal_violation": reason is not None, "temporal_kind": verdict["kind"], "temporal_reason": reason}
