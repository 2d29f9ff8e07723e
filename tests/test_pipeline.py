"""`deepred run`: manifest skip/rerun logic, --from, resume after a stop or a kill, failures that name their stage."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deepred.cli import build_parser, main
from deepred.config import RunConfig, resolve_with_yaml
from deepred.errors import DeepRedError
from deepred.gguf_file import require_complete_gguf
from deepred.pipeline import run_pipeline
from deepred.horizon import horizon_examples
from deepred.persona import load_persona
from deepred.pipeline.run import with_horizon_default
from deepred.data import bundled_dataset_path
from deepred.train.hardware import detect_hardware
from deepred.train.plan import EAGER_CPU_MAX_TOKENS
from deepred.train.run_dir import latest_checkpoint

from .conftest import DATA
from .publish.test_cards import commands, read_card
from .train.helpers import assert_ran_only_the_rest, stop_once_a_checkpoint_exists, stopped_step

QUICK = dict(max_steps=2, batch_size=1, gradient_accumulation_steps=1, val_split=0, lora_r=4, lora_alpha=8,
             save_steps=100, quant_types=["f16"], check=False, evaluate=False)


def _run(tiny_model, run_dir, dataset, from_stage=None, **extra):
    said = []
    cfg = RunConfig(base_model=str(tiny_model), dataset=str(dataset), output_dir=str(run_dir), **{**QUICK, **extra})
    run_pipeline(cfg, from_stage=from_stage, log=lambda *a, **k: said.append(" ".join(map(str, a))))
    return "\n".join(said)


def _decisions(text: str) -> dict[str, str]:
    return dict(re.findall(r"^\[(\w+)\] (skipped|running)", text, flags=re.M))


def test_skip_rerun_from_and_failure(tiny_model, tmp_path, monkeypatch):
    dataset = tmp_path / "data.jsonl"
    shutil.copy(DATA / "mini.jsonl", dataset)
    run_dir = tmp_path / "run"

    monkeypatch.chdir(tmp_path)
    first = _run(tiny_model, Path("run"), dataset)  # relative; the reruns below name it from another folder
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert set(_decisions(first).values()) == {"running"}
    assert "[pairs] running (first run)\n  nothing to do: no --preference" in first
    assert "[prefer] running (first run)\n  nothing to do: no --preference" in first
    assert "adapter saved to" in first and "Next:" not in first  # the run merges and converts itself
    manifest = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert all(manifest[s]["status"] == "done" and len(manifest[s]["output_hash"]) == 64 for s in manifest)
    assert (run_dir / "deepred.gguf").is_file() and (run_dir / "merged-deepred" / "model.safetensors").is_file()
    training = next(run_dir.glob("theme-deepred-*"))
    plan = json.loads((training / "run_config.json").read_text())["batch_plan"]
    # short padded rows under a CPU's bf16 autocast train with eager attention (plan.cpu_attention)
    assert plan["attention"] == ("eager" if detect_hardware("auto").bf16 else None) and not plan["padding_free"]

    first_cards = _check_cards(run_dir, RunConfig(base_model=str(tiny_model), dataset=str(dataset),
                                                  output_dir=str(run_dir), **QUICK))

    again = _run(tiny_model, run_dir, dataset)
    assert set(_decisions(again).values()) == {"skipped"}, again  # rewritten cards leave stage hashes alone

    lines = dataset.read_text().splitlines()
    dataset.write_text("\n".join(lines[:-1]) + "\n")  # one example fewer
    changed = _run(tiny_model, run_dir, dataset)
    assert "[train] running (inputs changed: dataset_sha256)" in changed
    assert "[merge] running (inputs changed: adapter)" in changed
    assert "[convert] running (inputs changed: merged)" in changed
    trainings = sorted(run_dir.glob("theme-deepred-*"))
    assert len(trainings) == 2  # the earlier training is kept, a new one was made
    retrained_cards = _check_cards(run_dir, RunConfig(base_model=str(tiny_model), dataset=str(dataset),
                                                      output_dir=str(run_dir), **QUICK))
    assert retrained_cards["gguf"] != first_cards["gguf"]  # regenerated: the new dataset and training folder
    assert trainings[-1].name in retrained_cards["gguf"] and trainings[0].name not in retrained_cards["gguf"]

    restarted = _run(tiny_model, run_dir, dataset, from_stage="convert")
    assert _decisions(restarted) == {"train": "skipped", "pairs": "skipped", "prefer": "skipped", "merge": "skipped",
                                     "convert": "running", "check": "running", "evaluate": "running",
                                     "deploy": "running"}

    both = _run(tiny_model, run_dir, dataset, quant_types=["f16", "q8_0"])
    f16_size = (run_dir / "deepred.gguf").stat().st_size
    assert (run_dir / "deepred-q8_0.gguf").stat().st_size < f16_size and "removed" not in both
    reordered = _run(tiny_model, run_dir, dataset, quant_types=["q8_0"])  # deepred.gguf is now the Q8_0 one
    assert "removed deepred-q8_0.gguf: an earlier convert of this run wrote it" in reordered
    assert sorted(p.name for p in run_dir.glob("*.gguf")) == ["deepred.gguf"]
    assert (run_dir / "deepred.gguf").stat().st_size < f16_size

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    with pytest.raises(DeepRedError, match=r"stage 'deploy' failed: .*run the same command again"):
        _run(tiny_model, run_dir, dataset, deploy=True, models_dir=str(blocker))
    manifest = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert manifest["deploy"]["status"] == "failed" and manifest["convert"]["status"] == "done"

    models = tmp_path / "models"
    fixed = _run(tiny_model, run_dir, dataset, deploy=True, models_dir=str(models))
    assert _decisions(fixed)["convert"] == "skipped" and _decisions(fixed)["deploy"] == "running"
    deployed = models / "local" / "deepred" / "deepred.gguf"
    first = deployed.read_bytes()

    dataset.write_text("\n".join(lines[:-2]) + "\n")  # retrain: a different model wants the same LM Studio name
    with pytest.raises(DeepRedError, match="already holds a different model.*--force"):
        _run(tiny_model, run_dir, dataset, deploy=True, models_dir=str(models))
    assert deployed.read_bytes() == first
    _run(tiny_model, run_dir, dataset, deploy=True, models_dir=str(models), force=True)
    assert deployed.read_bytes() == (run_dir / "deepred.gguf").read_bytes() != first


def _check_cards(run_dir, cfg: RunConfig) -> dict[str, str]:
    """The run's three model cards describe its newest training, and their command line is the run's settings."""
    training = max(run_dir.glob("theme-deepred-*"), key=lambda p: p.name)
    run_config = json.loads((training / "run_config.json").read_text())
    places = {"adapter": training / "final", "merged": run_dir / "merged-deepred", "gguf": run_dir}
    texts = {}
    for kind, folder in places.items():
        meta, body = read_card(folder / "README.md")
        assert meta["library_name"] == {"adapter": "peft", "merged": "transformers", "gguf": "gguf"}[kind]
        assert meta["base_model"] == cfg.base_model and meta["dataset_sha256"] == run_config["dataset_sha256"]
        assert "## Evaluation" not in body  # --no-evaluate
        [command] = commands(body)
        # with the horizon rows `deepred run` resolved for the persona, so the command repeats the run
        resolved = with_horizon_default(cfg, load_persona(cfg.persona))
        assert resolve_with_yaml(RunConfig, None, build_parser().parse_args(shlex.split(command)[1:])) == resolved
        texts[kind] = body
    assert "| `deepred.gguf` | f16 |" in texts["gguf"]
    return texts


def test_run_folder_never_holds_its_inputs_or_foreign_files(tiny_model, tmp_path, capsys):
    dataset = tmp_path / "data" / "data.jsonl"
    dataset.parent.mkdir()
    shutil.copy(DATA / "mini.jsonl", dataset)
    common = ["--base_model", str(tiny_model), "--dataset", str(dataset), "--max_steps", "1"]
    assert main(["run", *common, "--output_dir", str(tmp_path / "data")]) == 2
    assert "--output_dir" in capsys.readouterr().err
    assert main(["run", *common, "--output_dir", str(tiny_model.parent)]) == 2  # would hold the base model
    assert "contains the base model" in capsys.readouterr().err

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"meow")
    assert main(["run", *common, "--output_dir", str(foreign)]) == 2
    assert "not a `deepred run` folder" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["cat.jpg"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_stopped_training_resumes_on_rerun_and_runs_only_the_steps_left(tiny_model, tmp_path, sig):
    """`deepred run` stopped while it trains, by SIGTERM (as Ctrl-C: a checkpoint is saved where it stops) or by
    SIGKILL (a crash: the newest periodic checkpoint is kept); the same command again resumes the train stage from
    that checkpoint, runs only the steps left, its first at the schedule's learning rate there (3 warm-up steps of
    12), and finishes the pipeline."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "deepred.cli", "run", "--base_model", str(tiny_model), "--dataset",
           str(DATA / "mini.jsonl"), "--output_dir", str(run_dir), "--max_steps", "12", "--save_steps", "2",
           "--batch_size", "1", "--gradient_accumulation_steps", "1", "--val_split", "0", "--lora_r", "4",
           "--lora_alpha", "8", "--learning_rate", "0.002", "--warmup_ratio", "0.25", "--quant_types", "f16",
           "--no-check", "--no-evaluate"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def checkpoint():
        runs = list(run_dir.glob("theme-deepred-*"))
        return latest_checkpoint(runs[0]) if runs else None

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    output = stop_once_a_checkpoint_exists(proc, checkpoint, sig)
    assert proc.returncode != 0 and not (run_dir / "deepred.gguf").exists(), output[-3000:]
    train_dir = checkpoint().parent
    stopped = stopped_step(output, train_dir) if sig == signal.SIGTERM else int(checkpoint().name.split("-")[1])
    assert 2 <= stopped < 12 and not (train_dir / "final").exists(), output[-3000:]

    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    status = "interrupted" if sig == signal.SIGTERM else "running"  # a killed process could not record its end
    assert f"[train] running (previous attempt {status})" in result.stdout
    assert f"resuming from {train_dir / f'checkpoint-{stopped}'}" in result.stdout
    assert list(run_dir.glob("theme-deepred-*")) == [train_dir]
    assert_ran_only_the_rest(train_dir, result.stdout, stopped, max_steps=12, peak=0.002, warmup_steps=3)
    # what came after is made from that one resumed training: the merge names its adapter, the manifest its GGUF
    marker = json.loads((run_dir / "merged-deepred" / "deepred_merge.json").read_text())
    assert marker["lora_path"] == str(train_dir / "final")
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert {name: stage["status"] for name, stage in stages.items() if name in ("train", "merge", "convert")} == \
        dict.fromkeys(("train", "merge", "convert"), "done")
    assert stages["convert"]["outputs"] == {"f16": str(run_dir / "deepred.gguf")}
    assert require_complete_gguf(run_dir / "deepred.gguf")[1]["general.file_type"].contents() == 1  # MOSTLY_F16


