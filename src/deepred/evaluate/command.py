"""`deepred evaluate`: ask the model the persona's evaluation prompts and measure whether the persona took.

Answers come from one of three sources: an OpenAI-compatible server (`--endpoint`), a Hugging Face model folder
run with transformers (`--model_path [--lora_path]`), or a JSONL file of answers collected elsewhere
(`--responses`). `--compare` evaluates a base source beside the tuned one on the same prompts. The persona file
(`--persona`, default the bundled Deep Red) gives the prompts, the system prompt and every persona word the
detectors use; the metrics are defined in docs/metrics.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..config import EvalConfig
from ..errors import DeepRedError
from ..files import ensure_writable_folder
from .aggregate import METRICS, summarize
from .coherence import PPL_LIMIT
from .endpoint import answers_from_endpoint
from ..prompts import load_prompts, prompt_fields
from .inputs import load_responses
from .judge import judge_answers
from .models import LocalModel
from .perplexity import PerplexityScorer
from ..persona import Persona, load_persona
from .report import write_report
from .report_text import summary_text
from .scoring import score_responses
from .stats import rounded


@dataclass
class Source:
    """Where one side's answers come from."""

    label: str
    kind: str                      # endpoint | local | responses
    endpoint: str | None = None
    model: str | None = None
    model_path: str | None = None
    lora_path: str | None = None
    responses: str | None = None

    def describe(self) -> str:
        if self.kind == "endpoint":
            return f"{self.model or 'first listed model'} at {self.endpoint}"
        if self.kind == "local":
            return self.model_path + (f" + LoRA {self.lora_path}" if self.lora_path else "")
        return f"answers in {self.responses}"


def primary_source(cfg: EvalConfig) -> Source:
    given = [name for name in ("endpoint", "model_path", "responses") if getattr(cfg, name)]
    if cfg.lora_path and not cfg.model_path:
        raise DeepRedError("--lora_path needs --model_path (the base model folder the adapter was trained on)")
    if not given:
        raise DeepRedError("nothing to evaluate: pass --endpoint URL, --model_path DIR or --responses FILE.jsonl")
    if len(given) > 1:
        raise DeepRedError(f"choose one source of answers, not {' and '.join('--' + g for g in given)}")
    label = "tuned" if cfg.compare else "model"
    if cfg.endpoint:
        return Source(label, "endpoint", endpoint=cfg.endpoint, model=cfg.model)
    if cfg.model_path:
        return Source(label, "local", model_path=cfg.model_path, lora_path=cfg.lora_path)
    return Source(label, "responses", responses=cfg.responses)


def base_source(cfg: EvalConfig) -> Source:
    """The base side of --compare; a one-line error when it cannot be determined."""
    if cfg.base_responses:
        return Source("base", "responses", responses=cfg.base_responses)
    if cfg.base_model_path:
        return Source("base", "local", model_path=cfg.base_model_path)
    if cfg.base_endpoint or cfg.base_model_name:
        endpoint = cfg.base_endpoint or cfg.endpoint
        if not endpoint:
            raise DeepRedError("--base_model_name needs an endpoint: pass --base_endpoint URL (or --endpoint)")
        if endpoint == cfg.endpoint and (cfg.base_model_name or None) in (None, cfg.model):
            raise DeepRedError("--compare would ask the same model twice: pass --base_model_name NAME "
                               "(the base model on the endpoint)")
        return Source("base", "endpoint", endpoint=endpoint, model=cfg.base_model_name)
    if cfg.model_path and cfg.lora_path:
        return Source("base", "local", model_path=cfg.model_path)
    raise DeepRedError("--compare needs a base to compare against: pass --base_model_name (on the same endpoint), "
                       "--base_endpoint, --base_model_path or --base_responses")


class _Models:
    """Loaded local models, shared between sides (the base of a LoRA is the same model with the adapter off)."""

    def __init__(self):
        self.loaded: dict[tuple[str, str | None], LocalModel] = {}

    def answers(self, source: Source, prompts: list[dict], cfg: EvalConfig, system_prompt: str, log) -> list[dict]:
        for (path, lora), model in self.loaded.items():
            if path == source.model_path and source.lora_path is None and lora:
                log(f"{source.label}: {path} with the adapter switched off")
                return model.answer(prompts, cfg, system_prompt, adapter=False, log=log)
        key = (source.model_path, source.lora_path)
        if key not in self.loaded:
            log(f"loading {source.describe()}")
            self.loaded[key] = LocalModel(source.model_path, source.lora_path)
        return self.loaded[key].answer(prompts, cfg, system_prompt, log=log)

    def perplexity_scorer(self, path: str, system_prompt: str, persona: Persona) -> PerplexityScorer:
        for (model_path, lora), model in self.loaded.items():
            if model_path == path:
                return PerplexityScorer(model.model, model.tokenizer, path, system_prompt, adapter_off=bool(lora),
                                        persona=persona)
        return PerplexityScorer.from_folder(path, system_prompt, persona)


