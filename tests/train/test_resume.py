"""Resume proven by counting: a `deepred train` stopped by SIGTERM at a checkpoint and resumed runs only the steps
left, and its first step takes the schedule's learning rate there, not the warm-up's start. A resume that silently
starts over from step 0 reaches the same final step count, so the count of the steps the resuming process ran is
what tells the two apart. (The printed resume command: test_stage.py; `deepred run`: test_pipeline.py.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from deepred.train.run_dir import latest_checkpoint

from ..conftest import DATA
from .helpers import assert_ran_only_the_rest, stop_once_a_checkpoint_exists, stopped_step

MAX_STEPS, SAVE_STEPS, PEAK = 12, 2, 0.002
WARMUP_RATIO, WARMUP_STEPS = 0.25, 3  # 0.25 x 12 steps: a whole number, so no rounding rule is involved
DEEPRED = [sys.executable, "-m", "deepred.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


@dataclass
class StoppedRun:
    folder: Path
    step: int  # where SIGTERM stopped it (a checkpoint is saved there)
    flags: list[str]  # the `deepred train` flags it was started with, but --output_dir


def train_flags(tiny_model: Path) -> list[str]:
    return ["--base_model", str(tiny_model), "--dataset", str(DATA / "mini.jsonl"), "--max_steps", str(MAX_STEPS),
            "--save_steps", str(SAVE_STEPS), "--batch_size", "1", "--gradient_accumulation_steps", "1",
            "--val_split", "0", "--lora_r", "4", "--lora_alpha", "8", "--learning_rate", str(PEAK),
            "--warmup_ratio", str(WARMUP_RATIO)]


@pytest.fixture(scope="module")
def stopped_run(tiny_model, tmp_path_factory) -> StoppedRun:
    """`deepred train` stopped by SIGTERM once its first checkpoint (step 2) exists: it saves a checkpoint where it
    stops, past step 2 (the signal is seen at the end of a later step). The tests resume copies of it."""
    folder = tmp_path_factory.mktemp("stopped") / "run"
    flags = train_flags(tiny_model)
    proc = subprocess.Popen([*DEEPRED, "train", *flags, "--output_dir", str(folder)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=ENV)
    output = stop_once_a_checkpoint_exists(proc, lambda: latest_checkpoint(folder))
    assert proc.returncode == 130, output[-3000:]
    step = stopped_step(output, folder)
    assert SAVE_STEPS < step < MAX_STEPS and not (folder / "final").exists(), output[-3000:]
    assert f"this process started at step 0 of {MAX_STEPS}, ran {step} steps" in output
    return StoppedRun(folder, step, flags)


def resume(stopped: StoppedRun, tmp_path: Path, *args: str) -> tuple[Path, str]:
    """Resume a copy of the stopped run with `deepred train --output_dir COPY ARGS` ("{run}" in ARGS: the copy)."""
    folder = tmp_path / "run"
    shutil.copytree(stopped.folder, folder)
    args = [arg.replace("{run}", str(folder)) for arg in args]
    # no more checkpoints: they would only cost time (a resumed run may change how often it saves, and says so)
    result = subprocess.run([*DEEPRED, "train", "--output_dir", str(folder), *args, "--save_steps", "100"],
                            capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (folder / "final" / "adapter_model.safetensors").is_file()
    return folder, result.stdout


def test_resume_latest_runs_only_the_steps_left(stopped_run, tmp_path):
    """The command that started the run again, with --resume_latest added (the README's way): it continues from
    the newest checkpoint, the one saved where SIGTERM stopped it."""
    folder, output = resume(stopped_run, tmp_path, *stopped_run.flags, "--resume_latest")
    assert_ran_only_the_rest(folder, output, stopped_run.step, MAX_STEPS, PEAK, WARMUP_STEPS)


def test_resume_from_checkpoint_runs_from_that_checkpoint(stopped_run, tmp_path):
    """--resume_from_checkpoint names the first checkpoint (step 2), older than the newest one: the run continues
    from the one named, so it runs 10 steps, and its first is step 3, still in the warm-up (2/3 of the peak)."""
    folder, output = resume(stopped_run, tmp_path, "--resume_from_checkpoint", f"{{run}}/checkpoint-{SAVE_STEPS}")
    assert_ran_only_the_rest(folder, output, SAVE_STEPS, MAX_STEPS, PEAK, WARMUP_STEPS)


def test_a_run_started_with_relative_paths_resumes_from_another_folder_and_from_its_own(tiny_model, tmp_path):
    """The resume command deepred prints (`deepred train --output_dir RUN --resume_latest`) reads the run's files from
    run_config.json: recorded as typed ("data/mini.jsonl", "first/final"), they were looked up in whatever folder the
    resume ran in. Recorded absolute, they are found from anywhere, and the command that started the run, typed again
    in its own folder with --resume_latest, is not refused for naming them relatively."""
    start, elsewhere, run = tmp_path / "project", tmp_path / "elsewhere", tmp_path / "run"
    (start / "data").mkdir(parents=True)
    elsewhere.mkdir()
    shutil.copy(DATA / "mini.jsonl", start / "data" / "mini.jsonl")
    flags = [flag if flag != str(DATA / "mini.jsonl") else "data/mini.jsonl" for flag in train_flags(tiny_model)]
    flags[flags.index("--max_steps") + 1], flags[flags.index("--save_steps") + 1] = "2", "1"
    subprocess.run([*DEEPRED, "train", *flags, "--output_dir", "first"], cwd=start, env=ENV, check=True,
                   capture_output=True, timeout=600)
    flags += ["--init_adapter", "first/final"]  # an SFT run continued, as before DPO/ORPO
    subprocess.run([*DEEPRED, "train", *flags, "--output_dir", str(run)], cwd=start, env=ENV, check=True,
                   capture_output=True, timeout=600)
    shutil.rmtree(run / "final")  # as if stopped after the first checkpoint
    shutil.rmtree(run / "checkpoint-2")
    shutil.copytree(run, tmp_path / "again")
    recorded = json.loads((run / "run_config.json").read_text())["config"]
    assert recorded["init_adapter"] == str(start / "first" / "final")
    for cwd, command in [(elsewhere, ["--output_dir", str(run), "--resume_latest"]),
                         (start, [*flags, "--output_dir", str(tmp_path / "again"), "--resume_latest"])]:
        result = subprocess.run([*DEEPRED, "train", *command], cwd=cwd, env=ENV, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        assert "this process resumed at step 1 of 2, ran 1 steps" in result.stdout
    assert (run / "final" / "adapter_model.safetensors").is_file()
