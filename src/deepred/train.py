"""Stage 2: LoRA supervised fine-tuning with TRL on the model's own chat template, loss on assistant tokens only.

Read top to bottom: pick the run folder (a resumed run takes its recorded settings) -> validate data -> tokenize
with the chat template (loss mask from chat_template.py) -> choose device, precision and batch shape -> load the
model -> attach LoRA -> train (checkpoints, graceful stop on SIGINT/SIGTERM) -> save final/, results, loss curve.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from .card import write_adapter_cards
from .chat_template import ChatFormat, tokenize_examples
from .config import TrainConfig
from .data import load_for_training, summarize
from .errors import DeepRedError
from .files import write_json
from .tinymodel import resolve_base_model

CHECKPOINT_PREFIX = "checkpoint-"
# Settings a resumed run may change (where and how often it logs and saves); every other setting is restored from
# run_config.json, and giving a different value for one of them on resume is refused.
RESUME_FREE_SETTINGS = {"output_dir", "resume_from_checkpoint", "resume_latest", "wandb", "logging_steps",
                        "save_steps", "eval_steps", "save_total_limit"}

# LoRA targets by architecture: every attention and MLP projection. Unknown families use PEFT's "all-linear".
LORA_TARGETS = {
    **dict.fromkeys(["llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "qwen2_moe"],
                    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path | None  # None when the run was interrupted before finishing
    metrics: dict
    interrupted: bool = False


# ---------------------------------------------------------------------------------------------------------------
# run folder and checkpoints


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


def _ensure_writable(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise DeepRedError(f"output folder {path} is not writable ({exc.strerror}); choose another --output_dir") from exc


def _choose_output_dir(cfg: TrainConfig, log) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir)
    if cfg.resume_latest:
        newest = newest_run_dir()
        if newest:
            log(f"--resume_latest without --output_dir: using the newest run {newest}")
            return newest
    return default_output_dir()


def _resuming(cfg: TrainConfig) -> bool:
    return bool(cfg.resume_from_checkpoint or cfg.resume_latest)


def _recorded_run(cfg: TrainConfig, output_dir: Path) -> dict | None:
    """run_config.json of the run being resumed (in --output_dir, or beside --resume_from_checkpoint)."""
    folder = Path(cfg.resume_from_checkpoint).parent if cfg.resume_from_checkpoint else output_dir
    path = folder / "run_config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def resumed_config(cfg: TrainConfig, given: set[str], recorded: dict, log) -> TrainConfig:
    """The run's recorded settings, with the logging/saving settings the user gave now.

    A resumed run must be the run that was interrupted: batch plan, length, schedule, LoRA, data sample, split and
    seed come from run_config.json. Giving one of them with a different value is refused, naming both values.
    """
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    settings = {k: v for k, v in recorded.get("config", {}).items() if k in fields}
    settings["dataset"] = recorded.get("dataset") or settings.get("dataset")  # the file it trained on
    for name in sorted(given - RESUME_FREE_SETTINGS):
        if name in settings and name != "dataset" and _differs(getattr(cfg, name), settings[name]):
            raise DeepRedError(f"--{name} {_shown(getattr(cfg, name))}: this run was started with --{name} "
                               f"{_shown(settings[name])}, and a resumed run keeps its settings; drop --{name} or "
                               "start a new --output_dir")
    if "dataset" in given and cfg.dataset:
        settings["dataset"] = cfg.dataset  # its content is checked against the recorded hash
    changed = [f"{name} {_shown(settings.get(name))} -> {_shown(getattr(cfg, name))}"
               for name in sorted(given & RESUME_FREE_SETTINGS - {"output_dir", "resume_latest", "resume_from_checkpoint"})
               if name in settings and _differs(getattr(cfg, name), settings[name])]
    settings.update({name: getattr(cfg, name) for name in given & RESUME_FREE_SETTINGS})
    settings.update(output_dir=cfg.output_dir, resume_latest=cfg.resume_latest,
                    resume_from_checkpoint=cfg.resume_from_checkpoint)
    log("resuming with the run's recorded settings (run_config.json)"
        + (f"; for the rest of the run: {', '.join(changed)}" if changed else ""))
    return TrainConfig(**settings)


def _differs(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) != float(b)
    return a != b


def _shown(value) -> str:
    return ",".join(value) if isinstance(value, list) else str(value)


def _resume_point(cfg: TrainConfig, output_dir: Path, base_model: str, data_hash: str, log) -> str | None:
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
    _check_checkpoint_matches(checkpoint, output_dir, base_model, data_hash)
    log(f"resuming from {checkpoint}")
    return str(checkpoint)


def _check_checkpoint_matches(checkpoint: Path, output_dir: Path, base_model: str, data_hash: str) -> None:
    adapter_config = json.loads((checkpoint / "adapter_config.json").read_text())
    trained_on = adapter_config.get("base_model_name_or_path")
    if trained_on and trained_on != base_model:
        raise DeepRedError(f"checkpoint {checkpoint} was trained on base model '{trained_on}', not '{base_model}'; "
                           f"pass --base_model {trained_on} or start a new --output_dir")
    run_config = output_dir / "run_config.json"
    if run_config.is_file():
        recorded = json.loads(run_config.read_text()).get("dataset_sha256")
        if recorded and recorded != data_hash:
            raise DeepRedError(f"checkpoint {checkpoint} was trained on a different dataset (sha256 {recorded[:12]}..., "
                               f"now {data_hash[:12]}...); resume with the original data or start a new --output_dir")


# ---------------------------------------------------------------------------------------------------------------
# device, precision and batch shape


@dataclass
class Hardware:
    device: str  # cuda | mps | cpu
    rocm: bool
    bf16: bool  # GPU: weights and compute in bf16; CPU: float32 weights, bf16 autocast (mixed precision)
    fp16: bool
    world_size: int

    @property
    def precision(self) -> str:
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"

    def describe(self) -> str:
        mixed = " autocast over float32 weights" if self.device == "cpu" and self.bf16 else ""
        return f"{self.device}{' (ROCm, eager attention)' if self.rocm else ''}, precision {self.precision}{mixed}"


def cpu_has_bf16() -> bool:
    """bf16 matrix instructions (AVX512-BF16 or AMX): there bf16 autocast trained SmolLM2 1.4x faster than float32."""
    import torch

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def detect_hardware(precision: str = "auto") -> Hardware:
    import torch

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        supported = torch.cuda.is_bf16_supported()
        if precision == "bf16" and not supported:
            raise DeepRedError("--precision bf16: this GPU has no bf16; use --precision fp16 or auto")
        bf16 = precision == "bf16" or (precision == "auto" and supported)
        return Hardware("cuda", torch.version.hip is not None, bf16, precision == "fp16" or (precision == "auto" and not bf16),
                        world_size)
    if precision == "fp16":
        raise DeepRedError("--precision fp16 needs a GPU; use auto, bf16 or fp32 on this machine")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        if precision == "bf16":
            raise DeepRedError("--precision bf16 is not supported on Apple GPUs here; use auto or fp32")
        return Hardware("mps", False, False, False, world_size)
    bf16 = precision == "bf16" or (precision == "auto" and cpu_has_bf16())
    return Hardware("cpu", False, bf16, False, world_size)


@dataclass
class BatchPlan:
    micro_batch: int
    accumulation: int
    gradient_checkpointing: bool
    padding_free: bool  # a micro-batch's examples run as one row, each attending only to itself
    loss: str  # one of LOSSES
    liger_layer_kernels: bool  # Liger's RMSNorm, SwiGLU and RoPE kernels
    max_tokens_per_pass: int | None = None  # a padding-free micro-batch over it runs in pieces

    def describe(self, world_size: int) -> str:
        shape = (f"micro-batch {self.micro_batch} x accumulation {self.accumulation}"
                 + (f" x {world_size} processes" if world_size > 1 else "")
                 + f" = {self.micro_batch * self.accumulation * world_size} examples per optimizer step")
        layout = "padding-free (attention within each example)" if self.padding_free else "padded batches"
        if self.max_tokens_per_pass:
            layout += f", at most {self.max_tokens_per_pass:,} tokens per pass"
        return (f"{shape}; {layout}; gradient checkpointing {'on' if self.gradient_checkpointing else 'off'}; "
                f"loss: {LOSSES[self.loss]}"
                + ("; Liger layer kernels" if self.liger_layer_kernels else ""))


LOSSES = {"trl": "TRL's own (every position scored)",
          "supervised": "output layer on the supervised positions only",
          "liger": "Liger fused linear cross-entropy on the supervised positions only"}


def _liger_available() -> bool:
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return False
    return True


def plan_batches(cfg: TrainConfig, hw: Hardware) -> BatchPlan:
    """Keep the user's effective batch (batch_size x accumulation) and choose how to compute it.

    `reference` runs the specification's settings as written (TRL's trainer and loss, padded micro-batches of
    --batch_size, gradient checkpointing). `fast` scores only the supervised positions and, on a GPU, puts the
    whole effective batch through one padding-free forward pass (a GPU at this batch size is bound by per-step
    overhead, and memory then follows the real tokens, not the longest example), with Liger's fused loss. `lean`
    adds gradient checkpointing for small memory.
    None of this changes what is learned: the loss is normalised per supervised token over the whole effective
    batch, and packed examples never attend to each other.
    """
    if cfg.max_tokens_per_pass is not None and cfg.max_tokens_per_pass < 1:
        raise DeepRedError(f"--max_tokens_per_pass must be at least 1 (got {cfg.max_tokens_per_pass}); leave it out "
                           "to let the memory probe choose")
    effective = cfg.batch_size * cfg.gradient_accumulation_steps
    per_process = max(1, effective // hw.world_size)
    on_cuda = hw.device == "cuda" and not hw.rocm
    fused = on_cuda and _liger_available() and "lm_head" not in cfg.modules_to_save
    if cfg.profile == "reference":
        micro = cfg.micro_batch_size or cfg.batch_size
        return BatchPlan(micro, max(1, per_process // micro), True, False, "trl", False)
    micro = cfg.micro_batch_size or (per_process if hw.device == "cuda" else cfg.batch_size)
    micro = max(1, min(micro, per_process))
    while per_process % micro:
        micro -= 1
    layer_kernels = fused and not (cfg.use_4bit or cfg.use_8bit)
    # On a CPU padded batches of 4 ran as fast as padding-free ones (SmolLM2: 221-255 vs 227 tokens/s), whose
    # attention mask covers the whole row; a token budget needs padding-free rows to cut.
    padding_free = hw.device == "cuda" or cfg.max_tokens_per_pass is not None
    # Under FSDP the output layer's weight is sharded outside the model's own forward pass, where the supervised
    # loss applies it; TRL's loss stays inside that pass (unmeasured on GPUs: README, "More than one GPU")
    loss = "trl" if under_fsdp() else "liger" if fused else "supervised"
    return BatchPlan(micro, per_process // micro, cfg.profile == "lean", padding_free, loss, layer_kernels,
                     cfg.max_tokens_per_pass)


def under_fsdp() -> bool:
    """`accelerate launch` with an FSDP config says so to every process through its environment."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"