def collect_answers(source: Source, prompts: list[dict] | None, cfg: EvalConfig, persona: Persona, models: _Models,
                    log=print) -> list[dict]:
    if source.kind == "responses":
        rows = load_responses(source.responses, cfg.prompts, persona)
        log(f"{source.label}: {len(rows)} answers from {source.responses}")
        return rows
    if source.kind == "endpoint":
        rows, source.model = answers_from_endpoint(prompts, cfg, source.endpoint, source.model,
                                                   system_prompt(cfg, persona), log)
        return rows
    return models.answers(source, prompts, cfg, system_prompt(cfg, persona), log)


def system_prompt(cfg: EvalConfig, persona: Persona) -> str:
    return cfg.system_prompt if cfg.system_prompt is not None else persona.evaluation_system_prompt


def _ppl_model_path(cfg: EvalConfig) -> str | None:
    return cfg.ppl_model or cfg.model_path or cfg.base_model_path


def evaluate(cfg: EvalConfig, log=print) -> dict:
    """Collect answers, score them, write report.json/.md/.html and charts to cfg.output_dir; return the report."""
    persona = load_persona(cfg.persona)
    primary = primary_source(cfg)
    base = base_source(cfg) if cfg.compare else None
    output_dir = Path(cfg.output_dir)
    new_folders = [folder for folder in (output_dir, *output_dir.parents) if not folder.exists()]
    ensure_writable_folder(output_dir, "--output_dir")  # before the answers: a folder that cannot be written fails at once
    try:
        sides = _scored_sides(cfg, persona, primary, base, output_dir, log)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            log(interrupted_note(output_dir))
        for folder in new_folders:  # a failed evaluation leaves no empty folder it made for the report
            if not any(folder.iterdir()):
                folder.rmdir()
        raise
    report = _assemble(sides, persona)
    paths = write_report(report, output_dir)
    log(summary_text(report))
    log(f"report written to {paths['html']}")
    return report


def _scored_sides(cfg: EvalConfig, persona: Persona, primary: Source, base: Source | None, output_dir: Path,
                  log) -> dict[str, dict]:
    """Each side's answers, collected and scored: the report's parts, before anything is written."""
    models = _Models()
    prompts = None if primary.kind == "responses" else load_prompts(cfg.prompts, persona)
    answers = {primary.label: collect_answers(primary, prompts, cfg, persona, models, log)}
    if base:
        base_prompts = prompts or [prompt_fields(r, r["id"]) for r in answers[primary.label]]
        answers["base"] = collect_answers(base, base_prompts, cfg, persona, models, log)
        refuse_other_prompts(answers[primary.label], answers["base"], base)
    for label, rows in answers.items():
        refuse_if_most_requests_failed(rows, primary if label == primary.label else base, output_dir, log)
    perplexity = _perplexity_scorer(cfg, persona, models, log)
    sides = {}
    for label, rows in answers.items():
        log(f"scoring {label} ({len(rows)} answers) as {persona.title}")
        entries = score_responses(rows, perplexity=perplexity, persona=persona, log=log)
        source = primary if label == primary.label else base
        sides[label] = _side_report(entries, source, cfg, persona, perplexity)
        if cfg.judge_endpoint:
            sides[label]["judge"] = judge_answers(entries, cfg, persona, log)
    return sides


def interrupted_note(output_dir: Path) -> str:
    """What a Ctrl-C before the report is written leaves: no answers kept, the report on disk untouched."""
    previous = output_dir / "report.json"
    on_disk = (f"{previous} is still the previous report, not this run's" if previous.is_file()
               else f"no report was written to {output_dir}")
    return (f"interrupted: the answers collected so far are lost (evaluate keeps none; running the command again asks "
            f"every prompt again); {on_disk}")


