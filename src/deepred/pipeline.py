"""Stage 7: one command from dataset to a deployed, evaluated persona (`deepred run`); demo.py runs it offline.

Each stage is a function of its inputs. Before running a stage the pipeline fingerprints those inputs (settings,
and content hashes of the files it reads); `manifest.json` in the run folder keeps, per stage, the fingerprint, the
outputs and their content hash. A re-run skips a stage whose fingerprint and outputs are unchanged, reruns one whose
inputs changed (and says which), and resumes an interrupted training from its newest checkpoint. Downstream stages
hash their upstream outputs, so a retrained adapter invalidates the merge, the GGUFs and the evaluation by itself.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

from .config import (STAGES, ConvertConfig, DeployConfig, EvalConfig, MergeConfig, RunConfig, TrainConfig,
                     settings_with_role)
from .data import resolve_dataset
from .errors import DeepRedError
from .evaluate import evaluate, write_report
from .export.check import check_gguf
from .export.convert import convert
from .files import file_sha256, hash_path, read_json, refuse_output_over_inputs, write_json
from .merge import merge
from .models.registry import is_builtin, resolve_base_model
from .persona import load_persona
from .publish.cards import CardSources, run_command, write_adapter_cards, write_card
from .publish.deploy import deploy
from .records import CARD, MANIFEST, RUN_CONFIG
from .serve import start_server
from .train import train

# Training settings that change what is learned fingerprint the training; how it is computed, logged, saved and
# where it is written do not (config.ROLES).
TRAINING_INPUTS = settings_with_role(TrainConfig, "learns") - {"dataset", "base_model"}  # those two by content


class StageFailed(DeepRedError):
    pass


# ---------------------------------------------------------------------------------------------------------------
# content hashes and the manifest


def content_hash(path: Path) -> str:
    """A file's or folder's content hash; model cards are left out (they are rewritten as later stages finish)."""
    return hash_path(path, ignore=frozenset({CARD}))


@functools.lru_cache(maxsize=8)  # several stages ask; hashing a multi-GB folder once per run is enough
def model_identity(name: str) -> str:
    """A hub name identifies itself; a local folder is identified by its content."""
    path = Path(resolve_base_model(name)).expanduser()
    return f"sha256:{content_hash(path)}" if path.is_dir() else name


def fingerprint(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Manifest:
    path: Path
    stages: dict = field(default_factory=dict)

    @classmethod
    def load(cls, run_dir: Path) -> "Manifest":
        path = run_dir / MANIFEST
        if path.is_file():
            try:
                return cls(path, json.loads(path.read_text()).get("stages", {}))
            except ValueError as exc:
                raise DeepRedError(f"{path} is corrupt ({exc}); delete it to rerun every stage") from exc
        return cls(path)

    def save(self) -> None:
        write_json(self.path, {"stages": self.stages})

    def record(self, stage: str, **values) -> None:
        self.stages.setdefault(stage, {}).update(values, updated=datetime.now().isoformat(timespec="seconds"))
        self.save()


# ---------------------------------------------------------------------------------------------------------------
# the run


@dataclass
class Run:
    cfg: RunConfig
    run_dir: Path
    manifest: Manifest
    log: Callable = print
    outputs: dict = field(default_factory=dict)  # stage -> {name: path}, filled as stages finish or are skipped
    current_fingerprint: str = ""  # of the stage being decided or run

    def path(self, stage: str, name: str) -> Path:
        return Path(self.outputs[stage][name])

    @property
    def base_model(self) -> str:
        return self.cfg.base_model

    def gguf_name(self, quant: str) -> str:
        return "deepred.gguf" if quant == self.cfg.quant_types[0] else f"deepred-{quant}.gguf"


def _train_inputs(run: Run) -> dict:
    dataset, _ = resolve_dataset(run.cfg.dataset)
    settings = {f.name: getattr(run.cfg, f.name) for f in dataclasses.fields(TrainConfig) if f.name in TRAINING_INPUTS}
    return {"dataset_sha256": file_sha256(dataset), "base_model": model_identity(run.base_model), **settings}


def _unfinished_training(previous: dict, fingerprint: str) -> Path | None:
    """The folder of an earlier training on the same inputs that did not finish: resume it rather than restart."""
    folder = previous.get("outputs", {}).get("train_dir")
    same_inputs = previous.get("fingerprint") == fingerprint
    if previous.get("status") in ("running", "interrupted", "failed") and same_inputs and folder and Path(folder).is_dir():
        return Path(folder)
    return None


def _train(run: Run, previous: dict) -> dict:
    unfinished = _unfinished_training(previous, run.current_fingerprint)
    resume = unfinished is not None
    train_dir = unfinished or run.run_dir / f"theme-deepred-{datetime.now():%Y%m%d_%H%M%S}"
    run.manifest.record("train", status="running", fingerprint=run.current_fingerprint,
                        outputs={"train_dir": str(train_dir)})
    settings = {f.name: getattr(run.cfg, f.name) for f in dataclasses.fields(TrainConfig)}
    settings.update(output_dir=str(train_dir), resume_latest=resume)
    # On resume the settings outside the training fingerprint (batch plan, logging) come from the run's record.
    result = train(TrainConfig(**settings), log=run.log, given=settings_with_role(TrainConfig, "learns"), command=None)
    if result.interrupted:
        run.manifest.record("train", status="interrupted")
        raise StageFailed(f"training was interrupted; run the same `deepred run` command again to resume from "
                          f"the newest checkpoint in {train_dir}")
    return {"train_dir": str(train_dir), "adapter": str(result.final_dir)}


def _merge_inputs(run: Run) -> dict:
    return {"adapter": run.manifest.stages["train"]["output_hash"], "base_model": model_identity(run.base_model),
            "dtype": run.cfg.merge_dtype}


def _merge(run: Run, previous: dict) -> dict:
    out = run.run_dir / "merged-deepred"
    merge(MergeConfig(base_model=run.base_model, lora_path=str(run.path("train", "adapter")), output_path=str(out),
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
    return {"ggufs": run.manifest.stages["convert"]["output_hash"], "base_model": model_identity(run.base_model),
            "prompts": prompts, "persona": file_sha256(persona.file), "max_tokens": run.cfg.eval_max_tokens,
            "evaluate": run.cfg.evaluate}


def _evaluate(run: Run, previous: dict) -> dict:
    """Serve base and tuned GGUFs side by side on loopback and score both on the same prompts."""
    out = run.run_dir / "eval"
    if not run.cfg.evaluate:
        out.mkdir(exist_ok=True)
        return {"eval_dir": str(out)}
    quant = run.cfg.quant_types[0]
    base_dir = _local_model_dir(run.base_model)
    base_gguf = run.run_dir / f"base-{quant}.gguf"  # remade each time: the base model may be what changed
    convert(ConvertConfig(model_path=base_dir, output_path=str(base_gguf), quant_type=quant, check=False), log=run.log)
    tuned_gguf = Path(run.outputs["convert"][quant])
    with start_server({"base": base_gguf, "deepred": tuned_gguf}) as server:
        run.log(f"serving base and tuned models at {server.url}")
        # perplexity of both sides' answers under the base model (transformers) is part of coherence
        report = evaluate(EvalConfig(endpoint=server.url, model="deepred", compare=True, base_model_name="base",
                                     prompts=run.cfg.eval_prompts, persona=run.cfg.persona, output_dir=str(out),
                                     ppl_model=base_dir, max_tokens=run.cfg.eval_max_tokens), log=run.log)
    _add_loss_curve(run, report, out)
    return {"eval_dir": str(out), "report": str(out / "report.html")}


def _local_model_dir(name: str) -> str:
    """llama.cpp's converter needs a folder: a hub name resolves to its local snapshot (cached by training)."""
    path = Path(resolve_base_model(name)).expanduser()
    if path.is_dir():
        return str(path)
    from huggingface_hub import snapshot_download

    return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer*"])


