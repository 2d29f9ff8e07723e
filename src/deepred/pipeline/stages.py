"""The stages of `deepred run` after training, and the table of every stage: (inputs of the fingerprint, the work)
in the order they run."""

from __future__ import annotations

from pathlib import Path

from ..config import STAGES, ConvertConfig, DeployConfig, MergeConfig
from ..export.check import check_gguf
from ..export.convert import convert
from ..files import file_sha256, write_json
from ..merge import merge
from ..persona import load_persona
from ..publish.deploy import deploy
from .evaluation import evaluate_inputs, evaluate_stage
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
    remove_stale_ggufs(run, previous.get("outputs", {}), outputs)
    return outputs


def remove_stale_ggufs(run: Run, before: dict, now: dict) -> None:
    """GGUFs an earlier convert of this run wrote that this one did not (a type dropped from --quant_types, or one
    whose name moved when the order changed) came from an earlier merge: left there, they would pass for this one."""
    for stale in sorted(set(before.values()) - set(now.values())):
        path = Path(stale)
        if path.is_file() and path.parent == run.run_dir:
            path.unlink()
            run.log(f"removed {path.name}: an earlier convert of this run wrote it, and --quant_types no longer "
                    "makes it")


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


def _deploy_place(run: Run) -> dict:
    """Which model goes where: the GGUF (by content), the name and the target."""
    return {"gguf": run.manifest.stages["convert"]["output_hash"], "name": run.cfg.name,
            "models_dir": run.cfg.models_dir, "target": run.cfg.deploy_target}


def _deploy_inputs(run: Run) -> dict:
    inputs = {**_deploy_place(run), "deploy": run.cfg.deploy, "persona": run.cfg.persona}
    if run.cfg.deploy and run.cfg.deploy_target == "ollama":  # its system prompt goes into the Modelfile
        inputs["persona_sha256"] = file_sha256(load_persona(run.cfg.persona).file)
    return inputs


def _deploy(run: Run, previous: dict) -> dict:
    if not run.cfg.deploy:
        return {}
    first = run.outputs["convert"][run.cfg.quant_types[0]]
    attempt = _deploy_place(run)
    # this run's own deployment of this GGUF under this name (done, or created before a later step failed) is
    # replaced without --force; another model under the name, a retrained one included, still needs it
    ours = attempt in (previous.get("attempt"), {key: previous.get("inputs", {}).get(key) for key in attempt})
    run.manifest.record("deploy", attempt=attempt)
    deployed = deploy(DeployConfig(gguf=first, name=run.cfg.name, models_dir=run.cfg.models_dir,
                                   force=run.cfg.force or ours, target=run.cfg.deploy_target, persona=run.cfg.persona),
                      log=run.log)
    return {"deployed": str(deployed)}


STAGE_FUNCTIONS = {
    "train": (train_inputs, train_stage),
    "pairs": (pairs_inputs, pairs_stage),
    "prefer": (prefer_inputs, prefer_stage),
    "merge": (_merge_inputs, _merge),
    "convert": (_convert_inputs, _convert),
    "check": (_check_inputs, _check),
    "evaluate": (evaluate_inputs, evaluate_stage),
    "deploy": (_deploy_inputs, _deploy),
}
assert list(STAGE_FUNCTIONS) == STAGES
