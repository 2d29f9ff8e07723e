"""The training stages of `deepred run`: SFT (train), preference pairs (pairs) and preference training on the same
LoRA (prefer). A stage that was interrupted resumes from its newest checkpoint when its inputs are unchanged."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from pathlib import Path

from ..config import PairsConfig, RecallConfig, TrainConfig, settings_with_role
from ..data import resolve_dataset
from ..files import file_sha256
from ..pairs import PAIRS_RECIPE, make_pairs, recall
from ..pairs_data import load_pairs_for_training
from ..persona import load_persona
from ..prompts import refuse_evaluation_prompts
from ..train import train
from .manifest import Run, RunInterrupted, model_identity

# Training settings that change what is learned fingerprint the training; how it is computed, logged, saved and
# where it is written do not (config.ROLES).
# The train stage is always SFT: what the preference stage uses is its own input (PREFERENCE_SETTINGS).
TRAINING_INPUTS = settings_with_role(TrainConfig, "learns") - {"dataset", "base_model", "pairs", "init_adapter", "method",
                                                              "beta"}
# The preference stage's own settings: what it trains on and how long (`train`'s learning rate is SFT's).
PREFERENCE_SETTINGS = ("preference", "prefer_steps", "prefer_learning_rate", "beta")


# --period_answers of `deepred run`: ask the base model first (`deepred recall`), or the persona file's own answers
OWN_ANSWERS, PERSONA_ANSWERS = "own", "persona"


def train_inputs(run: Run) -> dict:
    dataset, _ = resolve_dataset(run.cfg.dataset)
    settings = {f.name: getattr(run.cfg, f.name) for f in dataclasses.fields(TrainConfig) if f.name in TRAINING_INPUTS}
    if settings["neftune_noise_alpha"] is None:  # runs made before the setting keep their fingerprint
        del settings["neftune_noise_alpha"]
    inputs = {"dataset_sha256": file_sha256(dataset), "base_model": model_identity(run.base_model), **settings}
    if run.cfg.horizon_examples > 0:  # the examples are made from the persona file's horizon
        inputs["persona_sha256"] = file_sha256(load_persona(run.cfg.persona).file)
        if run.cfg.period_answers not in (None, OWN_ANSWERS, PERSONA_ANSWERS):
            inputs["period_answers_sha256"] = file_sha256(run.cfg.period_answers)
    return inputs


def period_answers_file(run: Run) -> str | None:
    """The file of the model's own period answers the horizon rows use: asked now for `own` (cached by base model
    and persona), the user's file, or none (the persona file's answers)."""
    choice = run.cfg.period_answers
    if run.cfg.horizon_examples <= 0 or choice in (None, PERSONA_ANSWERS):
        return None
    if choice != OWN_ANSWERS:
        return choice
    target = run.run_dir / "period_answers.jsonl"
    recall(RecallConfig(output=str(target), base_model=run.base_model, persona=run.cfg.persona,
                        quant_type=run.cfg.quant_types[0]), log=run.log)
    return str(target)


def unfinished_run(previous: dict, fingerprint: str) -> Path | None:
    """The folder of an earlier training on the same inputs that did not finish: resume it rather than restart."""
    folder = previous.get("outputs", {}).get("train_dir")
    same_inputs = previous.get("fingerprint") == fingerprint
    if previous.get("status") in ("running", "interrupted", "failed") and same_inputs and folder and Path(folder).is_dir():
        return Path(folder)
    return None


def run_training(run: Run, stage: str, previous: dict, prefix: str, **overrides) -> dict:
    """One training (SFT or DPO) into a timestamped folder of the run, or the unfinished one resumed."""
    unfinished = unfinished_run(previous, run.current_fingerprint)
    train_dir = unfinished or run.run_dir / f"{prefix}-{datetime.now():%Y%m%d_%H%M%S}"
    run.manifest.record(stage, status="running", fingerprint=run.current_fingerprint,
                        outputs={"train_dir": str(train_dir)})
    settings = {f.name: getattr(run.cfg, f.name) for f in dataclasses.fields(TrainConfig)}
    settings.update(overrides, output_dir=str(train_dir), resume_latest=unfinished is not None)
    # On resume the settings outside the training fingerprint (batch plan, logging) come from the run's record.
    given = settings_with_role(TrainConfig, "learns") | set(overrides)
    result = train(TrainConfig(**settings), log=run.log, given=given, command=None)
    if result.interrupted:
        run.manifest.record(stage, status="interrupted")
        raise RunInterrupted(f"training was interrupted; it resumes from the newest checkpoint in {train_dir}")
    return {"train_dir": str(train_dir), "adapter": str(result.final_dir)}


def train_stage(run: Run, previous: dict) -> dict:
    return run_training(run, "train", previous, "theme-deepred", method="sft", pairs=None,
                        period_answers=period_answers_file(run))


def pairs_inputs(run: Run) -> dict:
    if run.cfg.preference == "none":
        return {"preference": "none"}
    if run.cfg.pairs:
        return {"pairs_file": file_sha256(run.cfg.pairs)}
    dataset, _ = resolve_dataset(run.cfg.dataset)
    return {"recipe": PAIRS_RECIPE, "dataset_sha256": file_sha256(dataset),
            "base_model": model_identity(run.base_model), "persona": file_sha256(load_persona(run.cfg.persona).file),
            "voice": run.cfg.pair_voice, "horizon": run.cfg.pair_horizon, "period": run.cfg.pair_period,
            **({"present": run.cfg.pair_present} if run.cfg.pair_present else {}),  # runs made before it keep theirs
            "seed": run.cfg.seed, "quant_type": run.cfg.quant_types[0]}


def pairs_stage(run: Run, previous: dict) -> dict:
    """The pairs the preference stage trains on: the user's --pairs, or made by `deepred pairs` (cached)."""
    if run.cfg.preference == "none":
        run.log("  nothing to do: no --preference (orpo or dpo trains the adapter on pairs after SFT)")
        return {}
    persona = load_persona(run.cfg.persona)
    if run.cfg.pairs:
        report, _ = load_pairs_for_training(run.cfg.pairs, run.cfg.skip_invalid, run.log)
        refuse_evaluation_prompts(report.pairs, persona, report.path)
        return {"pairs": run.cfg.pairs}
    target = run.run_dir / "pairs.jsonl"
    make_pairs(PairsConfig(output=str(target), base_model=run.base_model, dataset=run.cfg.dataset,
                           persona=run.cfg.persona, voice=run.cfg.pair_voice, horizon=run.cfg.pair_horizon,
                           period=run.cfg.pair_period, present=run.cfg.pair_present,
                           seed=run.cfg.seed, quant_type=run.cfg.quant_types[0]), log=run.log)
    return {"pairs": str(target)}


def prefer_inputs(run: Run) -> dict:
    if run.cfg.preference == "none":
        return {"preference": "none"}
    return {"adapter": run.manifest.stages["train"]["output_hash"], "pairs": run.manifest.stages["pairs"]["output_hash"],
            **{name: getattr(run.cfg, name) for name in PREFERENCE_SETTINGS}}


def prefer_stage(run: Run, previous: dict) -> dict:
    """Preference training of the SFT adapter itself (it goes on training the same LoRA)."""
    if run.cfg.preference == "none":
        run.log("  nothing to do: no --preference")
        return {}
    return run_training(run, "prefer", previous, "prefer-deepred", method=run.cfg.preference,
                        pairs=str(run.path("pairs", "pairs")), init_adapter=str(run.path("train", "adapter")),
                        max_steps=run.cfg.prefer_steps, learning_rate=run.cfg.prefer_learning_rate,
                        horizon_examples=0, period_answers=None, max_samples=None, neftune_noise_alpha=None)


def final_adapter(run: Run) -> tuple[str, Path]:
    """The stage whose adapter is the run's model (prefer when it ran, else train) and that adapter."""
    stage = "prefer" if run.outputs.get("prefer") else "train"
    return stage, run.path(stage, "adapter")