# ---------------------------------------------------------------------------------------------------------------
# model


def _looks_local(name: str) -> bool:
    """Hub names are `org/name`; anything else that is not an existing folder is a missing local path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def load_tokenizer(base_model: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, base_model, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise DeepRedError(f"{base_model} has no chat template; use an instruct/chat model (e.g. {TrainConfig.base_model})")
    return tokenizer


def _from_pretrained(loader, name: str, **kwargs):
    """Load from a folder or the hub, turning the usual failures into one clear line."""
    path = Path(name).expanduser()
    if _looks_local(name) and not path.exists():
        raise DeepRedError(f"model folder not found: {name} (pass a Hugging Face name like {TrainConfig.base_model} "
                           "or an existing folder; 'tiny' builds the offline test model)")
    try:
        return loader.from_pretrained(str(path) if path.exists() else name, **kwargs)
    except OSError as exc:
        text = str(exc)
        if "does not appear to have a file named" in text or "no file named" in text.lower():
            raise DeepRedError(f"{name}: not a complete model folder ({text.splitlines()[0]})") from exc
        raise DeepRedError(f"cannot load model '{name}': it is not a local folder and the Hugging Face hub could not "
                           "provide it (no network, a typo, or a gated model needing `hf auth login`); "
                           "check the name or pass a local folder") from exc
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise DeepRedError(f"{name} needs custom model code from the hub; pass --trust_remote_code if you trust it") from exc
        raise


def load_model(cfg: TrainConfig, base_model: str, hw: Hardware):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"trust_remote_code": cfg.trust_remote_code,
              # on a CPU bf16 is autocast over float32 weights (mixed precision), not bf16 weights
              "dtype": torch.float32 if hw.device == "cpu" else torch.bfloat16 if hw.bf16 else torch.float16 if hw.fp16
              else torch.float32,
              "attn_implementation": cfg.attn_implementation if cfg.attn_implementation != "auto"
              else "eager" if hw.rocm else "sdpa"}
    if cfg.use_4bit or cfg.use_8bit:
        kwargs["quantization_config"] = _quantization_config(cfg, hw)
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    model = _from_pretrained(AutoModelForCausalLM, base_model, **kwargs)
    model.config.use_cache = False
    return model


def _quantization_config(cfg: TrainConfig, hw: Hardware):
    import torch

    flag = "--use_4bit" if cfg.use_4bit else "--use_8bit"
    if cfg.use_4bit and cfg.use_8bit:
        raise DeepRedError("choose one of --use_4bit and --use_8bit")
    if hw.device != "cuda":
        raise DeepRedError(f"{flag} needs a CUDA GPU (bitsandbytes); this machine has none: drop {flag} to train in full precision")
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise DeepRedError(f"{flag} needs bitsandbytes: pip install bitsandbytes") from exc
    if cfg.use_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16 if hw.bf16 else torch.float16)


def lora_targets(model) -> list[str] | str:
    return LORA_TARGETS.get(getattr(model.config, "model_type", ""), "all-linear")


def lora_config(cfg: TrainConfig, model):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                      task_type="CAUSAL_LM", target_modules=lora_targets(model),
                      modules_to_save=_modules_to_save(cfg, model))


def _modules_to_save(cfg: TrainConfig, model) -> list[str] | None:
    """Check the names up front: PEFT silently ignores one that matches nothing."""
    if not cfg.modules_to_save:
        return None
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in cfg.modules_to_save if m not in names]
    if missing:
        raise DeepRedError(f"--modules_to_save: {', '.join(missing)} not found in this model "
                           "(names are module names such as lm_head or embed_tokens)")
    if getattr(model.config, "tie_word_embeddings", False) and {"lm_head", "embed_tokens"} & set(cfg.modules_to_save):
        raise DeepRedError("--modules_to_save lm_head/embed_tokens: this model ties its input and output embeddings, "
                           "and training one copy would untie them in the merged model; use LoRA only")
    return list(cfg.modules_to_save)


# ---------------------------------------------------------------------------------------------------------------
# callbacks


def _callbacks():
    from transformers import TrainerCallback

    class ProgressBar(TrainerCallback):
        """One tqdm bar over optimizer steps with the latest loss and the ETA."""

        def __init__(self):
            self.bar = None
            self.postfix = {}

        def on_train_begin(self, args, state, control, **kwargs):
            from tqdm.auto import tqdm

            if state.is_world_process_zero:
                self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training", unit="step",
                                dynamic_ncols=True)

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.bar and logs:
                for key in ("loss", "eval_loss"):
                    if key in logs:
                        self.postfix[key] = f"{logs[key]:.3f}"
                self.bar.set_postfix(self.postfix)

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar:
                self.bar.close()

    class GracefulStop(TrainerCallback):
        """First SIGINT/SIGTERM: save a checkpoint at the current step and stop. A second one stops at once."""

        def __init__(self):
            self.requested = None
            self.previous = {}

        def _handler(self, signum, frame):
            if self.requested is not None:
                raise KeyboardInterrupt
            self.requested = signal.Signals(signum).name

        def on_train_begin(self, args, state, control, **kwargs):
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    self.previous[sig] = signal.signal(sig, self._handler)
                except ValueError:  # not the main thread
                    pass

        def on_step_end(self, args, state, control, **kwargs):
            if self.requested:
                control.should_save = True
                control.should_training_stop = True

        def on_train_end(self, args, state, control, **kwargs):
            for sig, handler in self.previous.items():
                signal.signal(sig, handler)

    return ProgressBar(), GracefulStop()


# ---------------------------------------------------------------------------------------------------------------
# the training flow


def train(cfg: TrainConfig, log=print, callbacks=(), given: set[str] | None = None,
          command: str | None = "deepred train") -> TrainResult:
    """Train; `given` names the settings the user typed (None: all of them, as from code). On resume the rest come
    from the run's run_config.json. `command` is how the user started training, for the printed resume command
    (None: the caller explains how to resume)."""
    from accelerate import PartialState

    hw = detect_hardware(cfg.precision)
    # cpu=True lets accelerate see a torchrun launch on CPUs (gloo); without it every rank believes it is rank 0
    state = PartialState(cpu=hw.device == "cpu")
    if not state.is_main_process:
        log = lambda *a, **k: None  # noqa: E731 - only rank 0 talks
    output_dir = _agree_across_ranks(state, _choose_output_dir(cfg, log))
    recorded = _recorded_run(cfg, output_dir) if _resuming(cfg) else None
    if recorded:
        cfg = resumed_config(dataclasses.replace(cfg, output_dir=str(output_dir)),
                             {f.name for f in dataclasses.fields(TrainConfig)} if given is None else given,
                             recorded, log)
        finished = _finished(output_dir)
        if finished is not None:
            log(f"{output_dir} already finished training (final/ holds its adapter); nothing to resume")
            return finished
        hw = detect_hardware(cfg.precision)  # the recorded precision
    report, data_hash = load_for_training(cfg.dataset, cfg.skip_invalid, log)
    _quiet_dataset_maps()

    base_model = resolve_base_model(cfg.base_model)
    if state.is_main_process:
        _ensure_writable(output_dir)
    resume = _resume_point(cfg, output_dir, base_model, data_hash, log)

    tokenizer = load_tokenizer(base_model, cfg.trust_remote_code)
    # Loss on what the model writes (replies and their end-of-turn token), located with its own chat template
    tokenized = tokenize_examples(report.examples, ChatFormat.of(tokenizer, log), report.path)
    lengths = [len(row["input_ids"]) for row in tokenized]
    log(summarize(report, lengths, cfg.max_seq_length))

    plan = plan_batches(cfg, hw)
    log(f"device: {hw.describe()}, profile {cfg.profile}: {plan.describe(hw.world_size)}")

    examples = truncate_rows(_sample(tokenized, cfg.max_samples, cfg.seed, log), cfg.max_seq_length, log)
    train_set, eval_set = _split(examples, cfg.val_split, cfg.seed)
    started = time.time()
    while True:
        model = load_model(cfg, base_model, hw)
        if plan.padding_free and not keeps_packed_examples_apart(model):
            log(f"{type(model).__name__} does not build its attention mask from packed positions; padded batches")
            plan = dataclasses.replace(plan, padding_free=False)
        peft_config = lora_config(cfg, model)
        trainer = _build_trainer(cfg, model, tokenizer, peft_config, train_set, eval_set, output_dir, plan, hw)
        record = _run_config_writer(state, output_dir, cfg, base_model, report, data_hash, lengths, hw, peft_config,
                                    len(examples))
        record(plan)
        if hw.device == "cuda" and plan.padding_free and plan.loss != "trl" and plan.max_tokens_per_pass is None:
            trainer.add_callback(_memory_probe(trainer, plan, [len(row["input_ids"]) for row in examples], log, record))
        progress, stopper = _callbacks()
        for callback in (progress, stopper, *callbacks):
            trainer.add_callback(callback)
        try:
            outcome = trainer.train(resume_from_checkpoint=resume)
            break
        except Exception as exc:  # noqa: BLE001 - out of memory is retried smaller or translated
            smaller = _smaller_plan(plan, cfg, exc)
            if smaller is None:
                _raise_if_oom(exc, cfg)
                raise
            log(f"\nout of memory with micro-batch {plan.micro_batch}; retrying with {smaller.describe(hw.world_size)}")
            plan = smaller
            del trainer, model
            _free_accelerator_memory()
            checkpoint = latest_checkpoint(output_dir)
            resume = str(checkpoint) if checkpoint else resume
    if stopper.requested:
        checkpoint = latest_checkpoint(output_dir)
        log(f"\n{stopper.requested}: stopped at step {trainer.state.global_step}; checkpoint {checkpoint}."
            + (f" Resume with: {command} --output_dir {output_dir} --resume_latest" if command else ""))
        return TrainResult(output_dir, None, {}, interrupted=True)

    metrics = dict(outcome.metrics)
    metrics["train_wall_seconds"] = round(time.time() - started, 2)
    tokens = metrics.get("num_input_tokens_seen") or trainer.state.num_input_tokens_seen
    if tokens and metrics.get("train_runtime"):
        metrics["train_tokens_per_second"] = round(tokens / metrics["train_runtime"], 1)
    eval_metrics = trainer.evaluate() if eval_set is not None else {"skipped": "no validation split (--val_split 0)"}

    final_dir = output_dir / "final"
    if trainer.is_fsdp_enabled:  # every rank gathers its shards of the adapter (FULL_STATE_DICT); rank 0 writes
        trainer.save_model(str(final_dir))
    if state.is_main_process:
        if not trainer.is_fsdp_enabled:
            trainer.model.save_pretrained(final_dir, safe_serialization=True)
        tokenizer.save_pretrained(final_dir)
        write_json(output_dir / "train_results.json", metrics)
        write_json(output_dir / "eval_results.json", eval_metrics)
        write_adapter_cards(output_dir, cfg.base_model)
        plot_loss_curve(trainer.state.log_history, output_dir / "loss_curve.png")
        log(next_commands(cfg.base_model, final_dir))
    state.wait_for_everyone()
    return TrainResult(output_dir, final_dir, metrics)


def _quiet_dataset_maps() -> None:
    """TRL's label/truncation passes over a few hundred rows take milliseconds; their progress bars are noise."""
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()


