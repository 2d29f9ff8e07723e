"""Stage 2: LoRA supervised fine-tuning with TRL on the model's own chat template, loss on the replies only.

Read top to bottom: pick the run folder (a resumed run takes its recorded settings) -> validate the data -> tokenize
with the chat template -> choose device, precision and batch plan -> load the model, attach LoRA, train (checkpoints,
graceful stop on SIGINT/SIGTERM, out-of-memory back-off) -> save final/, the results and the loss curve.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

from ..config import TrainConfig
from ..data import length_p95
from ..errors import DeepRedError
from ..files import folder_lock
from ..models.loading import load_tokenizer
from ..models.registry import resolve_base_model
from .callbacks import GracefulStop, MemoryProbe, ProgressBar, StepCount
from .examples import cut_rows, describe, load_data, quiet_dataset_maps, row_length, sample, split, training_rows
from .hardware import detect_hardware, liger_available, under_fsdp
from .memory import free_accelerator_memory, oom_advice, smaller_plan
from .model import adapter_targets, continue_adapter, keeps_packed_examples_apart, lora_config, load_model
from .plan import BatchPlan, plan_batches
from .report import RunRecord, next_commands, train_metrics, write_results
from .run_dir import (TrainResult, agree_across_ranks, choose_output_dir, finished_run, latest_checkpoint,
                      recorded_run, resume_command, resume_point, resumed_config, save_final)
from .preference import build_preference_trainer
from .trainer import build_trainer


def train(cfg: TrainConfig, log=print, callbacks=(), given: set[str] | None = None,
          command: str | None = "deepred train") -> TrainResult:
    """Train; `given` names the settings the user typed (None: all of them, as from code). On resume the rest come
    from the run's run_config.json. `command` is how the user started training, for the printed resume command
    (None: the caller explains how to resume)."""
    from accelerate import PartialState

    hw = detect_hardware(cfg.precision)
    # cpu=True lets accelerate see a torchrun launch on CPUs (gloo); without it every rank believes it is rank 0
    state = PartialState(cpu=hw.device == "cpu")
    main = state.is_main_process
    log = log if main else (lambda *a, **k: None)  # only rank 0 talks
    output_dir = agree_across_ranks(state, choose_output_dir(cfg, log))
    recorded = recorded_run(cfg, output_dir)
    if recorded:
        every = {f.name for f in dataclasses.fields(TrainConfig)}
        cfg = resumed_config(dataclasses.replace(cfg, output_dir=str(output_dir)), every if given is None else given,
                             recorded, log)
        if (finished := finished_run(output_dir)) is not None:
            log(f"{output_dir} already finished training (final/ holds its adapter); nothing to resume")
            return finished
        hw = detect_hardware(cfg.precision)  # the recorded precision
    report, data_hash = load_data(cfg, log)  # the ChatML dataset, or the preference pairs
    quiet_dataset_maps()

    base_model = resolve_base_model(cfg.base_model)
    # rank 0 writes the folder and holds its lock: a second training there is refused, and one killed is taken over
    with folder_lock(output_dir, "--output_dir", log) if main else contextlib.nullcontext():
        return _train_in(cfg, log, callbacks, command, hw, state, output_dir, report, data_hash, base_model)


def _train_in(cfg: TrainConfig, log, callbacks, command: str | None, hw, state, output_dir, report, data_hash: str,
              base_model: str) -> TrainResult:
    """The training itself, in the folder train() chose and holds."""
    main = state.is_main_process
    resume = resume_point(cfg, output_dir, base_model, data_hash, log)

    tokenizer = load_tokenizer(base_model, cfg.trust_remote_code)
    tokenized = training_rows(cfg, report, tokenizer, log)  # loss on what the model writes, by its chat template
    lengths = [row_length(row) for row in tokenized]
    log(describe(report, lengths, cfg.max_seq_length))

    p95 = min(length_p95(lengths), cfg.max_seq_length) if lengths else None  # rows are cut to it below
    plan = plan_batches(cfg, hw, fsdp=under_fsdp(), liger=liger_available(), p95_length=p95)
    log(f"device: {hw.describe()}, profile {cfg.profile}: {plan.describe(hw.world_size)}")
    examples = cut_rows(sample(tokenized, cfg.max_samples, cfg.seed, log), cfg.max_seq_length, log)
    train_set, eval_set = split(examples, cfg.val_split, cfg.seed)
    record = RunRecord(output_dir, cfg, base_model, report, data_hash, lengths, hw, len(examples), main,
                       row_tokens_p95=p95, validation_examples=len(eval_set) if eval_set is not None else 0)
    started, ran = time.time(), StepCount()
    while True:  # until training ends; out of memory retries with a smaller plan from the newest checkpoint
        model = load_model(cfg, base_model, hw, plan.attention)
        if plan.padding_free and not keeps_packed_examples_apart(model):
            log(f"{type(model).__name__} does not build its attention mask from packed positions; padded batches")
            plan = dataclasses.replace(plan, padding_free=False)
        if cfg.init_adapter:  # keep training that adapter
            model, peft_config = continue_adapter(model, cfg.init_adapter, base_model), None
        else:
            peft_config = lora_config(cfg, model)
        build = build_preference_trainer if cfg.method != "sft" else build_trainer
        trainer = build(cfg, model, tokenizer, peft_config, train_set, eval_set, output_dir, plan, hw)
        record.lora_targets = adapter_targets(trainer.model)
        record.write(plan)
        stopper = GracefulStop()
        for callback in (*probe(trainer, plan, examples, hw, log, record), ProgressBar(), stopper, ran, *callbacks):
            trainer.add_callback(callback)
        try:
            outcome = trainer.train(resume_from_checkpoint=resume)
            break
        except Exception as exc:  # noqa: BLE001 - out of memory is retried smaller or translated
            stopper.restore()  # else the retry's stopper would keep this dead one's handler, swallowing Ctrl-C
            smaller = smaller_plan(plan, cfg, exc)
            if smaller is None:
                advice = oom_advice(exc, cfg)
                if advice:
                    raise advice from exc
                raise
            log(f"\nout of memory with micro-batch {plan.micro_batch}; retrying with {smaller.describe(hw.world_size)}")
            plan = smaller
            del trainer, model
            free_accelerator_memory()
            checkpoint = latest_checkpoint(output_dir)
            resume = str(checkpoint) if checkpoint else resume
    log(f"\nthis process {ran.describe()}")
    if stopper.requested:
        log(f"\n{stopper.requested}: stopped at step {trainer.state.global_step}; checkpoint "
            f"{latest_checkpoint(output_dir)}." + (f" Resume with: {resume_command(command, output_dir)}" if command else ""))
        return TrainResult(output_dir, None, {}, interrupted=True, main_process=main)

    require_finite_adapter(trainer, cfg.learning_rate)
    metrics = {**train_metrics(outcome, trainer, started), **ran.results()}
    eval_metrics = trainer.evaluate() if eval_set is not None else {"skipped": "no validation split (--val_split 0)"}
    final_dir = save_final(trainer, tokenizer, output_dir, main)
    if main:
        write_results(output_dir, metrics, eval_metrics, trainer.state.log_history)
        log(next_commands(cfg.base_model, final_dir) if command else f"\nadapter saved to {final_dir}")  # run: no Next
    state.wait_for_everyone()
    return TrainResult(output_dir, final_dir, metrics, main_process=main)


def probe(trainer, plan: BatchPlan, examples: list[dict], hw, log, record: RunRecord) -> list:
    """The GPU memory probe, where passes are padding-free with our loss and no budget was given."""
    if hw.device == "cuda" and plan.padding_free and plan.loss != "trl" and plan.max_tokens_per_pass is None:
        return [MemoryProbe(trainer, plan, [row_length(row) for row in examples], log, record.write)]
    return []


def require_finite_adapter(trainer, learning_rate: float) -> None:
    """Training that diverged (a loss of NaN or infinity) leaves weights that are not numbers; saving them as final/
    would hand merge, convert and serve a model that only writes "!!!!". Refused before final/ is written."""
    import torch

    broken = [name for name, p in trainer.model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if broken:
        raise DeepRedError(f"training diverged: {len(broken)} adapter tensors hold NaN or infinity after step "
                           f"{trainer.state.global_step} (e.g. {broken[0]}); final/ was not written. Lower "
                           f"--learning_rate (it was {learning_rate:g}) and train again")