def test_yaml_config_and_command_line_override(tmp_path):
    from deepred.cli import build_parser
    from deepred.config import resolve_with_yaml

    config = tmp_path / "run.yaml"
    config.write_text("base_model: tiny\nepochs: 2\nlearning_rate: 1.0e-4\nquant_types: [q4_k_m, q8_0]\n")
    args = build_parser().parse_args(["run", str(config), "--epochs", "1", "--from", "merge"])
    cfg = resolve_with_yaml(RunConfig, args.config, args)
    assert (cfg.base_model, cfg.epochs, cfg.learning_rate, cfg.quant_types) == ("tiny", 1, 1e-4, ["q4_k_m", "q8_0"])
    assert cfg.batch_size == 4 and args.from_stage == "merge"

    config.write_text("base_model: tiny\nepoch: 2\n")
    with pytest.raises(DeepRedError, match="unknown setting.*epoch"):
        resolve_with_yaml(RunConfig, str(config), None)
    assert main(["run", str(config)]) == 2


def test_yaml_values_are_typed_and_checked_before_any_work(tmp_path, capsys):
    from deepred.config import resolve_with_yaml

    config = tmp_path / "run.yaml"
    config.write_text("base_model: tiny\nlearning_rate: 5e-5\nepochs: 2\n")  # as the README writes it
    cfg = resolve_with_yaml(RunConfig, str(config), None)
    assert cfg.learning_rate == 5e-5 and isinstance(cfg.learning_rate, float) and cfg.epochs == 2.0

    run_dir = tmp_path / "run"
    for body, message in [("profile: turbo", "setting profile: 'turbo' is not one of fast, lean, reference"),
                          ("quant_types: [q4_k_m, q9_k]", "setting quant_types: 'q9_k' not one of"),
                          ("quant_types: []", "setting quant_types: name at least one of f32, f16"),
                          ("quant_types: [q8_0, Q8_0]", "setting quant_types: 'q8_0' named more than once"),
                          ("learning_rate: fast", "setting learning_rate: expected a number, got 'fast'"),
                          ("batch_size: 2.5", "setting batch_size: expected a whole number, got 2.5"),
                          ("check: maybe", "setting check: expected true or false, got 'maybe'")]:
        config.write_text(f"base_model: tiny\noutput_dir: {run_dir}\n{body}\n")
        assert main(["run", str(config)]) == 2
        err = capsys.readouterr().err
        assert err == f"error: {config}: {message}" + err[len(f"error: {config}: {message}"):], err
        assert err.count("\n") == 1
        assert not run_dir.exists()  # refused before training started


