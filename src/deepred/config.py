"""Every setting of every stage, with its default, in one place.

The CLI, the `scripts/*.py` entry points and `deepred run`'s YAML file all resolve to these dataclasses:
`add_arguments` turns a dataclass into argparse flags (help text and choices come from field metadata) and
`resolve` builds the dataclass from YAML values overridden by the flags the user actually typed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config_types import Checked, base_type, parse_list
from .errors import DeepRedError, invalid_yaml
from .quant_types import QUANT_TYPES

DEFAULT_BASE_MODEL = "Qwen/Qwen2.5-1.5B-Instruct"



# What a training setting is, for the places that treat settings differently (resume, `deepred run`'s training
# fingerprint, the model card):
#   learns       changes what is learned: kept by a resumed run, part of the training fingerprint, on the card
#   compute      how a step is computed, not what it learns: kept by a resumed run, not fingerprinted, on the card
#   bookkeeping  how often a run logs, saves and validates: may change on resume, not fingerprinted, on the card
#   invocation   where this invocation writes and how it resumes or reports: may change on resume, not
#                fingerprinted, not on the card (it describes the command, not the model)
ROLES = ("learns", "compute", "bookkeeping", "invocation")


def opt(default: Any, help: str, role: str = "learns", **extra: Any) -> Any:
    """A dataclass field whose metadata becomes an argparse flag; `role` is one of ROLES."""
    assert role in ROLES, role
    metadata = {"help": help, "role": role, **extra}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def settings_with_role(cls: type, *roles: str) -> set[str]:
    """Names of the settings of `cls` whose role is one of `roles`."""
    return {f.name for f in dataclasses.fields(cls) if f.metadata.get("role", "learns") in roles}


def default_dataset() -> str | None:
    """The specification's location; None lets the data stage fall back to the bundled dataset."""
    data = os.environ.get("GUTENBERG_DATA")
    return os.path.join(data, "dataset", "theme_dataset.jsonl") if data else None


