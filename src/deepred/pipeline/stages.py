"""The stages of `deepred run` after training, and the table of every stage: (inputs of the fingerprint, the work)
in the order they run."""

from __future__ import annotations

from pathlib import Path

from ..config import STAGES, ConvertConfig, DeployConfig, EvalConfig, MergeConfig
from ..evaluate import evaluate, write_report
from ..evaluate.report_text import sets_html
from ..export.check import check_gguf
from ..export.convert import convert
from ..files import file_sha256, write_json
from ..merge import merge
from ..models.registry import local_model_dir
from ..persona import load_persona
from ..publish.deploy import deploy
from ..serve import start_server
from .manifest import Run, model_identity
from .training import (final_adapter, pairs_inputs, pairs_stage, prefer_inputs, prefer_stage, train_inputs,
                       train_stage)


def _merge_inputs(run: Run) -> dict:
    stage, _ = final_adapter(run)
    return {"adapter": run.manifest.stages[stage]["output_hash"], "base_model": model_identity(run.base_model),
            "dtype": run.cfg.merge_dtype}


def _merge(run: Run, previous: dict) -> dict:
    out = run.run_dir / "merged-deepred"
    _, adapter = final_adapter(run)
    merge(MergeConfig(base_model=run.base_model, lora_path=str(adapter), output_path=str(out),
                      dtype=run.cfg.merge_dtype, trust_remote_code=run.cfg.trust_remote_code, force=True,
                      persona=run.cfg.persona), log=run.log)  # force: merged-deepred/ is this pipeline's own output
    return {"merged": str(out)}


def _convert_inputs(run: Run) -> dict:
    return {"merged": run.manifest.stages["merge"]["output_hash"], "quant_types": run.cfg.quant_types}


def _convert(run: Run, previous: dict) -> dict:
    outputs = {}
    for quant in run.cfg.quant_types:
        target = run.run_dir / run.gguf_name(quant)
        # a quantised type's lossless intermediate is held to the strict bound here; the check stage does the rest
        convert(ConvertConfig(model_path=str(run.path("merge", "merged")), output_path=str(target), quant_type=quant,
                              check=run.cfg.check), log=run.log, check_final=False)
        outputs[quant] = str(target)
    return outputs


def _check_inputs(run: Run) -> dict:
    return {"ggufs": run.manifest.stages["convert"]["output_hash"], "check": run.cfg.check}


def _check(run: Run, previous: dict) -> dict:
    results = {}
    if run.cfg.check:
        for quant, gguf in run.outputs["convert"].items():
            results[quant] = check_gguf(Path(gguf), run.path("merge", "merged"), log=run.log)
    target = run.run_dir / "parity.json"
    write_json(target, results)
    return {"parity": str(target)}


def _evaluate_inputs(run: Run) -> dict:
    persona = load_persona(run.cfg.persona)
    prompts = file_sha256(run.cfg.eval_prompts or persona.prompts_path)
    heldout = file_sha256(persona.heldout_prompts_path) if persona.heldout_prompts_path and run.cfg.eval_heldout \
        else None
    return {"ggufs": run.manifest.stages["convert"]["output_hash"], "base_model": model_identity(run.base_model),
            "prompts": prompts, "heldout_prompts": heldout, "persona": file_sha256(persona.file),
            "max_tokens": run.cfg.eval_max_tokens, "evaluate": run.cfg.evaluate}


def _evaluate(run: Run, previous: dict) -> dict:
    """Serve base and tuned GGUFs side by side on loopback and score both on the same prompts: the evaluation
    prompts, then the persona's held-out prompts, which no training data or tuning decision uses."""
    out = run.run_dir / "eval"
    if not run.cfg.evaluate:
        out.mkdir(exist_ok=True)
        return {"eval_dir": str(out)}
    quant = run.cfg.quant_types[0]
    base_dir = local_model_dir(run.base_model)
    base_gguf = run.run_dir / f"base-{quant}.gguf"  # remade each time: the base model may be what changed
    convert(ConvertConfig(model_path=base_dir, output_path=str(base_gguf), quant_type=quant, check=False), log=run.log)
    tuned_gguf = Path(run.outputs["convert"][quant])
    heldout = load_persona(run.cfg.persona).heldout_prompts_path if run.cfg.eval_heldout else None
    with start_server({"base": base_gguf, "deepred": tuned_gguf}) as server:
        run.log(f"serving base and tuned models at {server.url}")

        def scored(prompts: str | None, folder: Path) -> dict:
            # perplexity of both sides' answers under the base model (transformers) is part of coherence
            return evaluate(EvalConfig(endpoint=server.url, model="deepred", compare=True, base_model_name="base",
                                       prompts=prompts, persona=run.cfg.persona, output_dir=str(folder),
                                       ppl_model=base_dir, max_tokens=run.cfg.eval_max_tokens), log=run.log)

        reports = {"evaluation prompts": scored(run.cfg.eval_prompts, out)}
        if heldout:
            run.log("the held-out prompts:")
            reports["held-out prompts"] = scored(str(heldout), out / "heldout")
    _add_report_sections(run, reports, out)
    return {"eval_dir": str(out), "report": str(out / "report.html")}


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


def _deploy_inputs(run: Run) -> dict:
    return {"gguf": run.manifest.stages["convert"]["output_hash"], "deploy": run.cfg.deploy, "name": run.cfg.name,
            "models_dir": run.cfg.models_dir, "target": run.cfg.deploy_target, "persona": run.cfg.persona}


def _deploy(run: Run, previous: dict) -> dict:
    if not run.cfg.deploy:
        return {}
    first = run.outputs["convert"][run.cfg.quant_types[0]]
    deployed = deploy(DeployConfig(gguf=first, name=run.cfg.name, models_dir=run.cfg.models_dir,
                                   force=run.cfg.force, target=run.cfg.deploy_target, persona=run.cfg.persona),
                      log=run.log)
    return {"deployed": str(deployed)}


STAGE_FUNCTIONS = {
    "train": (train_inputs, train_stage),
    "pairs": (pairs_inputs, pairs_stage),
    "prefer": (prefer_inputs, prefer_stage),
    "merge": (_merge_inputs, _merge),
    "convert": (_convert_inputs, _convert),
    "check": (_check_inputs, _check),
    "evaluate": (_evaluate_inputs, _evaluate),
    "deploy": (_deploy_inputs, _deploy),
}
assert list(STAGE_FUNCTIONS) == STAGES
