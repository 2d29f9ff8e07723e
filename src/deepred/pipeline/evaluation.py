"""The evaluate stage of `deepred run`: base and tuned GGUFs served on loopback and scored on the same prompts, the
evaluation prompts and then the persona's held-out prompts.

The base model's answers are kept once per machine (`$DEEPRED_CACHE/base-answers/`), keyed by everything that
decides them: the base model's content, the quantisation, the prompt file, the persona file (its system prompt),
the answer length and llama-cpp-python's version. A second run on the same base (another seed, another learning
rate) asks only the tuned model; a cache file that cannot be read is asked again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..config import ConvertConfig, EvalConfig
from ..errors import DeepRedError
from ..evaluate import evaluate, load_responses, write_report
from ..evaluate.report_text import sets_html
from ..export.convert import convert
from ..files import file_sha256, write_atomic
from ..llama_runtime import llama_cpp_version
from ..models.cache import cache_dir
from ..models.registry import local_model_dir
from ..persona import Persona, load_persona
from ..prompts import load_prompts
from ..serve import ServerHandle, start_server
from .manifest import Run, model_identity

CACHED_FIELDS = ("id", "category", "prompt", "response")


def evaluate_inputs(run: Run) -> dict:
    persona = load_persona(run.cfg.persona)
    prompts = file_sha256(run.cfg.eval_prompts or persona.prompts_path)
    heldout = file_sha256(persona.heldout_prompts_path) if persona.heldout_prompts_path and run.cfg.eval_heldout \
        else None
    return {"ggufs": run.manifest.stages["convert"]["output_hash"], "base_model": model_identity(run.base_model),
            "prompts": prompts, "heldout_prompts": heldout, "persona": file_sha256(persona.file),
            "max_tokens": run.cfg.eval_max_tokens, "evaluate": run.cfg.evaluate}


def evaluate_stage(run: Run, previous: dict) -> dict:
    out = run.run_dir / "eval"
    if not run.cfg.evaluate:
        out.mkdir(exist_ok=True)
        return {"eval_dir": str(out)}
    persona = load_persona(run.cfg.persona)
    sets = {"evaluation prompts": (Path(run.cfg.eval_prompts or persona.prompts_path), out)}
    if run.cfg.eval_heldout and persona.heldout_prompts_path:
        sets["held-out prompts"] = (Path(persona.heldout_prompts_path), out / "heldout")
    kept = {name: base_answers_file(run, persona, prompts) for name, (prompts, _) in sets.items()}
    cached = {name: path for name, path in kept.items() if readable_answers(path, sets[name][0], persona, run.log)}
    reports = {}
    with _server(run, ask_base=len(cached) < len(sets)) as server:
        for name, (prompts, folder) in sets.items():
            if name == "held-out prompts":
                run.log("the held-out prompts:")
            if name in cached:
                run.log(f"the base model's answers to the {name}: kept from an earlier run ({cached[name]})")
                base_side = {"base_responses": str(cached[name])}
            else:
                base_side = {"base_model_name": "base"}
            # perplexity of both sides' answers under the base model (transformers) is part of coherence
            reports[name] = evaluate(EvalConfig(endpoint=server.url, model="deepred", compare=True, **base_side,
                                                prompts=str(prompts), persona=run.cfg.persona,
                                                output_dir=str(folder), ppl_model=local_model_dir(run.base_model),
                                                max_tokens=run.cfg.eval_max_tokens), log=run.log)
            if name not in cached:
                keep_base_answers(reports[name], kept[name])
    _add_report_sections(run, reports, out)
    return {"eval_dir": str(out), "report": str(out / "report.html")}


def _server(run: Run, ask_base: bool) -> ServerHandle:
    """One llama.cpp server on loopback: the tuned GGUF as `deepred`, and the base GGUF as `base` when the base
    must be asked. (Two servers on half the cores each, asked at once, took as long on 2 cores: 444 s against 442 s
    for the demo's evaluation.)"""
    quant = run.cfg.quant_types[0]
    models = {"deepred": Path(run.outputs["convert"][quant])}
    if ask_base:
        base_gguf = run.run_dir / f"base-{quant}.gguf"  # remade each time: the base model may be what changed
        convert(ConvertConfig(model_path=local_model_dir(run.base_model), output_path=str(base_gguf),
                              quant_type=quant, check=False), log=run.log)
        models = {"base": base_gguf, **models}
    server = start_server(models)
    run.log(f"serving {'base and tuned models' if ask_base else 'the tuned model'} at {server.url}")
    return server


def base_answers_file(run: Run, persona: Persona, prompts: Path) -> Path:
    """Where the base model's answers to `prompts` are kept: named by everything that decides them."""
    identity = {"base": model_identity(run.base_model), "quant_type": run.cfg.quant_types[0],
                "prompts": file_sha256(prompts), "persona": file_sha256(persona.file),
                "max_tokens": run.cfg.eval_max_tokens, "temperature": EvalConfig().temperature,
                "llama_cpp": llama_cpp_version()}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "base-answers" / f"{digest}.jsonl"


def readable_answers(path: Path, prompts: Path, persona: Persona, log) -> bool:
    """A kept answer file that loads and answers exactly the prompts, in order; anything else is asked again."""
    if not path.is_file():
        return False
    try:
        answered = [row["id"] for row in load_responses(path, prompts, persona)]
    except DeepRedError as exc:
        log(f"the kept base answers {path} cannot be read ({exc}); asking the base model again")
        return False
    if answered != [row["id"] for row in load_prompts(str(prompts), persona)]:
        log(f"the kept base answers {path} do not answer the prompts of {prompts}; asking the base model again")
        return False
    return True


def keep_base_answers(report: dict, path: Path) -> None:
    """The base side's answers, kept when every request was answered (a failed one is asked again next time)."""
    answers = report["base"]["responses"]
    if any(entry.get("error") for entry in answers):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(json.dumps({k: entry[k] for k in CACHED_FIELDS}, ensure_ascii=False) + "\n"
                               for entry in answers))


def _add_report_sections(run: Run, reports: dict[str, dict], out: Path) -> None:
    """Rewrite the report with the two prompt sets side by side and the training loss curve (the demo's one-page
    summary)."""
    sections = []
    if len(reports) > 1:
        sections.append({"title": "Evaluation and held-out prompts", "html": sets_html(reports),
                         "caption": "The held-out prompts are asked of both models but never used by training data, "
                                    "pair generation or a tuning decision; their answers are in heldout/report.html."})
    curve = run.path("train", "train_dir") / "loss_curve.png"
    if curve.is_file():
        sections.append(("Training loss", curve))
    if sections:
        write_report(reports["evaluation prompts"], out, extra_html_sections=sections)