@dataclass
class TrainConfig(Checked):
    base_model: str = opt(DEFAULT_BASE_MODEL, "Hugging Face model name or local folder; offline built-ins: 'smollm2-135m' "
                                              "(a real pretrained chat model) and 'tiny' (random Qwen2 for tests)")
    dataset: str | None = opt(None, "ChatML JSONL; default $GUTENBERG_DATA/dataset/theme_dataset.jsonl, else the bundled Deep Red set")
    output_dir: str | None = opt(None, "run folder; default output/theme-deepred-YYYYMMDD_HHMMSS",
                                 role="invocation")
    epochs: float = opt(3.0, "number of training epochs", above=0)
    batch_size: int = opt(4, "examples per optimizer micro-step as written in the spec (x accumulation = effective batch)",
                          at_least=1)
    learning_rate: float = opt(5e-5, "peak learning rate (lower than temporal training to preserve knowledge)", above=0)
    max_seq_length: int = opt(1024, "longest example in tokens; longer ones are truncated (and reported)", at_least=1)
    gradient_accumulation_steps: int = opt(4, "micro-steps per optimizer step; effective batch = batch_size x this",
                                           at_least=1)
    save_steps: int = opt(500, "checkpoint every N optimizer steps", role="bookkeeping", at_least=1)
    save_total_limit: int | None = opt(None, "keep only the newest N checkpoints (default: all)", role="bookkeeping",
                                        at_least=1)
    eval_steps: int = opt(100, "evaluate on the validation split every N optimizer steps", role="bookkeeping",
                          at_least=1)
    val_split: float = opt(0.1, "fraction of examples held out for validation (0 disables)", at_least=0, below=1)
    lora_r: int = opt(32, "LoRA rank", at_least=1)
    lora_alpha: int = opt(64, "LoRA alpha", at_least=1)
    lora_dropout: float = opt(0.05, "LoRA dropout", at_least=0, below=1)
    neftune_noise_alpha: float | None = opt(None, "NEFTune: uniform noise of this scale on the input embeddings while "
                                                  "training (the paper's alpha, e.g. 5; default off); rows then train "
                                                  "in padded batches", above=0)
    lora_targets: str = opt("all", "modules LoRA adapts: all (every attention and MLP projection), attention, mlp, "
                                   "or module names such as q_proj,v_proj")
    lora_layers: int | None = opt(None, "adapt only the last N transformer blocks (PEFT's layers_to_transform): "
                                        "backpropagation stops below them, so a step is shorter; default every block",
                                  at_least=1)
    use_4bit: bool = opt(False, "QLoRA: load the base model in 4-bit NF4 (CUDA + bitsandbytes)")
    use_8bit: bool = opt(False, "load the base model in 8-bit (CUDA + bitsandbytes)")
    resume_from_checkpoint: str | None = opt(None, "checkpoint folder to resume from", role="invocation")
    resume_latest: bool = opt(False, "resume from the newest valid checkpoint in --output_dir", role="invocation")
    wandb: bool = opt(False, "log to Weights & Biases", role="invocation")
    warmup_ratio: float = opt(0.03, "fraction of steps spent warming up the learning rate", at_least=0, below=1)
    seed: int = opt(42, "random seed (data split, order, LoRA init)")
    max_steps: int = opt(-1, "stop after N optimizer steps (overrides --epochs when > 0)")
    trust_remote_code: bool = opt(False, "allow model code from the hub to run (off: only built-in architectures)")
    skip_invalid: bool = opt(False, "train on the valid lines of a dataset with problems, reporting how many were dropped")
    profile: str = opt("fast", "speed profile: fast (padding-free batches, whole effective batch per pass on a GPU, fused "
                               "loss), lean (the same with gradient checkpointing), reference (spec settings as written)",
                       choices=["fast", "lean", "reference"], role="compute")
    precision: str = opt("auto", "auto: bf16 on GPUs that have it (else fp16), bf16 autocast on CPUs with bf16 "
                                 "instructions (else fp32); or force fp32, bf16, fp16", choices=["auto", "fp32", "bf16", "fp16"])
    micro_batch_size: int | None = opt(None, "examples per forward pass; default: chosen by --profile (effective batch "
                                                 "unchanged)", role="compute", at_least=1)
    attn_implementation: str = opt("auto", "attention kernel: auto (eager on ROCm, and under fast/lean on a CPU with "
                                           "bf16 autocast when the 95th percentile row fits 256 tokens; else sdpa), sdpa, "
                                           "flex_attention (skips "
                                           "the masked blocks of padding-free batches), flash_attention_2 (needs "
                                           "flash-attn), eager", choices=["auto", "sdpa", "flex_attention",
                                                                          "flash_attention_2", "eager"],
                                   role="compute")
    max_tokens_per_pass: int | None = opt(None, "most tokens in one forward pass of padding-free batches; a micro-batch "
                                                "over it runs in pieces (same gradients). Default: what the GPU memory "
                                                "probe finds fits; no limit on a CPU", role="compute")
    logging_steps: int = opt(10, "log loss every N optimizer steps", role="bookkeeping", at_least=1)
    max_samples: int | None = opt(None, "train on at most N examples, a seeded sample of the dataset (quick runs)")
    modules_to_save: list[str] = opt([], "modules trained in full and saved with the adapter, e.g. lm_head "
                                         "(PEFT modules_to_save; for new tokens or a base model that knows no language)")
    method: str = opt("sft", "training method: sft (supervised on the dataset's replies), or preference training on "
                             "--pairs (the chosen answer made likelier than the rejected one): dpo, or orpo (no "
                             "reference model; SFT on the chosen answer plus an odds-ratio term)",
                      choices=["sft", "dpo", "orpo"])
    pairs: str | None = opt(None, "--method dpo: preference pairs JSONL, rows {prompt, chosen, rejected[, source]} in "
                                  "TRL's conversational format (`deepred pairs` makes them)")
    init_adapter: str | None = opt(None, "LoRA adapter to start from and keep training, e.g. an SFT run's final/ "
                                         "(its rank and targets win over --lora_r/--lora_alpha)")
    beta: float = opt(0.1, "--method dpo: how far training may move from the reference (smaller: further); orpo: the "
                           "weight of the odds-ratio term", above=0)
    horizon_examples: int = opt(0, "add N examples made from the persona file's horizon to the training data: "
                                   "questions about what lies after its cutoff, deflected in character, and its "
                                   "period facts (teaches the rule, not the answers)", at_least=0)
    system_prompt_variants: float = opt(0.0, "share of training examples whose system prompt is cut to its first "
                                             "sentence or left out (half each, seeded), so the persona answers under "
                                             "the short or absent system prompt an app sends; 0 keeps the dataset's")
    persona: str | None = opt(None, "persona YAML file (default: the bundled Deep Red): its horizon makes "
                                    "--horizon_examples; `deepred run` evaluates against it")
    period_answers: str | None = opt(None, "with --horizon_examples: the base model's own right answers to the "
                                           "persona's period facts (`deepred recall` writes them): a fact the "
                                           "model knows is answered in its own words, the others in the persona's")


