"""The training folder: where a run writes, its checkpoints, and resuming it with the settings it recorded."""

from __future__ import annotations

import dataclasses
import json
import shlex
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from ..config import TrainConfig, settings_with_role
from ..errors import DeepRedError
from ..files import atomic_folder, read_json
from ..models.loading import adapter_trained_on
from ..records import FINAL, RUN_CONFIG, TRAIN_RESULTS, with_absolute_paths

CHECKPOINT_PREFIX = "checkpoint-"
# Settings a resumed run may change (where and how often it logs and saves); every other setting is restored from
# run_config.json, and giving a different value for one of them on resume is refused.
RESUME_FREE_SETTINGS = settings_with_role(TrainConfig, "bookkeeping", "invocation")
LOCATION_SETTINGS = {"output_dir", "resume_latest", "resume_from_checkpoint"}


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path | None  # None when the run was interrupted before finishing
    metrics: dict
    interrupted: bool = False
    main_process: bool = True  # under torchrun, the one process that writes the run folder


def default_output_dir() -> Path:
    return Path("output") / f"theme-deepred-{datetime.now():%Y%m%d_%H%M%S}"


def newest_run_dir() -> Path | None:
    runs = sorted(Path("output").glob("theme-deepred-*"), key=lambda p: p.name)
    return runs[-1] if runs else None


def is_valid_checkpoint(path: Path) -> bool:
    """The Trainer writes trainer_state.json last, so its presence means the checkpoint is complete."""
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return (path / "adapter_model.safetensors").is_file() and (path / "optimizer.pt").is_file()


def latest_checkpoint(output_dir: Path) -> Path | None:
    candidates = []
    for path in output_dir.glob(f"{CHECKPOINT_PREFIX}*"):
        suffix = path.name[len(CHECKPOINT_PREFIX):]
        if suffix.isdigit() and is_valid_checkpoint(path):
            candidates.append((int(suffix), path))
    return max(candidates)[1] if candidates else None


def choose_output_dir(cfg: TrainConfig, log) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir)
    if cfg.resume_latest:
        newest = newest_run_dir()
        if newest:
            log(f"--resume_latest without --output_dir: using the newest run {newest}")
            return newest
    return default_output_dir()


def agree_across_ranks(state, output_dir: Path) -> Path:
    """Under torchrun every rank must use rank 0's timestamped folder name."""
    if state.num_processes == 1:
        return output_dir
    from accelerate.utils import broadcast_object_list

    holder = [str(output_dir)]
    broadcast_object_list(holder, from_process=0)
    return Path(holder[0])


def recorded_run(cfg: TrainConfig, output_dir: Path) -> dict | None:
    """run_config.json of the run being resumed (in --output_dir, or beside --resume_from_checkpoint); None when
    not resuming or nothing was recorded."""
    if not (cfg.resume_from_checkpoint or cfg.resume_latest):
        return None
    folder = Path(cfg.resume_from_checkpoint).parent if cfg.resume_from_checkpoint else output_dir
    return read_json(folder / RUN_CONFIG) or None


def resumed_config(cfg: TrainConfig, given: set[str], recorded: dict, log) -> TrainConfig:
    """The run's recorded settings, with the logging/saving settings the user gave now.

    A resumed run must be the run that was interrupted: batch plan, length, schedule, LoRA, data sample, split and
    seed come from run_config.json. Giving one of them with a different value is refused, naming both values.
    """
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    settings = with_absolute_paths({k: v for k, v in recorded.get("config", {}).items() if k in fields})
    settings["dataset"] = recorded.get("dataset") or settings.get("dataset")  # the file it trained on
    typed = with_absolute_paths(dataclasses.asdict(cfg))  # a relative path names the recorded absolute one
    for name in sorted(given - RESUME_FREE_SETTINGS):
        if name in settings and name != "dataset" and differs(typed[name], settings[name]):
            raise DeepRedError(f"--{name} {shown(getattr(cfg, name))}: this run was started with --{name} "
                               f"{shown(settings[name])}, and a resumed run keeps its settings; drop --{name} or "
                               "start a new --output_dir")
    if "dataset" in given and cfg.dataset:
        settings["dataset"] = cfg.dataset  # its content is checked against the recorded hash
    changed = [f"{name} {shown(settings.get(name))} -> {shown(getattr(cfg, name))}"
               for name in sorted(given & RESUME_FREE_SETTINGS - LOCATION_SETTINGS)
               if name in settings and differs(getattr(cfg, name), settings[name])]
    settings.update({name: getattr(cfg, name) for name in given & RESUME_FREE_SETTINGS})
    settings.update({name: getattr(cfg, name) for name in LOCATION_SETTINGS})
    log("resuming with the run's recorded settings (run_config.json)"
        + (f"; for the rest of the run: {', '.join(changed)}" if changed else ""))
    return TrainConfig(**settings)


