"""Hugging Face model cards (README.md with YAML metadata) for the adapter, the merged model and the GGUF files.

A card is rendered by a pure function (`render_card`) from a `Card`, which `gather_card` builds only from what a run
recorded: the training folder's run_config.json, train_results.json and eval_results.json, the evaluation's
report.json when the run evaluated, the persona file, the base model's own card, and the commands that reproduce
it. The caller writes it (`write_card`, or the helpers below) after its stage has saved the model: the stage
commands of the CLI, and `deepred run` once per stage that changed something. A card whose text would not change
is not rewritten.
"""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config import RunConfig, TrainConfig, settings_with_role
from ..evaluate.aggregate import METRIC_TITLES, METRICS
from ..evaluate.report_text import format_value, over_deflection, sides_of
from ..files import Log, read_json, write_atomic
from ..gguf_file import file_type_name
from ..models.registry import resolve_base_model
from ..persona import Persona, load_persona
from ..records import CARD, EVAL_RESULTS, MERGE_RECORD, RUN_CONFIG, SOURCE_RECORD, TRAIN_RESULTS, train_dir_of_adapter

MARK = "<!-- written by deepred: regenerated whenever the run's stages rerun -->"
KINDS = {  # kind -> (library_name, the Hub's base_model_relation, what the folder holds)
    "adapter": ("peft", "adapter", "LoRA adapter"),
    "merged": ("transformers", "finetune", "merged model (base model + LoRA adapter, safetensors)"),
    "gguf": ("gguf", "quantized", "GGUF files for llama.cpp, LM Studio and Ollama"),
}
# Settings that describe the command that ran, not the model (output folder, resume, logging service)
SETTINGS_SHOWN_ELSEWHERE = settings_with_role(TrainConfig, "invocation")


@dataclass
class CardSources:
    """Where a card's facts come from. train_dir: the training run folder; report: the evaluation's report.json
    (None: the run did not evaluate); persona: its file (None: Deep Red); commands: how to reproduce; files: the
    GGUFs a gguf card describes."""

    base_model: str
    train_dir: Path | None = None
    report: dict | None = None
    persona: str | None = None
    commands: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


@dataclass
class Card:
    """Everything a card says, read from disk by gather_card; render_card reads nothing else."""

    kind: str
    base_model: str  # as the user named it
    base_id: str  # the hub id a built-in was rebuilt from, else the name
    license: str | None
    family: str | None
    persona: Persona
    run: dict  # run_config.json
    train_dir_name: str | None
    earlier: dict  # run_config.json of the adapter this run continued (--init_adapter: SFT before DPO/ORPO, or more
    # SFT), or {}
    results: dict  # train_results.json and eval_results.json (eval_ prefixed)
    report: dict | None
    commands: list[str]
    files: list[tuple[str, str, float]]  # (file name, GGUF type, MiB)


# ---------------------------------------------------------------------------------------------------------------
# what the run recorded


def gather_card(kind: str, sources: CardSources) -> Card:
    base_id, license_, family = base_model_facts(sources.base_model)
    train_dir = sources.train_dir
    results = {**read_json(train_dir / TRAIN_RESULTS), **prefixed(read_json(train_dir / EVAL_RESULTS))} \
        if train_dir else {}
    files = [(Path(f).name, file_type_name(Path(f)), Path(f).stat().st_size / 2**20)
             for f in sources.files if Path(f).is_file()]
    run = read_json(train_dir / RUN_CONFIG) if train_dir else {}
    init_adapter = run.get("config", {}).get("init_adapter")
    earlier = read_json(Path(init_adapter).parent / RUN_CONFIG) if init_adapter else {}
    return Card(kind, sources.base_model, base_id, license_, family, load_persona(sources.persona), run,
                train_dir.name if train_dir else None, earlier, results, sources.report, list(sources.commands), files)


STAGE_NAMES = {"sft": "supervised fine-tuning", "dpo": "DPO", "orpo": "ORPO"}


def method_of(run: dict) -> str:
    return run.get("config", {}).get("method", "sft")


def base_model_facts(name: str) -> tuple[str, str | None, str | None]:
    """(hub id or name for base_model, license, model family) from the base folder's README front matter, deepred's
    record of a built-in model, or its config.json; a hub name not cached locally gives no license."""
    try:
        folder = Path(resolve_base_model(name)).expanduser()
    except Exception:  # noqa: BLE001 - a card never fails a stage; an unreadable base is simply not described
        folder = Path(name)
    if not folder.is_dir():
        folder = cached_snapshot(name) or folder
    source = read_json(folder / SOURCE_RECORD)  # built-in SmolLM2: the model it was rebuilt from
    front = front_matter(folder / CARD)
    config = read_json(folder / "config.json")
    license_ = front.get("license") or source.get("license") or config.get("license")
    return source.get("model") or name, license_, config.get("model_type")