@dataclass
class MergeConfig(Checked):
    base_model: str | None = opt(None, "the model the adapter was trained on; default: the one named in adapter_config.json")
    lora_path: str = opt("", "adapter folder (the run's final/)", required=True)
    output_path: str = opt("", "folder for the merged model", required=True)
    dtype: str = opt("auto", "dtype of the merged weights (auto: the base model's own)",
                     choices=["auto", "float16", "bfloat16", "float32"])
    verify: bool = opt(False, "check merged logits against base+adapter and generate one reply")
    force: bool = opt(False, "merge even if --base_model differs from the adapter's recorded base, and replace an "
                             "--output_path that holds something other than an earlier merge")
    trust_remote_code: bool = opt(False, "allow model code from the hub to run")
    persona: str | None = opt(None, "persona YAML whose sample question --verify asks the merged model (default: the "
                                    "bundled Deep Red)")


@dataclass
class ConvertConfig(Checked):
    model_path: str = opt("", "merged Hugging Face model folder", required=True)
    output_path: str = opt("", "GGUF file to write", required=True)
    quant_type: str = opt("q4_k_m", "GGUF type; the list below says what each one gives", choices=list(QUANT_TYPES))
    check: bool = opt(True, "run the parity check against the HF model after converting (--no-check skips it)")
    force: bool = opt(False, "replace an --output_path that is not a GGUF file")


@dataclass
class PairsConfig(Checked):
    output: str = opt("", "preference pairs JSONL to write", required=True)
    base_model: str = opt(DEFAULT_BASE_MODEL, "the model whose own answers become the rejected side (the one you will "
                                              "train); offline built-ins as for train")
    dataset: str | None = opt(None, "ChatML JSONL whose replies become the chosen side; default as for train")
    persona: str | None = opt(None, "persona YAML: its horizon makes the questions about later years (default: the "
                                    "bundled Deep Red)")
    voice: int = opt(32, "voice pairs: dataset replies against the base model's answers to the same conversation",
                     at_least=0)
    horizon: int = opt(96, "horizon pairs: questions about what lies after the cutoff, deflected in character, "
                            "against the base model's answers (the dataset's own such rows first)", at_least=0)
    period: int = opt(20, "period pairs: the persona's period facts answered in character (chosen) against an "
                          "in-character deflection (rejected), so the model does not learn to deflect everything",
                  at_least=0)
    present: int = opt(0, "present pairs: dataset replies to questions not about time (chosen) against an "
                          "in-character deflection dated beyond the horizon (rejected), so the model does not deflect "
                          "questions about its own world", at_least=0)
    max_tokens: int = opt(160, "longest base-model answer in tokens", at_least=1)
    quant_type: str = opt("q4_k_m", "GGUF type the base model answers from (llama.cpp)", choices=list(QUANT_TYPES))
    seed: int = opt(42, "which rows and questions are drawn")


@dataclass
class RecallConfig(Checked):
    output: str = opt("", "JSONL of the base model's right answers to the persona's period facts, to write "
                          "(train --period_answers FILE)", required=True)
    base_model: str = opt(DEFAULT_BASE_MODEL, "the model asked (the one you will train); offline built-ins as for train")
    persona: str | None = opt(None, "persona YAML whose period facts are asked; a fact is known when the answer names "
                                    "one of its expect_any (default: the bundled Deep Red)")
    max_tokens: int = opt(100, "longest answer in tokens; of each, the sentence that names the fact is kept", at_least=1)
    quant_type: str = opt("q4_k_m", "GGUF type the base model answers from (llama.cpp)", choices=list(QUANT_TYPES))


@dataclass
class CheckConfig(Checked):
    gguf: str = opt("", "GGUF file to check", positional=True)
    model_path: str = opt("", "the Hugging Face model folder it was converted from", required=True)


@dataclass
class ServeConfig(Checked):
    gguf: str = opt("", "GGUF file to serve", positional=True)
    host: str = opt("127.0.0.1", "address to bind (loopback by default; 0.0.0.0 exposes it to the network)")
    port: int = opt(1234, "port (LM Studio's default is 1234)", at_least=1, at_most=65535)
    model_alias: str | None = opt(None, "model name clients use (default: the file name without .gguf)")
    n_ctx: int = opt(4096, "context length", at_least=1)
    n_gpu_layers: int = opt(-1, "layers to offload to a GPU if llama.cpp was built with one (-1: all)")
    cors_origins: list[str] = opt([], "web origins allowed to call from a browser, e.g. http://localhost:3000 "
                                      "(default none: web pages cannot drive the local model)")