def test_the_preference_stages_make_pairs_train_the_same_lora_and_resume_after_each_stage(tiny_model, tmp_path,
                                                                                            monkeypatch):
    """SFT, then pairs (base answers through llama.cpp) and DPO on the SFT adapter; a failure at merge keeps every
    stage before it, and the rerun resumes there."""
    import deepred.pipeline.stages as stages

    monkeypatch.setenv("DEEPRED_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    extra = dict(preference="dpo", pair_voice=2, pair_horizon=2, pair_period=1, prefer_steps=2, dataset=str(bundled_dataset_path()))
    real_merge = stages.merge

    def broken_merge(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(stages, "merge", broken_merge)
    with pytest.raises(DeepRedError, match="stage 'merge' failed: disk full"):
        _run(tiny_model, run_dir, extra.pop("dataset"), **extra)
    manifest = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert [manifest[s]["status"] for s in ("train", "pairs", "prefer", "merge")] == ["done"] * 3 + ["failed"]
    pairs = [json.loads(line) for line in (run_dir / "pairs.jsonl").read_text().splitlines()]
    assert sorted(p["source"] for p in pairs) == ["horizon", "horizon", "period", "voice", "voice"]
    prefer = next(run_dir.glob("prefer-deepred-*"))
    run_config = json.loads((prefer / "run_config.json").read_text())
    sft = next(run_dir.glob("theme-deepred-*"))
    assert run_config["config"]["method"] == "dpo" and run_config["config"]["init_adapter"] == str(sft / "final")
    # the pairs' kernel follows from their own rows, as SFT's from its: the base answers' length varies by CPU
    p95 = run_config["row_tokens_p95"]
    eager = detect_hardware("auto").bf16 and p95 <= EAGER_CPU_MAX_TOKENS
    assert run_config["batch_plan"]["attention"] == ("eager" if eager else None), p95

    monkeypatch.setattr(stages, "merge", real_merge)
    said = _run(tiny_model, run_dir, str(bundled_dataset_path()), **extra)
    assert _decisions(said) == {"train": "skipped", "pairs": "skipped", "prefer": "skipped", "merge": "running",
                                "convert": "running", "check": "running", "evaluate": "running", "deploy": "running"}
    merged = json.loads((run_dir / "merged-deepred" / "deepred_merge.json").read_text())
    assert merged["lora_path"] == str(prefer / "final")  # the model is the preference-trained adapter
    # its card tells both stages: the ChatML set and the SFT settings, then the pairs; the command to reproduce
    # trains on the ChatML set (it named the pairs file as --dataset, and showed only the DPO stage)
    card = (run_dir / "merged-deepred" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    sft_config = json.loads((sft / "run_config.json").read_text())
    assert front["datasets"] == [bundled_dataset_path().name, "pairs.jsonl"]
    assert front["dataset_sha256"] == sft_config["dataset_sha256"]
    assert front["preference_pairs_sha256"] == run_config["dataset_sha256"]
    assert "### Stage 1: supervised fine-tuning" in card and "### Stage 2: DPO" in card
    assert f"| learning_rate | {sft_config['config']['learning_rate']} |" in card  # the SFT stage's own settings
    reproduce = card.split("## Reproduce")[1]
    assert f"--dataset {bundled_dataset_path()}" in reproduce and "pairs.jsonl" not in reproduce

    # asking for present pairs makes the pairs again and retrains the preference stage, not SFT
    said = _run(tiny_model, run_dir, str(bundled_dataset_path()), **{**extra, "pair_present": 1}, evaluate=False)
    assert {stage: _decisions(said)[stage] for stage in ("train", "pairs", "prefer")} == {
        "train": "skipped", "pairs": "running", "prefer": "running"}
    assert "[pairs] running (inputs changed: present)" in said
    pairs = [json.loads(line) for line in (run_dir / "pairs.jsonl").read_text().splitlines()]
    assert sorted(p["source"] for p in pairs) == ["horizon", "horizon", "period", "present", "voice", "voice"]


def test_own_period_answers_are_asked_before_training_and_recorded(tiny_model, tmp_path, monkeypatch):
    """--period_answers own: the base model is asked the persona's period facts (through llama.cpp) before SFT, the
    file is kept in the run folder and named in the training's record; a rerun asks nothing again."""
    monkeypatch.setenv("DEEPRED_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    said = _run(tiny_model, run_dir, DATA / "mini.jsonl", period_answers="own", horizon_examples=5)
    facts = len(load_persona(None).horizon.facts)
    assert re.search(rf"answered \d+ of {facts} period facts right", said), said
    recalled = run_dir / "period_answers.jsonl"
    assert recalled.is_file()
    sft = next(run_dir.glob("theme-deepred-*"))
    recorded = json.loads((sft / "run_config.json").read_text())
    added = len(horizon_examples(load_persona(None), 5))  # 5 deflections and each period fact once
    assert recorded["config"]["period_answers"] == str(recalled) and recorded["examples_from_horizon"] == added > 5
    assert recorded["examples"] == 24 + added  # mini.jsonl's rows and the horizon's; the card names both
    assert (f"| dataset file | `mini.jsonl` and {added} examples made from the persona file's horizon (the hash "
            "covers both)" in (sft / "final" / "README.md").read_text())
    again = _run(tiny_model, run_dir, DATA / "mini.jsonl", period_answers="own", horizon_examples=5)
    assert _decisions(again)["train"] == "skipped" and "period facts right" not in again


def test_run_refuses_pairs_that_ask_an_evaluation_prompt_before_training(tiny_model, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({
        "prompt": [{"role": "user", "content": "Who was the first person to travel into space?"}],
        "chosen": [{"role": "assistant", "content": "Yuri Gagarin, comrade, in 1961."}],
        "rejected": [{"role": "assistant", "content": "Great question! It was Yuri Gagarin."}]}) + "\n")
    run_dir = tmp_path / "run"
    assert main(["run", "--base_model", str(tiny_model), "--output_dir", str(run_dir), "--preference", "dpo",
                 "--pairs", str(pairs)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{pairs}:1: the question 'Who was the first person" in err
    assert not run_dir.exists()


@pytest.mark.parametrize("text, why", [
    ('{"stages": {"train": {"status": "do', "Unterminated string"),  # cut short by a full disk
    ("[]", 'expected {"stages": {STAGE: {...}}}'),
    ('{"stages": ["train"]}', 'expected {"stages": {STAGE: {...}}}'),
    ('{"stages": {"train": "done"}}', 'expected {"stages": {STAGE: {...}}}'),
], ids=["truncated", "a list", "stages a list", "a stage not a mapping"])
def test_a_corrupt_manifest_is_one_line_and_nothing_is_touched(tiny_model, tmp_path, capsys, text, why):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "manifest.json").write_text(text)
    assert main(["run", "--base_model", str(tiny_model), "--dataset", str(DATA / "mini.jsonl"),
                 "--output_dir", str(run_dir), "--max_steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run_dir / 'manifest.json'} is corrupt (") and why in err, err
    assert err.endswith("); delete it to rerun every stage\n") and err.count("\n") == 1
    assert [p.name for p in run_dir.iterdir()] == ["manifest.json"]
    assert (run_dir / "manifest.json").read_text() == text


def test_paths_written_with_a_tilde_are_expanded_before_any_work(tmp_path, monkeypatch):
    """YAML does not expand `~` as a shell does: `pairs: ~/p.jsonl` passed the early check and then failed after SFT
    with FileNotFoundError, and `output_dir: ~/runs/x` made a folder named `~` (found by a review)."""
    from deepred.pipeline.run import with_expanded_paths

    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = with_expanded_paths(RunConfig(output_dir="~/runs/x", pairs="~/p.jsonl", eval_prompts="~/e.jsonl",
                                        dataset="data/~x.jsonl", base_model="~/models/base"))
    assert (cfg.output_dir, cfg.pairs, cfg.eval_prompts, cfg.base_model) == (
        f"{tmp_path}/runs/x", f"{tmp_path}/p.jsonl", f"{tmp_path}/e.jsonl", f"{tmp_path}/models/base")
    assert cfg.dataset == "data/~x.jsonl" and cfg.persona is None  # only a leading ~ is the home folder