def differs(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) != float(b)
    return a != b


def shown(value) -> str:
    return ",".join(value) if isinstance(value, list) else str(value)


def resume_point(cfg: TrainConfig, output_dir: Path, base_model: str, data_hash: str, log) -> str | None:
    """The checkpoint this run continues from, checked against the base model and dataset; None: from the start."""
    if cfg.resume_from_checkpoint:
        checkpoint = Path(cfg.resume_from_checkpoint)
        if not is_valid_checkpoint(checkpoint):
            raise DeepRedError(f"{checkpoint} is not a complete checkpoint (needs trainer_state.json, "
                               "adapter_model.safetensors, optimizer.pt); pick another or use --resume_latest")
    elif cfg.resume_latest:
        checkpoint = latest_checkpoint(output_dir)
        if checkpoint is None:
            log(f"--resume_latest: no complete checkpoint in {output_dir}; starting from the beginning")
            return None
    else:
        return None
    check_checkpoint_matches(checkpoint, base_model, data_hash)
    log(f"resuming from {checkpoint}")
    return str(checkpoint)


def check_checkpoint_matches(checkpoint: Path, base_model: str, data_hash: str) -> None:
    """The checkpoint was trained on this base model and dataset, as its own run folder recorded them (not the new
    --output_dir's, which --resume_from_checkpoint may leave as a fresh folder)."""
    trained_on = adapter_trained_on(checkpoint)
    if trained_on and trained_on != base_model:
        raise DeepRedError(f"checkpoint {checkpoint} was trained on base model '{trained_on}', not '{base_model}'; "
                           f"pass --base_model {trained_on} or start a new --output_dir")
    recorded = read_json(checkpoint.parent / RUN_CONFIG).get("dataset_sha256")
    if recorded and recorded != data_hash:
        raise DeepRedError(f"checkpoint {checkpoint} was trained on a different dataset (sha256 {recorded[:12]}..., "
                           f"now {data_hash[:12]}...); resume with the original data or start a new --output_dir")


def finished_run(output_dir: Path) -> TrainResult | None:
    """The result of a run whose final/ adapter is already saved; None when it has not finished."""
    final_dir = output_dir / FINAL
    if not (final_dir / "adapter_model.safetensors").is_file():
        return None
    return TrainResult(output_dir, final_dir, read_json(output_dir / TRAIN_RESULTS))


def resume_command(command: str, output_dir: Path) -> str:
    return f"{command} --output_dir {shlex.quote(str(output_dir))} --resume_latest"


def save_final(trainer, tokenizer, output_dir: Path, main_process: bool) -> Path:
    """The adapter and tokenizer in final/. Under FSDP every rank gathers its shards (FULL_STATE_DICT); rank 0
    writes."""
    final_dir = output_dir / FINAL
    if trainer.is_fsdp_enabled:
        trainer.save_model(str(final_dir))
        if main_process:
            tokenizer.save_pretrained(final_dir)
    elif main_process:  # whole or not at all: a final/ is what tells a rerun that training finished
        with atomic_folder(final_dir) as tmp:
            trainer.model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    return final_dir