def _agree_across_ranks(state, output_dir: Path) -> Path:
    """Under torchrun every rank must use rank 0's timestamped folder name."""
    if state.num_processes == 1:
        return output_dir
    from accelerate.utils import broadcast_object_list

    holder = [str(output_dir)]
    broadcast_object_list(holder, from_process=0)
    return Path(holder[0])


def _sample(examples: list[dict], max_samples: int | None, seed: int, log) -> list[dict]:
    if max_samples is None or max_samples >= len(examples):
        return examples
    if max_samples < 1:
        raise DeepRedError(f"--max_samples must be at least 1 (got {max_samples})")
    import random

    chosen = sorted(random.Random(seed).sample(range(len(examples)), max_samples))
    log(f"--max_samples {max_samples}: training on a seeded sample of {max_samples} of {len(examples)} examples")
    return [examples[i] for i in chosen]


def truncate_rows(rows: list[dict], max_seq_length: int, log) -> list[dict]:
    """Cut tokenized rows to --max_seq_length, leaving out (and saying so) those whose whole reply is cut off: they
    carry no loss."""
    cut = [{key: value[:max_seq_length] for key, value in row.items()} for row in rows]
    kept = [row for row in cut if any(row["assistant_masks"])]
    if len(kept) < len(cut):
        log(f"{len(cut) - len(kept)} example(s) have no reply token within --max_seq_length {max_seq_length} and are "
            "left out of training; raise --max_seq_length to keep them")
    if not kept:
        raise DeepRedError(f"no example has a reply token within --max_seq_length {max_seq_length}; raise it")
    return kept