def cached_snapshot(name: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json")
    except Exception:  # noqa: BLE001 - not a hub id
        return None
    return Path(found).parent if isinstance(found, str) else None


def front_matter(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return {}
    if not text.startswith("---"):
        return {}
    try:
        data = yaml.safe_load(text.split("---", 2)[1])
    except (yaml.YAMLError, IndexError):
        return {}
    return data if isinstance(data, dict) else {}


def prefixed(metrics: dict) -> dict:
    return {k if k.startswith("eval_") else f"eval_{k}": v for k, v in metrics.items()}


# ---------------------------------------------------------------------------------------------------------------
# the card


def render_card(card: Card) -> str:
    sections = [intro(card), persona_section(card.persona), files_section(card), training_section(card),
                evaluation_section(card.report), reproduce_section(card.commands)]
    return ("---\n" + yaml.safe_dump(metadata(card), sort_keys=False, allow_unicode=True) + "---\n" + MARK + "\n\n"
            + "\n\n".join(s for s in sections if s) + "\n")


def metadata(card: Card) -> dict:
    library, relation, _ = KINDS[card.kind]
    tags = ["deepred", "persona", card.persona.name, "lora", *([card.family] if card.family else []),
            *(["gguf"] if card.kind == "gguf" else ["peft"] if card.kind == "adapter" else [])]
    tags = list(dict.fromkeys(tags))  # the bundled persona is named deepred too
    meta = {"base_model": card.base_id, "base_model_relation": relation, "library_name": library,
            "pipeline_tag": "text-generation", "tags": tags}
    if card.license:
        meta["license"] = card.license
    first = card.earlier or card.run  # the ChatML set of the SFT stage, where a preference stage followed it
    if first.get("dataset"):
        meta["datasets"] = list(dict.fromkeys(Path(r["dataset"]).name for r in (first, card.run) if r.get("dataset")))
        meta["dataset_sha256"] = first.get("dataset_sha256")
        if card.earlier and method_of(card.run) != "sft":
            meta["preference_pairs_sha256"] = card.run.get("dataset_sha256")
    return meta


def intro(card: Card) -> str:
    shown = f"`{card.base_id}`" + ("" if card.base_id == card.base_model else f" (`{card.base_model}` in deepred)")
    return "\n".join([
        f"# {card.persona.title}: {KINDS[card.kind][2]}",
        "",
        f"{shown} fine-tuned with LoRA by deepred to speak as {card.persona.title}: {card.persona.description}",
    ])


def persona_section(persona: Persona) -> str:
    return "\n".join([
        "## The persona and its limits",
        "",
        f"- Persona file: `{persona.file.name}` ({persona.title}); the system prompt it is evaluated with: "
        f"\"{persona.evaluation_system_prompt}\".",
        f"- Knowledge cutoff: **{persona.cutoff_label}**. Asked about later events it is trained to deflect in character; "
        "it still answers some as if known (the evaluation's temporal compliance measures how often it deflects).",
        "- It is a character, not a source of facts: small models invent dates and names while staying in voice.",
        "- Trained only to change voice and register: everything else is the base model's, limits and licence "
        "included.",
    ])


def files_section(card: Card) -> str:
    if card.kind == "adapter":
        use = ["```python", "from peft import AutoPeftModelForCausalLM",
               "model = AutoPeftModelForCausalLM.from_pretrained(\"PATH/TO/THIS/FOLDER\")", "```"]
    elif card.kind == "merged":
        use = ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
               "model = AutoModelForCausalLM.from_pretrained(\"PATH/TO/THIS/FOLDER\")", "```"]
    else:
        rows = [f"| `{name}` | {quant} | {mib:.1f} MiB |" for name, quant, mib in card.files]
        use = ["| file | type | size |", "| --- | --- | --- |", *rows, "",
               "Each file carries the base model's chat template; load it in LM Studio (`deepred deploy FILE`), "
               "llama.cpp or `deepred serve FILE`."]
    return "\n".join(["## Use", "", *use])


def training_section(card: Card) -> str:
    run = card.run
    if not run:
        return "## Training\n\nNo run_config.json was found beside the adapter, so the settings are not known here."
    lines = ["## Training", ""]
    if card.earlier:
        first, then = STAGE_NAMES.get(method_of(card.earlier), "training"), STAGE_NAMES.get(method_of(run), "training")
        then_text = f"{then} on preference pairs" if method_of(run) != "sft" else f"more {then}"
        lines += [f"Two stages trained the same LoRA: {first}, then {then_text} from that adapter.", "",
                  f"### Stage 1: {first}", "",
                  *run_tables(card.earlier, f"{Path(run['config']['init_adapter']).parent.name}/{RUN_CONFIG}"), "",
                  f"### Stage 2: {then}", ""]
    lines += run_tables(run, f"{card.train_dir_name}/{RUN_CONFIG}")
    if card.results:
        lines += ["", "### Training results", "", "| figure | value |", "| --- | --- |",
                  *[f"| {k} | {cell(v)} |" for k, v in card.results.items()]]
    return "\n".join(lines)


def run_tables(run: dict, source: str) -> list[str]:
    """One training run's resolved settings and what it trained on."""
    config = run.get("config", {})
    lines = [f"Resolved settings from `{source}` (every flag, defaults included):", "", "| setting | value |",
             "| --- | --- |"]
    lines += [f"| {key} | {cell(value)} |" for key, value in config.items() if key not in SETTINGS_SHOWN_ELSEWHERE]
    return lines + ["", "| run | value |", "| --- | --- |",
                   f"| dataset file | `{Path(run.get('dataset', '?')).name}`{horizon_note(run)}, "
                   f"sha256 `{run.get('dataset_sha256')}` |",
                   f"| examples | {examples_cell(run)} |",
                   f"| tokens | {run.get('tokens_total')} |",
                   f"| effective batch | {run.get('effective_batch')} |",
                   f"| batch plan | {cell(run.get('batch_plan', {}))} |",
                   f"| hardware | {cell(run.get('hardware', {}))} |",
                   f"| LoRA targets | {cell(run.get('lora_target_modules'))} |",
                   f"| started | {run.get('started')} |"]


def horizon_note(run: dict) -> str:
    added = run.get("examples_from_horizon")
    return f" and {added} examples made from the persona file's horizon (the hash covers both)" if added else ""


def examples_cell(run: dict) -> str:
    """How many examples trained and how many were held for validation; older run_config.json files lack the split."""
    used = f"{run.get('examples_used')} used of {run.get('examples')}"
    if "examples_trained" in run:
        used = f"{run['examples_trained']} trained, {run['examples_validation']} held out for validation ({used})"
    return f"{used}, {run.get('truncated_examples', 0)} cut to max_seq_length"


def cell(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {cell(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return str(value).replace("|", "\\|")


def evaluation_section(report: dict | None) -> str:
    if not report:
        return ""
    sides = sides_of(report)
    first = next(iter(sides.values()))
    count = first.get("meta", {}).get("count")
    header = " | ".join(sides)
    lines = ["## Evaluation", "",
             f"deepred's persona metrics on {count} prompts"
             + (", base model against the tuned model on the same prompts:" if "difference" in report else ":"),
             "", f"| metric | {header} | target | {list(sides)[-1]} passes |", "| --- |" + " --- |" * (len(sides) + 2)]
    for metric in METRICS:
        values = " | ".join(format_value(side[metric]["value"]) for side in sides.values())
        tuned = list(sides.values())[-1][metric]
        lines.append(f"| {METRIC_TITLES[metric]} | {values} | {first[metric]['target_text']} | "
                     f"{'n/a' if tuned['passed'] is None else 'yes' if tuned['passed'] else 'no'} |")
    over = [over_deflection(side).get("value") for side in sides.values()]
    if None not in over:  # measured (reports written before it was are shown without the row)
        lines.append(f"| Over-deflection: questions not about time deflected (lower is better) | "
                     f"{' | '.join(format_value(v) for v in over)} | none | n/a |")
    lines += ["", "Definitions: deepred's docs/metrics.md. The full report with every answer is the run's "
              "`eval/report.html`."]
    return "\n".join(lines)


def reproduce_section(commands: list[str]) -> str:
    if not commands:
        return ""
    return "\n".join(["## Reproduce", "", "```bash", *commands, "```"])


# ---------------------------------------------------------------------------------------------------------------
# command lines


def command_line(prog: str, values: dict, config_cls, always: tuple[str, ...] = ()) -> str:
    """`prog --flag value ...` for every setting that differs from its default (and those in `always`)."""
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(config_cls)}
    parts = [prog]
    for name, value in values.items():
        if name not in defaults or (value == defaults[name] and name not in always) or value is None:
            continue
        if isinstance(value, bool):
            parts.append(f"--{name}" if value else f"--no-{name}")
        else:
            shown = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            parts += [f"--{name}", shlex.quote(shown)]
    return " ".join(parts)


def train_command(train_dir: Path | None) -> list[str]:
    """The `deepred train` command line that reproduces a training run, from its run_config.json."""
    run = read_json(train_dir / RUN_CONFIG) if train_dir else {}
    if not run.get("config"):
        return []
    values = {key: value for key, value in run["config"].items()
              if key not in ("resume_from_checkpoint", "resume_latest")}
    values["dataset"] = run.get("dataset") or values.get("dataset")
    return [command_line("deepred train", values, TrainConfig, always=("base_model", "dataset", "output_dir"))]


def merge_command(base_model: str, lora_path: Path, output_path: Path, dtype: str) -> str:
    return (f"deepred merge --base_model {shlex.quote(base_model)} --lora_path {shlex.quote(str(lora_path))} "
            f"--output_path {shlex.quote(str(output_path))} --dtype {dtype}")


def convert_command(model_dir: Path, gguf: Path, quant_type: str) -> str:
    return (f"deepred convert --model_path {shlex.quote(str(model_dir))} --output_path {shlex.quote(str(gguf))} "
            f"--quant_type {quant_type}")


def run_command(cfg: RunConfig, dataset: str | None) -> str:
    values = {**dataclasses.asdict(cfg), "dataset": cfg.dataset or dataset}
    return command_line("deepred run", values, RunConfig, always=("base_model", "dataset", "output_dir"))


# ---------------------------------------------------------------------------------------------------------------
# writing


def is_ours_or_absent(path: Path) -> bool:
    return not path.exists() or (path.is_file() and MARK in path.read_text(encoding="utf-8", errors="replace"))


def write_card(folder: Path, kind: str, sources: CardSources, replace_foreign: bool = True,
               log: Log = print) -> Path | None:
    """Write FOLDER/README.md (unless it already says exactly this). replace_foreign=False keeps a README.md deepred
    did not write (a GGUF saved into a folder of the user's) and says so."""
    target = Path(folder) / CARD
    if not replace_foreign and not is_ours_or_absent(target):
        log(f"kept {target}: it is not a deepred model card (no card written beside the GGUF)")
        return None
    text = render_card(gather_card(kind, sources))
    if not (target.is_file() and target.read_text(encoding="utf-8", errors="replace") == text):
        write_atomic(target, text)
    return target


def write_adapter_cards(train_dir: Path, sources: CardSources) -> None:
    """The adapter's card in final/ (replacing PEFT's template) and in the training folder (replacing TRL's)."""
    for folder in (train_dir / "final", train_dir):
        write_card(folder, "adapter", sources)


def training_sources(train_dir: Path) -> CardSources:
    """What `deepred train` knows when it finishes: its run_config.json (the base model as the user named it)."""
    base_model = read_json(train_dir / RUN_CONFIG).get("config", {}).get("base_model", "")
    return CardSources(base_model, train_dir, commands=train_command(train_dir))


def merged_sources(base_model: str, lora_path: Path, output_path: Path, dtype: str,
                   persona: str | None = None) -> CardSources:
    """What `deepred merge` knows when it finishes: the adapter's training run, and how it was merged."""
    train_dir = train_dir_of_adapter(lora_path)
    return CardSources(base_model, train_dir, persona=persona,
                       commands=[*train_command(train_dir), merge_command(base_model, lora_path, output_path, dtype)])


def write_gguf_card(gguf: Path, model_dir: Path, quant_type: str, log: Log = print) -> Path | None:
    """A card beside a GGUF converted from a deepred merge (the merged folder's deepred_merge.json says which
    adapter); a model deepred did not merge gets none."""
    record = read_json(Path(model_dir) / MERGE_RECORD)
    if not record:
        return None
    merged = merged_sources(record.get("base_model", ""), Path(record.get("lora_path", "")), Path(model_dir),
                            record.get("dtype", "auto"))
    sources = dataclasses.replace(merged, commands=[*merged.commands, convert_command(model_dir, gguf, quant_type)],
                                  files=[Path(gguf)])
    return write_card(Path(gguf).parent, "gguf", sources, replace_foreign=False, log=log)
