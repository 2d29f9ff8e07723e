"""`deepred evaluate` as a package whose layout is the flow of an evaluation (docs/metrics.md defines the metrics):

    (deepred.persona, deepred.prompts: the persona file and its prompts, shared with the other stages)
    text.py, stats.py, contrast.py   shared helpers; the other personas an answer is contrasted with
    style.py, voice.py, temporal.py, coherence.py      detectors, each testable alone
    embeddings.py, perplexity.py     the model-based scorers
    endpoint.py, models.py, judge.py model clients (OpenAI-compatible endpoint, local transformers, the judge)
    inputs.py                        answer files (--responses)
    scoring.py, aggregate.py         one entry per answer, then the four metrics
    report_text.py, charts.py, report.py    report.md and the console, PNG charts, report.json/.html
    command.py                       the command: sources, answers, scoring, report

Imports run one way, down this list's dependency order (tests/test_persona.py checks it).
"""

from ..config import EvalConfig
from ..persona import Persona, Targets, bundled_persona_path, default_persona, load_persona
from ..prompts import bundled_prompts_path, load_prompts, read_jsonl
from .aggregate import METRIC_TITLES, METRICS, summarize
from .coherence import (MAX_GRAMMAR_CLASH_RATIO, PPL_LIMIT, coherence_stats, grammar_clashes,
                        incoherence_reasons)
from .command import Source, base_source, evaluate, primary_source, system_prompt
from .embeddings import anchor_similarities, embed, mean_pairwise_similarity
from .endpoint import chat_with_retries, resolve_model_name
from .inputs import load_responses
from .judge import judge_answers
from .models import LocalModel, load_causal_lm
from .perplexity import PerplexityScorer
from .report import render_html, write_report
from .report_text import render_markdown, summary_text
from .charts import render_charts
from .scoring import score_response, score_responses
from .style import style_fields, style_score
from .temporal import anachronisms, infer_temporal_kind, temporal_check
from .voice import voice_violations

__all__ = [
    "EvalConfig", "METRICS", "METRIC_TITLES", "summarize", "MAX_GRAMMAR_CLASH_RATIO", "PPL_LIMIT", "coherence_stats",
    "grammar_clashes", "incoherence_reasons", "Source", "base_source", "evaluate", "primary_source", "system_prompt",
    "anchor_similarities", "embed", "mean_pairwise_similarity", "chat_with_retries", "resolve_model_name",
    "bundled_prompts_path", "load_prompts", "load_responses", "read_jsonl", "judge_answers", "LocalModel",
    "load_causal_lm", "PerplexityScorer", "Persona", "Targets", "bundled_persona_path", "default_persona",
    "load_persona", "render_html", "write_report", "render_markdown", "summary_text", "render_charts",
    "score_response", "score_responses", "style_fields", "style_score", "anachronisms", "infer_temporal_kind",
    "temporal_check", "voice_violations",
]