def _add_loss_curve(run: Run, report: dict, out: Path) -> None:
    """Rewrite the report with the training loss curve on top (the demo's one-page summary)."""
    curve = run.path("train", "train_dir") / "loss_curve.png"
    if curve.is_file():
        write_report(report, out, extra_html_sections=[("Training loss", curve)])


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
    "train": (_train_inputs, _train),
    "merge": (_merge_inputs, _merge),
    "convert": (_convert_inputs, _convert),
    "check": (_check_inputs, _check),
    "evaluate": (_evaluate_inputs, _evaluate),
    "deploy": (_deploy_inputs, _deploy),
}
assert list(STAGE_FUNCTIONS) == STAGES


def _why_rerun(previous: dict, inputs: dict, forced: bool) -> str | None:
    """None when the stage can be skipped, else the reason it runs."""
    if forced:
        return "--from asked for it"
    if not previous:
        return "first run"
    if previous.get("status") != "done":
        return f"previous attempt {previous.get('status', 'did not finish')}"
    changed = sorted(k for k in set(inputs) | set(previous.get("inputs", {}))
                     if inputs.get(k) != previous.get("inputs", {}).get(k))
    if changed:
        return "inputs changed: " + ", ".join(changed)
    missing = [p for p in previous.get("outputs", {}).values() if not Path(p).exists()]
    if missing:
        return "outputs missing: " + ", ".join(missing)
    if _outputs_hash(previous.get("outputs", {})) != previous.get("output_hash"):
        return "outputs were modified since they were made"
    return None