def _split(rows: list[dict], val_split: float, seed: int):
    """Hold out a seeded validation split of tokenized rows (input_ids, assistant_masks)."""
    from datasets import Dataset

    dataset = Dataset.from_list(rows)
    n_val = math.ceil(len(rows) * val_split) if val_split > 0 else 0
    if n_val == 0 or len(rows) - n_val < 1:
        return dataset, None
    split = dataset.train_test_split(test_size=n_val, seed=seed, shuffle=True)
    return split["train"], split["test"]


def supervised_loss(head, hidden, targets, kind: str, cpu_bf16: bool):
    """Summed cross-entropy of `targets` from the final hidden states of the supervised positions only.

    The output layer is most of the cost of a step with a 150k vocabulary; scoring only the reply tokens instead of
    every position (system prompt and question included) is the same loss for a fraction of the work.
    """
    import torch

    hidden = hidden.to(head.weight.dtype)  # a bf16 model on CUDA can hand back the final norm's float32
    if kind == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")(head.weight, hidden, targets, head.bias)
        return loss[0] if isinstance(loss, tuple) else loss
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_bf16):  # as accelerate runs the body
        logits = head(hidden)
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")


def split_packed_batch(inputs: dict, max_tokens: int | None) -> list[dict]:
    """A padding-free batch (one row of concatenated examples) cut at example boundaries into pieces of at most
    `max_tokens` tokens (an example longer than that is a piece of its own). Other batches are returned whole."""
    ids = inputs["input_ids"]
    if not max_tokens or "position_ids" not in inputs or ids.shape[0] != 1 or ids.shape[1] <= max_tokens:
        return [inputs]
    starts = (inputs["position_ids"][0] == 0).nonzero().flatten().tolist()
    total = ids.shape[1]
    pieces, lo = [], 0
    for start, end in zip(starts, starts[1:] + [total]):
        if end - lo > max_tokens and start > lo:  # this example would overflow the piece: start a new one
            pieces.append((lo, start))
            lo = start
    pieces.append((lo, total))
    return [_packed_piece(inputs, lo, hi) for lo, hi in pieces]