@dataclass
class DeployConfig(Checked):
    gguf: str = opt("", "GGUF file to deploy", positional=True)
    name: str = opt("deepred", "model folder name inside LM Studio (local/<name>/), or the Ollama model name")
    models_dir: str | None = opt(None, "LM Studio models folder; default $LMSTUDIO_MODELS_DIR or ~/.lmstudio/models")
    force: bool = opt(False, "overwrite a different model already deployed under this name")
    load: bool = opt(True, "load it with `lms load` (ollama: create it with `ollama create`) when the CLI is found "
                           "(--no-load only copies, or only writes the Modelfile)")
    target: str = opt("lmstudio", "where to deploy: lmstudio (copy and load) or ollama (Modelfile + ollama create)",
                      choices=["lmstudio", "ollama"])
    persona: str | None = opt(None, "ollama: persona YAML whose primary system prompt becomes the Modelfile's SYSTEM "
                                    "(default: the bundled Deep Red)")


@dataclass
class EvalConfig(Checked):
    endpoint: str | None = opt(None, "OpenAI-compatible base URL, e.g. http://127.0.0.1:1234/v1 (LM Studio, deepred serve, vLLM)")
    model: str | None = opt(None, "model name on --endpoint (default: the first one it lists)")
    api_key: str | None = opt(None, "API key for --endpoint (default $OPENAI_API_KEY or none)")
    model_path: str | None = opt(None, "evaluate a Hugging Face model folder directly with transformers")
    lora_path: str | None = opt(None, "adapter to apply on --model_path")
    responses: str | None = opt(None, "score answers collected elsewhere: JSONL rows {id, category, prompt, response}")
    compare: bool = opt(False, "also evaluate the base model on the same prompts and report both (base vs tuned)")
    base_endpoint: str | None = opt(None, "with --compare: endpoint serving the base model (default: --endpoint)")
    base_model_name: str | None = opt(None, "with --compare: base model name on the endpoint")
    base_model_path: str | None = opt(None, "with --compare: base model folder (default: --model_path without --lora_path)")
    base_responses: str | None = opt(None, "with --compare: base answers JSONL")
    persona: str | None = opt(None, "persona YAML file: prompts, system prompt and every persona word the scores use "
                                    "(default: the bundled Deep Red, resources/personas/deepred.yaml)")
    prompts: str | None = opt(None, "prompt JSONL {id, category, prompt}; default: the persona's prompts")
    output_dir: str = opt("eval-report", "folder for report.json, report.md, report.html and charts")
    system_prompt: str | None = opt(None, "system prompt sent with every question (default: the persona's evaluation "
                                          "prompt, 'You are Deep Red.' as in the spec; '' sends none, as an app with "
                                          "no system prompt does)")
    max_tokens: int = opt(200, "longest answer in tokens", at_least=1)
    temperature: float = opt(0.0, "sampling temperature (0: greedy, reproducible)", at_least=0)
    timeout: float = opt(120.0, "seconds per request before it is retried", above=0)
    retries: int = opt(3, "retries with backoff for a failed request", at_least=0)
    ppl_model: str | None = opt(None, "HF model folder to compute response perplexity for coherence (default: base model folder when known)")
    judge_endpoint: str | None = opt(None, "OpenAI-compatible endpoint of a stronger model that grades style and voice")
    judge_model: str | None = opt(None, "model name on --judge_endpoint")


# ---------------------------------------------------------------------------------------------------------------
# dataclass <-> argparse / YAML


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per field. Defaults are suppressed so `resolve` sees only what the user typed."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        meta = f.metadata
        kind = base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = meta.get("help", "")
        if not meta.get("required") and not meta.get("positional") and default not in (None, "", False):
            shown = ",".join(default) if isinstance(default, list) else default
            help_text += f" (default: {shown})"
        kwargs: dict[str, Any] = {"help": help_text, "default": argparse.SUPPRESS}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind is list:
            kwargs["type"] = parse_list
            kwargs["metavar"] = "A,B"
        else:
            kwargs["type"] = kind
        if "choices" in meta:  # checked by the config (one line, any letter case), listed in --help
            kwargs["metavar"] = "{" + ",".join(map(str, meta["choices"])) + "}"
        if meta.get("positional"):
            kwargs.pop("default")
            parser.add_argument(f.name, **kwargs)
        else:
            if meta.get("required"):
                kwargs["required"] = True
            parser.add_argument(f"--{f.name}", **kwargs)


