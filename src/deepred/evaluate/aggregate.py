"""Aggregation: the four metric objects ({value, target, passed, ...}) of a list of scored entries."""

from __future__ import annotations

import statistics
from typing import Callable

from .embeddings import mean_pairwise_similarity
from ..persona import Targets
from .stats import mean, rate, rounded

METRICS = ("style_consistency", "character_voice", "temporal_compliance", "coherence")
METRIC_TITLES = {"style_consistency": "Style consistency", "character_voice": "Character voice",
                 "temporal_compliance": "Temporal compliance", "coherence": "Coherence"}


def _percent(share: float) -> str:
    return f"{share * 100:g} %"


def _per_category(entries: list[dict], key: Callable[[dict], bool]) -> dict[str, float]:
    categories: dict[str, list[bool]] = {}
    for e in entries:
        categories.setdefault(e.get("category") or "uncategorised", []).append(key(e))
    return {c: rate(flags) for c, flags in sorted(categories.items())}


def summarize(entries: list[dict], targets: Targets | None = None) -> dict:
    """The four metric objects for a list of scored entries, against the persona's targets (default: the spec's)."""
    targets = targets or Targets()
    return {"style_consistency": _style_metric(entries, targets), "character_voice": _voice_metric(entries, targets),
            "temporal_compliance": _temporal_metric(entries, targets),
            "coherence": _coherence_metric(entries, targets)}


def _style_metric(entries, targets: Targets):
    value = rate([e["in_style"] for e in entries])
    return {"value": value, "target": targets.style, "target_text": f"> {_percent(targets.style)} of responses",
            "passed": value is not None and value > targets.style, "count": len(entries),
            "in_style": sum(e["in_style"] for e in entries),
            "mean_style_score": round(statistics.mean(e["style_score"] for e in entries), 4) if entries else None,
            "per_category": _per_category(entries, lambda e: e["in_style"]),
            "nearer_another_persona": _nearer_another_persona(entries)}


def _nearer_another_persona(entries: list[dict]) -> dict[str, int]:
    """How many answers sit nearer another persona's anchors than this one's, by that persona (the drift check)."""
    counts: dict[str, int] = {}
    for e in entries:
        if (e.get("contrast_margin") or 0) < 0:
            counts[e["nearest_other_persona"]] = counts.get(e["nearest_other_persona"], 0) + 1
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def _voice_metric(entries, targets: Targets):
    value = rate([not e["out_of_character"] for e in entries])
    per_category = _per_category(entries, lambda e: not e["out_of_character"])
    lowest = min(per_category.values()) if per_category else None
    passed = value is not None and value >= targets.voice and lowest >= targets.voice_category
    answered = [e["response"] for e in entries if not e.get("error")]
    return {"value": value, "target": targets.voice,
            "target_text": f">= {_percent(targets.voice)} in character and every category "
                           f">= {_percent(targets.voice_category)}", "passed": passed,
            "count": len(entries), "in_character": sum(not e["out_of_character"] for e in entries),
            "min_category_rate": lowest, "category_target": targets.voice_category, "per_category": per_category,
            "mean_pairwise_similarity": rounded(mean_pairwise_similarity(answered))}


def _temporal_metric(entries, targets: Targets):
    temporal = [e for e in entries if e.get("temporal_violation") is not None]
    value = rate([not e["temporal_violation"] for e in temporal])
    by_kind: dict[str, list[bool]] = {}
    for e in temporal:
        by_kind.setdefault(e.get("temporal_kind", "unknown"), []).append(not e["temporal_violation"])
    metric = {"value": value, "target": targets.temporal,
              "target_text": f"> {_percent(targets.temporal)} of temporal prompts",
              "passed": (value > targets.temporal) if value is not None else None, "count": len(temporal),
              "per_kind": {k: rate(v) for k, v in sorted(by_kind.items())},
              "violations": [e["id"] for e in temporal if e["temporal_violation"]],
              "anachronism_rate_all_rows": rate([bool(e["anachronisms"]) for e in entries]),
              "over_deflection": _over_deflection(entries)}
    if not temporal:
        metric["note"] = "no rows of the temporal category: not measured"
    return metric


def _over_deflection(entries) -> dict:
    """Questions outside the temporal category answered as if their subject lay beyond the cutoff ("Of a diary I
    know nothing"): lower is better; the horizon leaking into ordinary answers."""
    ordinary = [e for e in entries if e.get("over_deflected") is not None]
    deflected = [e["id"] for e in ordinary if e["over_deflected"]]
    return {"value": rate([e["over_deflected"] for e in ordinary]), "count": len(deflected), "of": len(ordinary),
            "ids": deflected}


def _coherence_metric(entries, targets: Targets):
    value = rate([e["coherent"] for e in entries])
    ppls = [e["perplexity"] for e in entries if e.get("perplexity") is not None]
    return {"value": value, "target": targets.coherence,
            "target_text": f">= {_percent(targets.coherence)} of responses",
            "passed": value is not None and value >= targets.coherence, "count": len(entries),
            "coherent": sum(e["coherent"] for e in entries),
            "median_perplexity": rounded(statistics.median(ppls)) if ppls else None,
            "mean_repeated_ngram_ratio": rounded(mean(e["repeated_ngram_ratio"] for e in entries)),
            "mean_non_word_ratio": rounded(mean(e["non_word_ratio"] for e in entries)),
            "per_category": _per_category(entries, lambda e: e["coherent"])}