def _packed_piece(inputs: dict, lo: int, hi: int) -> dict:
    import torch

    piece = {key: inputs[key][:, lo:hi] for key in ("input_ids", "labels", "position_ids") if key in inputs}
    if "cu_seq_lens_q" in inputs:  # the varlen kernels' sequence boundaries, as TRL's collator builds them
        starts = (piece["position_ids"][0] == 0).nonzero().flatten()
        cu = torch.cat([starts, torch.tensor([hi - lo], device=starts.device)]).to(torch.int32)
        piece["cu_seq_lens_q"] = piece["cu_seq_lens_k"] = cu
        piece["max_length_q"] = piece["max_length_k"] = int(cu.diff().max())
    if "seq_idx" in inputs:
        piece["seq_idx"] = inputs["seq_idx"][:, lo:hi] - inputs["seq_idx"][0, lo]
    return piece


def _trainer_class(plan: BatchPlan, hw: Hardware):
    """TRL's SFTTrainer where the plan's loss is TRL's (reference profile, FSDP); otherwise one that scores only
    the supervised positions and keeps each forward pass within the token budget. The loss is TRL's: the sum of
    token losses over the supervised positions divided by the number of supervised tokens in the effective batch."""
    import contextlib

    import torch
    from trl import SFTTrainer

    if plan.loss == "trl":
        return SFTTrainer

    class DeepRedSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if return_outputs:
                return super().compute_loss(model, inputs, True, num_items_in_batch)
            model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
            # Through the (DDP/PEFT) wrapper for the body; logits for one position only, then the head on the
            # supervised positions. The last hidden state is the one after the final norm.
            out = model(**model_inputs, use_cache=False, output_hidden_states=True, logits_to_keep=1)
            targets = inputs["labels"][:, 1:]  # hidden state i predicts token i+1
            mask = targets != -100
            head = self.accelerator.unwrap_model(model).get_output_embeddings()
            kind = plan.loss if isinstance(head, torch.nn.Linear) else "supervised"
            loss = supervised_loss(head, out.hidden_states[-1][:, :-1][mask], targets[mask], kind,
                                   cpu_bf16=hw.device == "cpu" and self.args.bf16)
            num_tokens = mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = loss / torch.as_tensor(num_tokens).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients; the count covers all ranks
            return loss

        max_tokens_per_pass: int | None = None

        def training_step(self, model, inputs, num_items_in_batch=None):
            pieces = split_packed_batch(inputs, self.max_tokens_per_pass)
            if len(pieces) == 1:
                return super().training_step(model, inputs, num_items_in_batch)
            if num_items_in_batch is None:
                num_items_in_batch = (inputs["labels"][:, 1:] != -100).sum()
            total = 0
            for i, piece in enumerate(pieces):
                # gradients are synchronised across processes once, with the last piece
                last = i == len(pieces) - 1
                with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                    total = total + super().training_step(model, piece, num_items_in_batch)
            return total

        def _track_num_input_tokens(self, inputs):
            if "attention_mask" not in inputs and "position_ids" in inputs:  # padding-free: every token is real
                inputs = {**inputs, "attention_mask": torch.ones_like(inputs["input_ids"])}
            super()._track_num_input_tokens(inputs)

    return DeepRedSFTTrainer