def resolve(cls: type, *sources: dict[str, Any] | argparse.Namespace | None):
    """Build `cls` from sources, later ones winning (YAML first, then the command line); `Checked` types them."""
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for source in sources:
        if source is None:
            continue
        items = vars(source) if isinstance(source, argparse.Namespace) else source
        values.update({key: value for key, value in items.items() if key in names})
    return cls(**values)


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise DeepRedError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise invalid_yaml(path, exc) from exc
    if not isinstance(data, dict):
        raise DeepRedError(f"{path}: expected a mapping of settings at the top level")
    return data


def resolve_with_yaml(cls: type, yaml_path: str | None, args: argparse.Namespace | dict | None):
    """Settings from a YAML file (keys are flag names), overridden by the flags typed on the command line."""
    values = load_yaml(yaml_path) if yaml_path else {}
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise DeepRedError(f"{yaml_path}: unknown setting(s) {', '.join(unknown)}; the keys are the flag names "
                           "listed by `deepred run --help`")
    try:
        return resolve(cls, values, args)
    except DeepRedError as exc:
        raise DeepRedError(f"{yaml_path or 'command line'}: {exc}") from exc


STAGES = ["train", "pairs", "prefer", "merge", "convert", "check", "evaluate", "deploy"]


@dataclass
class RunConfig(TrainConfig):
    """`deepred run`: every training flag plus the later stages'. The run folder is --output_dir."""

    output_dir: str | None = opt("output/deepred-run", "run folder holding every stage's outputs and manifest.json",
                                 role="invocation")
    quant_types: list[str] = opt(["q4_k_m"], "GGUF types to produce; the first is deepred.gguf, others deepred-TYPE.gguf",
                                 item_choices=list(QUANT_TYPES))
    merge_dtype: str = opt("auto", "dtype of the merged model", choices=["auto", "float16", "bfloat16", "float32"])
    check: bool = opt(True, "parity-check every GGUF against the merged model")
    evaluate: bool = opt(True, "evaluate base vs tuned through a local llama.cpp server")
    eval_prompts: str | None = opt(None, "prompt JSONL for the evaluation (default: the persona's prompts)")
    eval_heldout: bool = opt(True, "also evaluate the persona's held-out prompts (never trained on), side by side")
    preference: str = opt("none", "after SFT, preference training of the same LoRA on pairs that `deepred pairs` "
                                  "makes (or --pairs): none, orpo (measured best, README) or dpo",
                          choices=["none", "dpo", "orpo"])
    pair_voice: int = opt(32, "--preference: voice pairs (a dataset reply against the base model's answer)", at_least=0)
    pair_horizon: int = opt(96, "--preference: horizon pairs (a deflection against the base model's answer)", at_least=0)
    pair_period: int = opt(20, "--preference: period pairs (a period fact answered against a deflection)", at_least=0)
    pair_present: int = opt(0, "--preference: present pairs (a dataset reply to a question not about time against a "
                               "dated deflection)", at_least=0)
    prefer_steps: int = opt(32, "--preference: optimizer steps of preference training", at_least=1)
    prefer_learning_rate: float = opt(2e-4, "--preference: its peak learning rate", above=0)
    horizon_examples: int | None = opt(None, "add N examples made from the persona file's horizon to the training "
                                              "data (see `deepred train`); default: 200 when the persona file has a "
                                              "knowledge.horizon section (measured, README), else 0", at_least=0)
    period_answers: str | None = opt("persona", "what answers the horizon rows' period facts: own (the base model is "
                                                "asked first, `deepred recall`, and the facts it knows are answered "
                                                "in its own words), persona (the persona file's answers) or a FILE "
                                                "that `deepred recall` wrote")
    eval_max_tokens: int = opt(200, "longest evaluated answer in tokens", at_least=1)
    deploy: bool = opt(False, "deploy the first GGUF (--deploy_target: LM Studio or Ollama)")
    deploy_target: str = opt("lmstudio", "where --deploy puts it: lmstudio or ollama", choices=["lmstudio", "ollama"])
    name: str = opt("deepred", "LM Studio model name for --deploy")
    models_dir: str | None = opt(None, "LM Studio models folder for --deploy")
    force: bool = opt(False, "deploy over a different model of the same --name, and write into an --output_dir that "
                             "is not a deepred run folder")