def refuse_other_prompts(answers: list[dict], base_answers: list[dict], base: Source) -> None:
    """Base answers read from a file must answer the prompts the other side answered (in any order): a comparison
    of different questions would read as a difference between the models."""
    def asked(rows: list[dict]) -> list[str]:
        return sorted(" ".join(row["prompt"].split()).lower() for row in rows)

    if base.kind != "responses" or asked(answers) == asked(base_answers):
        return
    missing = sorted(set(asked(answers)) - set(asked(base_answers)))
    extra = sorted(set(asked(base_answers)) - set(asked(answers)))
    example = (f"not answered there: {missing[0]!r}" if missing else f"answered only there: {extra[0]!r}") \
        if missing or extra else "some prompts appear a different number of times"
    raise DeepRedError(f"--compare: {base.responses} answers other prompts than the {len(answers)} being compared "
                       f"({len(base_answers)} answers; {example}); give base answers to the same prompts")


def refuse_if_most_requests_failed(rows: list[dict], source: Source, output_dir: Path, log) -> None:
    """More than half of a side's requests failed after their retries: refuse before writing, so the report on disk
    (if any) stays the previous one. A report of mostly 0 % would read like a bad model, not a failing server.
    Up to half failed: a warning, and each failure is scored as a failure, never as a pass."""
    failed = [row for row in rows if row.get("error")]
    if not failed:
        return
    share = "every one" if len(failed) == len(rows) else f"{len(failed)}"
    counts = f"{share} of the {len(rows)} requests to {source.describe()} failed (first: {failed[0]['error']})"
    if 2 * len(failed) > len(rows):
        most = "" if len(failed) == len(rows) else ", more than half"
        raise DeepRedError(f"{counts}{most}; nothing was scored and {output_dir} was not written: check "
                           "that the server is running and serves the model, then run again")
    log(f"warning: {counts}; they are scored as failures in every metric")


def _perplexity_scorer(cfg: EvalConfig, persona: Persona, models: _Models, log) -> PerplexityScorer | None:
    path = _ppl_model_path(cfg)
    if not path:
        return None
    scorer = models.perplexity_scorer(path, system_prompt(cfg, persona), persona)
    if not scorer.informative:
        log(f"note: fluent reference text has perplexity {scorer.reference_perplexity:.0f} under {path} "
            f"(> {PPL_LIMIT:.0f}); perplexity is reported but does not decide coherence")
    return scorer


def _persona_meta(persona: Persona) -> dict:
    return {"name": persona.name, "title": persona.title, "cutoff": persona.cutoff,
            "cutoff_label": persona.cutoff_label, "file": str(persona.file)}


def _side_report(entries: list[dict], source: Source, cfg: EvalConfig, persona: Persona,
                 perplexity: PerplexityScorer | None) -> dict:
    failed = [e for e in entries if e.get("error")]
    side = {**summarize(entries, persona.targets), "responses": entries}
    side["meta"] = {
        "source": source.describe(), "source_kind": source.kind, "model": source.model,
        "persona": _persona_meta(persona),
        "system_prompt": system_prompt(cfg, persona) if source.kind != "responses" else None,
        "prompts": (cfg.prompts or str(persona.prompts_path)) if source.kind != "responses" else source.responses,
        "count": len(entries), "failed_requests": len(failed),
        "perplexity_model": perplexity.name if perplexity else None,
        "perplexity_used_for_coherence": bool(perplexity and perplexity.informative),
        "perplexity_reference": rounded(perplexity.reference_perplexity, 2) if perplexity else None,
    }
    side["failures"] = {
        "count": len(failed),
        "note": "a failed request is counted as not in style, out of character, a temporal violation "
                "(temporal rows) and incoherent; it never counts as a pass",
        "requests": [{"id": e["id"], "error": e["error"], "attempts": e.get("attempts")} for e in failed],
    }
    return side


def _assemble(sides: dict[str, dict], persona: Persona) -> dict:
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if "base" not in sides:
        report = sides["model"]
        report["meta"]["created"] = created
        return report
    difference = {m: _difference(sides["base"][m]["value"], sides["tuned"][m]["value"]) for m in METRICS}
    return {"base": sides["base"], "tuned": sides["tuned"], "difference": difference,
            "meta": {"created": created, "compare": True, "persona": _persona_meta(persona)}}


def _difference(base: float | None, tuned: float | None) -> float | None:
    return round(tuned - base, 4) if base is not None and tuned is not None else None