def _build_trainer(cfg, model, tokenizer, peft_config, train_set, eval_set, output_dir, plan, hw):
    from trl import SFTConfig

    args = SFTConfig(
        output_dir=str(output_dir),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=plan.micro_batch,
        per_device_eval_batch_size=plan.micro_batch,
        gradient_accumulation_steps=plan.accumulation,
        gradient_checkpointing=plan.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a float below 1 is a ratio of the total steps
        weight_decay=0.0,
        max_length=None,  # rows arrive cut to --max_seq_length (truncate_rows), as padding-free batches require
        assistant_only_loss=False,  # the rows carry assistant_masks from the model's own template (chat_template.py)
        packing=False,
        padding_free=plan.padding_free,
        train_sampling_strategy="random",  # the same examples in the same order under every profile
        pad_to_multiple_of=8 if hw.device == "cuda" and not plan.padding_free else None,
        use_liger_kernel=plan.liger_layer_kernels,
        optim="adamw_torch_fused" if hw.device == "cuda" else "adamw_torch",
        bf16=hw.bf16,
        fp16=hw.fp16,
        use_cpu=hw.device == "cpu",
        ddp_backend="gloo" if hw.device == "cpu" and hw.world_size > 1 else None,
        ddp_find_unused_parameters=False if hw.world_size > 1 else None,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        eval_strategy="steps" if eval_set is not None else "no",
        eval_steps=cfg.eval_steps,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=_report_to(cfg),
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        dataloader_pin_memory=hw.device == "cuda",
        dataloader_num_workers=2 if hw.device == "cuda" else 0,
        dataset_num_proc=None,
    )
    from transformers import PrinterCallback, ProgressCallback

    trainer = _trainer_class(plan, hw)(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                                       processing_class=tokenizer, peft_config=peft_config)
    trainer.max_tokens_per_pass = plan.max_tokens_per_pass
    for callback in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(callback)
    return trainer


