"""`deepred run`: the stages in order, each skipped when its inputs are unchanged and its outputs present, rerun
when they changed, resumed when interrupted; the run's model cards once it ends or stops."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..config import STAGES, RunConfig
from ..data import resolve_dataset
from ..errors import DeepRedError, sigterm_as_interrupt
from ..files import LOCK, folder_lock, read_json, refuse_output_over_inputs
from ..models.registry import is_builtin
from ..pairs_data import load_pairs_for_training
from ..persona import load_persona
from ..prompts import refuse_evaluation_prompts
from ..publish.cards import CardSources, run_command, write_adapter_cards, write_card
from ..records import MANIFEST, RUN_CONFIG
from .manifest import Manifest, Run, RunInterrupted, StageFailed, fingerprint, outputs_hash, why_rerun
from .stages import STAGE_FUNCTIONS

# Horizon rows `deepred run` adds when the persona file has a horizon and --horizon_examples is not given: the
# demo's measured setting (README, "SFT and preference training").
RUN_HORIZON_EXAMPLES = 200


def with_horizon_default(cfg: RunConfig, persona) -> RunConfig:
    """--horizon_examples as given, or RUN_HORIZON_EXAMPLES when the persona file has a horizon to make them from."""
    if cfg.horizon_examples is not None:
        return cfg
    return dataclasses.replace(cfg, horizon_examples=RUN_HORIZON_EXAMPLES if persona.horizon else 0)


# settings that name files or folders: YAML does not expand `~` as a shell does, so the run does it once for all
RUN_PATH_SETTINGS = ("output_dir", "base_model", "dataset", "pairs", "eval_prompts", "persona", "period_answers",
                     "models_dir")


def with_expanded_paths(cfg: RunConfig) -> RunConfig:
    return dataclasses.replace(cfg, **{name: str(Path(value).expanduser()) for name in RUN_PATH_SETTINGS
                                       if isinstance(value := getattr(cfg, name), str) and value.startswith("~")})


def _check_run_folder(cfg: RunConfig, run_dir: Path) -> None:
    """The run folder may never hold this pipeline's inputs."""
    base = None if is_builtin(cfg.base_model) else cfg.base_model  # built-ins live in the cache
    dataset, _ = resolve_dataset(cfg.dataset)
    refuse_output_over_inputs(run_dir, {"base model": base, "dataset": dataset, "evaluation prompts": cfg.eval_prompts},
                              "--output_dir")


def _refuse_foreign_files(cfg: RunConfig, run_dir: Path) -> None:
    """Nor someone else's files (checked under the lock, which is ours)."""
    foreign = any(p.name != LOCK for p in run_dir.iterdir())
    if foreign and not (run_dir / MANIFEST).is_file() and not cfg.force:
        raise DeepRedError(f"--output_dir {run_dir} holds files that are not a `deepred run` folder (no {MANIFEST}); "
                           "choose an empty or new folder, or add --force to write there anyway")


def run_pipeline(cfg: RunConfig, from_stage: str | None = None, log=print) -> Run:
    if from_stage and from_stage not in STAGES:
        raise DeepRedError(f"--from {from_stage}: unknown stage; choose one of {', '.join(STAGES)}")
    if cfg.method != "sft":
        raise DeepRedError(f"--method {cfg.method}: `deepred run` trains SFT first; add --preference {cfg.method} for "
                           "preference training of the same LoRA after it")
    # absolute: the manifest's outputs, the cards' and the resume command's paths hold from any folder (a rerun
    # from elsewhere retrained every stage)
    cfg = with_expanded_paths(cfg)
    run_dir = Path(cfg.output_dir or RunConfig.output_dir).absolute()
    cfg = dataclasses.replace(cfg, output_dir=str(run_dir))
    _check_run_folder(cfg, run_dir)
    if cfg.evaluate or cfg.preference != "none" or cfg.horizon_examples is None:  # a bad persona file is found now,
        cfg = with_horizon_default(cfg, load_persona(cfg.persona))               # not after hours of training
    if cfg.preference != "none" and not cfg.pairs and not (cfg.pair_voice + cfg.pair_horizon + cfg.pair_period
                                                          + cfg.pair_present):
        raise DeepRedError(f"--preference {cfg.preference}: --pair_voice, --pair_horizon, --pair_period and "
                           "--pair_present are all 0, so there are no pairs to train on; ask for some or pass "
                           "--pairs FILE")
    if cfg.preference != "none" and cfg.pairs:  # and pairs that are malformed or ask an evaluation prompt
        report, _ = load_pairs_for_training(cfg.pairs, cfg.skip_invalid, lambda *a: None)
        refuse_evaluation_prompts(report.pairs, load_persona(cfg.persona), report.path)
    with folder_lock(run_dir, "--output_dir", log), sigterm_as_interrupt():  # a second run is refused here
        _refuse_foreign_files(cfg, run_dir)
        run = Run(cfg, run_dir, Manifest.load(run_dir), log)
        try:
            _run_stages(run, STAGES.index(from_stage) if from_stage else len(STAGES))
        except (KeyboardInterrupt, RunInterrupted) as exc:
            stopped = str(exc) if isinstance(exc, RunInterrupted) else "interrupted"
            raise RunInterrupted(f"{stopped}; the finished stages are kept in {run_dir}. Resume with: "
                                 f"{run_command(cfg, None)}") from exc
        finally:
            write_run_cards(run)  # once: what this invocation made or kept, figures included once it evaluated
        _print_summary(run)
    return run


def _run_stages(run: Run, forced_from: int) -> None:
    for index, stage in enumerate(STAGES):
        inputs_of, execute = STAGE_FUNCTIONS[stage]
        previous = run.manifest.stages.get(stage, {})
        try:
            inputs = inputs_of(run)
            run.current_fingerprint = fingerprint(inputs)
            reason = why_rerun(previous, inputs, forced=index >= forced_from)
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
                            outputs=outputs, output_hash=outputs_hash(outputs), error=None)


def write_run_cards(run: Run) -> None:
    """Cards in the adapter's final/ (and its training folder), merged-deepred/ and the run folder beside the GGUFs,
    from the stages this invocation has run or kept: a card never shows figures of an earlier model."""
    outputs = run.outputs
    if "train" not in outputs:
        return
    stage = "prefer" if outputs.get("prefer") else "train"
    train_dir = Path(outputs[stage]["train_dir"])
    report_html = outputs.get("evaluate", {}).get("report")
    report = read_json(Path(report_html).with_name("report.json")) if report_html else None
    dataset = read_json(Path(outputs["train"]["train_dir"]) / RUN_CONFIG).get("dataset")  # SFT's, not the pairs
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