def _outputs_hash(outputs: dict) -> str:
    """Content hash of a stage's products. `*_dir` entries are locations (checkpoints, logs), not products."""
    return fingerprint({name: content_hash(Path(p)) for name, p in sorted(outputs.items())
                        if not name.endswith("_dir")})


def _check_run_folder(cfg: RunConfig, run_dir: Path) -> None:
    """The run folder may hold only this pipeline's own outputs: never its inputs, never someone else's files."""
    base = None if is_builtin(cfg.base_model) else cfg.base_model  # built-ins live in the cache
    dataset, _ = resolve_dataset(cfg.dataset)
    refuse_output_over_inputs(run_dir, {"base model": base, "dataset": dataset, "evaluation prompts": cfg.eval_prompts},
                              "--output_dir")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not (run_dir / MANIFEST).is_file() and not cfg.force:
        raise DeepRedError(f"--output_dir {run_dir} holds files that are not a `deepred run` folder (no {MANIFEST}); "
                           "choose an empty or new folder, or add --force to write there anyway")


def run_pipeline(cfg: RunConfig, from_stage: str | None = None, log=print) -> Run:
    if from_stage and from_stage not in STAGES:
        raise DeepRedError(f"--from {from_stage}: unknown stage; choose one of {', '.join(STAGES)}")
    run_dir = Path(cfg.output_dir or RunConfig.output_dir)
    _check_run_folder(cfg, run_dir)
    if cfg.evaluate:  # a bad persona file is found now, not after hours of training
        load_persona(cfg.persona)
    run_dir.mkdir(parents=True, exist_ok=True)
    run = Run(cfg, run_dir, Manifest.load(run_dir), log)
    try:
        _run_stages(run, STAGES.index(from_stage) if from_stage else len(STAGES))
    finally:
        write_run_cards(run)  # once: they say what this invocation made or kept, figures included once it evaluated
    _print_summary(run)
    return run


def _run_stages(run: Run, forced_from: int) -> None:
    for index, stage in enumerate(STAGES):
        inputs_of, execute = STAGE_FUNCTIONS[stage]
        previous = run.manifest.stages.get(stage, {})
        try:
            inputs = inputs_of(run)
            run.current_fingerprint = fingerprint(inputs)
            reason = _why_rerun(previous, inputs, forced=index >= forced_from)
            if reason is None:
                run.log(f"[{stage}] skipped: inputs unchanged, outputs present")
                run.outputs[stage] = previous["outputs"]
                continue
            run.log(f"[{stage}] running ({reason})")
            outputs = execute(run, previous)
        except StageFailed:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure names its stage
            run.manifest.record(stage, status="failed", error=str(exc).splitlines()[0] if str(exc) else repr(exc))
            failed = StageFailed(f"stage '{stage}' failed: {exc}. Everything before it is kept in {run.run_dir}; fix "
                                 f"the problem and run the same command again to resume (or add --from {stage})")
            failed.exit_code = getattr(exc, "exit_code", StageFailed.exit_code)  # bad data stays exit 1
            raise failed from exc
        run.outputs[stage] = outputs
        run.manifest.record(stage, status="done", fingerprint=run.current_fingerprint, inputs=inputs,
                            outputs=outputs, output_hash=_outputs_hash(outputs), error=None)


def write_run_cards(run: Run) -> None:
    """Cards in the adapter's final/ (and its training folder), merged-deepred/ and the run folder beside the GGUFs,
    from the stages this invocation has run or kept: a card never shows figures of an earlier model."""
    outputs = run.outputs
    if "train" not in outputs:
        return
    train_dir = Path(outputs["train"]["train_dir"])
    report_html = outputs.get("evaluate", {}).get("report")
    report = read_json(Path(report_html).with_name("report.json")) if report_html else None
    dataset = read_json(train_dir / RUN_CONFIG).get("dataset")
    sources = CardSources(run.base_model, train_dir, report or None, run.cfg.persona,
                          commands=[run_command(run.cfg, dataset)])
    write_adapter_cards(train_dir, sources)
    if "merge" in outputs:
        write_card(Path(outputs["merge"]["merged"]), "merged", sources)
    if "convert" in outputs:
        ggufs = [Path(outputs["convert"][quant]) for quant in run.cfg.quant_types if quant in outputs["convert"]]
        write_card(run.run_dir, "gguf", dataclasses.replace(sources, files=ggufs), replace_foreign=False, log=run.log)


def _print_summary(run: Run) -> None:
    log = run.log
    log(f"\nrun folder: {run.run_dir}  (stages and hashes in {run.manifest.path})")
    for stage in STAGES:
        for name, path in run.outputs.get(stage, {}).items():
            log(f"  {stage:9s} {name:10s} {path}")