def _report_to(cfg: TrainConfig) -> str:
    if not cfg.wandb:
        return "none"
    try:
        import wandb  # noqa: F401
    except ImportError as exc:
        raise DeepRedError("--wandb needs the wandb package: pip install wandb (then `wandb login`)") from exc
    return "wandb"


def keeps_packed_examples_apart(model) -> bool:
    """Padding-free batches are only correct where the model builds its attention mask from the restarting
    position ids (transformers' masking_utils, or the varlen flash-attention kernels)."""
    import sys

    module = sys.modules.get(type(model).__module__)
    flash = "flash" in str(getattr(model.config, "_attn_implementation", ""))
    return flash or hasattr(module, "create_causal_mask")


def worst_pass_tokens(lengths: list[int], micro_batch: int) -> int:
    """Tokens in the largest padding-free micro-batch this data can produce: its longest examples together."""
    return sum(sorted(lengths, reverse=True)[:micro_batch])


def choose_token_budget(worst: int, longest: int, try_pass) -> int | None:
    """The most tokens per forward pass that fit: `try_pass(n)` runs a pass of n tokens, raising out-of-memory if
    they do not fit. None when the worst micro-batch fits whole. Halves down to the longest example; if that does
    not fit either, the out-of-memory error goes to the caller."""
    tokens = worst
    while True:
        try:
            try_pass(tokens)
            return None if tokens == worst else tokens
        except Exception as exc:  # noqa: BLE001
            if not _is_oom(exc) or tokens <= longest:
                raise
            _free_accelerator_memory()
            tokens = max(longest, tokens // 2)


def fit_token_budget(trainer, plan: BatchPlan, lengths: list[int], log) -> BatchPlan:
    """Memory probe before the first step (on GPUs): run the forward and backward pass of the worst micro-batch
    this data can produce, and cut passes to a token budget that fits if it does not. No gradients, random state
    or weights are changed, so training is the same as without the probe."""
    worst, longest = worst_pass_tokens(lengths, plan.micro_batch), max(lengths)
    budget = choose_token_budget(worst, longest, lambda n: _probe_pass(trainer, n, longest))
    trainer.max_tokens_per_pass = budget
    if budget:
        log(f"memory probe: {worst:,} tokens in one pass do not fit; passes cut to {budget:,} tokens (same "
            "gradients, more passes)")
    return dataclasses.replace(plan, max_tokens_per_pass=budget)


def _memory_probe(trainer, plan: BatchPlan, lengths: list[int], log, record):
    """fit_token_budget when training begins: after the Trainer has turned on checkpointing and Liger's kernels,
    which change the memory a pass needs. Out of memory there goes to train()'s back-off like any other."""
    from transformers import TrainerCallback

    class MemoryProbe(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            record(fit_token_budget(trainer, plan, lengths, log))

    return MemoryProbe()


def _probe_pass(trainer, tokens: int, longest: int) -> None:
    import torch

    model = trainer.model
    lengths = [longest] * (tokens // longest) + ([tokens % longest] if tokens % longest else [])
    generator = torch.Generator().manual_seed(0)  # its own random numbers: training's stay untouched
    ids = torch.randint(0, model.get_input_embeddings().num_embeddings, (1, tokens), generator=generator)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    inputs = trainer._prepare_inputs({"input_ids": ids, "labels": ids.clone(), "position_ids": positions})
    was_training = model.training
    model.eval()  # no dropout: it would draw from the training's random stream
    try:
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(model, inputs, num_items_in_batch=tokens)
        loss.backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        del inputs
        _free_accelerator_memory()


def _is_oom(exc: BaseException) -> bool:
    return "out of memory" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError"


def _smaller_plan(plan: BatchPlan, cfg: TrainConfig, exc: BaseException) -> BatchPlan | None:
    """OOM back-off: halve the micro-batch, raising accumulation to keep the effective batch; at micro-batch 1 turn
    on gradient checkpointing (it costs about a third of the speed, so only when memory needs it). Only for a plan
    the product chose (not --micro_batch_size, not the reference profile, which must run as written)."""
    if not _is_oom(exc) or cfg.micro_batch_size or cfg.profile == "reference":
        return None
    if plan.micro_batch == 1:
        return None if plan.gradient_checkpointing else dataclasses.replace(plan, gradient_checkpointing=True)
    per_process = plan.micro_batch * plan.accumulation
    micro = plan.micro_batch // 2
    while per_process % micro:
        micro -= 1
    return dataclasses.replace(plan, micro_batch=micro, accumulation=per_process // micro)


def _free_accelerator_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _raise_if_oom(exc: BaseException, cfg: TrainConfig) -> None:
    if _is_oom(exc):
        raise DeepRedError(
            f"out of memory at --max_seq_length {cfg.max_seq_length}, --batch_size {cfg.batch_size}: try "
            "--max_seq_length 768 or 512, --profile lean, a smaller --micro_batch_size, or --use_4bit") from exc


def _run_config_writer(state, output_dir, cfg, base_model, report, data_hash, lengths, hw, peft_config,
                       examples_used: int):
    """Writes run_config.json for a batch plan (again when the memory probe sets the token budget); rank 0 only."""
    def record(plan: BatchPlan) -> None:
        if state.is_main_process:
            _write_run_config(output_dir, cfg, base_model, report, data_hash, lengths, plan, hw, peft_config,
                              examples_used)
    return record


def _write_run_config(output_dir, cfg, base_model, report, data_hash, lengths, plan, hw, peft_config,
                      examples_used: int) -> None:
    over = sum(1 for n in lengths if n > cfg.max_seq_length)
    write_json(output_dir / "run_config.json", {
        "config": dataclasses.asdict(cfg),
        "base_model": base_model,
        "dataset": str(report.path),
        "dataset_sha256": data_hash,
        "examples": len(report.examples),
        "examples_used": examples_used,  # fewer with --max_samples
        "invalid_lines_skipped": report.invalid_lines,
        "truncated_examples": over,
        "tokens_total": sum(lengths),
        "effective_batch": cfg.batch_size * cfg.gradient_accumulation_steps,
        "batch_plan": dataclasses.asdict(plan),
        "hardware": dataclasses.asdict(hw),
        "lora_target_modules": peft_config.target_modules if isinstance(peft_config.target_modules, str)
        else sorted(peft_config.target_modules),
        "started": datetime.now().isoformat(timespec="seconds"),
    })


def plot_loss_curve(log_history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="training loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_title("Deep Red persona fine-tuning")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _finished(output_dir: Path) -> TrainResult | None:
    final_dir = output_dir / "final"
    if not (final_dir / "adapter_model.safetensors").is_file():
        return None
    try:
        metrics = json.loads((output_dir / "train_results.json").read_text())
    except (OSError, ValueError):
        metrics = {}
    return TrainResult(output_dir, final_dir, metrics)


def next_commands(base_model: str, final_dir: Path) -> str:
    merged = final_dir.parent / "merged"
    gguf = final_dir.parent / "deepred-q4_k_m.gguf"
    return "\n".join([
        f"\nadapter saved to {final_dir}. Next:",
        f"  python scripts/merge_lora.py --base_model {base_model} --lora_path {final_dir} --output_path {merged} --verify",
        f"  python scripts/convert_to_gguf.py --model_path {merged} --output_path {gguf} --quant_type q4_k_m",
        f"  deepred deploy {gguf} --name deepred",
    ])
