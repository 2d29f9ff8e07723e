"""Hugging Face model cards (README.md with YAML metadata) for the adapter, the merged model and the GGUF files.

A card is built only from what a run recorded: the training folder's run_config.json, train_results.json and
eval_results.json, the evaluation's report.json when the run evaluated, the persona file, and the commands that
reproduce it. Cards are rewritten whenever a stage reruns, so they always describe the files beside them.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .files import write_atomic

CARD = "README.md"
MARK = "<!-- written by deepred: regenerated whenever the run's stages rerun -->"
KINDS = {  # kind -> (library_name, the Hub's base_model_relation, what the folder holds)
    "adapter": ("peft", "adapter", "LoRA adapter"),
    "merged": ("transformers", "finetune", "merged model (base model + LoRA adapter, safetensors)"),
    "gguf": ("gguf", "quantized", "GGUF files for llama.cpp, LM Studio and Ollama"),
}
SETTINGS_SHOWN_ELSEWHERE = {"output_dir", "resume_from_checkpoint", "resume_latest", "wandb"}


@dataclass
class CardFacts:
    """What a card says. train_dir: the training run folder; report: the evaluation's report.json (None: the run
    did not evaluate); commands: how to reproduce; files: the GGUFs a gguf card describes."""

    base_model: str
    train_dir: Path | None = None
    report: dict | None = None
    persona: str | None = None
    commands: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------
# what the run recorded


def _json(path: Path | None) -> dict:
    try:
        return json.loads(path.read_text()) if path and path.is_file() else {}
    except (OSError, ValueError):
        return {}


def train_dir_of_adapter(adapter: Path) -> Path | None:
    """The training folder of an adapter (RUN/final -> RUN), when it holds a run_config.json."""
    folder = Path(adapter).parent
    return folder if (folder / "run_config.json").is_file() else None


def base_model_facts(name: str) -> tuple[str, str | None, str | None]:
    """(hub id or name for base_model, license, model family) from the base folder's README front matter, deepred's
    record of a built-in model, or its config.json; a hub name not cached locally gives no license."""
    from .tinymodel import resolve_base_model

    try:
        folder = Path(resolve_base_model(name)).expanduser()
    except Exception:  # noqa: BLE001 - a card never fails a stage; an unreadable base is simply not described
        folder = Path(name)
    if not folder.is_dir():
        folder = _cached_snapshot(name) or folder
    source = _json(folder / "deepred_source.json")  # built-in SmolLM2: the model it was rebuilt from
    front = _front_matter(folder / CARD)
    license_ = front.get("license") or source.get("license") or _json(folder / "config.json").get("license")
    family = _json(folder / "config.json").get("model_type")
    return source.get("model") or name, license_, family


def _cached_snapshot(name: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json")
    except Exception:  # noqa: BLE001 - not a hub id
        return None
    return Path(found).parent if isinstance(found, str) else None


def _front_matter(path: Path) -> dict:
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


# ---------------------------------------------------------------------------------------------------------------
# the card


def render_card(kind: str, facts: CardFacts) -> str:
    from .evaluate.persona import load_persona

    persona = load_persona(facts.persona)
    run = _json(facts.train_dir / "run_config.json") if facts.train_dir else {}
    base_id, license_, family = base_model_facts(facts.base_model)
    sections = [_intro(kind, facts, persona, base_id), _persona_section(persona), _files_section(kind, facts),
                _training_section(run, facts.train_dir), _evaluation_section(facts.report),
                _reproduce_section(facts.commands)]
    meta = _metadata(kind, run, persona, base_id, license_, family)
    return ("---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n" + MARK + "\n\n"
            + "\n\n".join(s for s in sections if s) + "\n")


def _metadata(kind: str, run: dict, persona, base_id: str, license_: str | None, family: str | None) -> dict:
    library, relation, _ = KINDS[kind]
    tags = ["deepred", "persona", persona.name, "lora", *([family] if family else []),
            *(["gguf"] if kind == "gguf" else ["peft"] if kind == "adapter" else [])]
    tags = list(dict.fromkeys(tags))  # the bundled persona is named deepred too
    meta = {"base_model": base_id, "base_model_relation": relation, "library_name": library,
            "pipeline_tag": "text-generation", "tags": tags}
    if license_:
        meta["license"] = license_
    if run.get("dataset"):
        meta["datasets"] = [Path(run["dataset"]).name]
        meta["dataset_sha256"] = run.get("dataset_sha256")
    return meta


def _intro(kind: str, facts: CardFacts, persona, base_id: str) -> str:
    what = KINDS[kind][2]
    shown = f"`{base_id}`" + ("" if base_id == facts.base_model else f" (`{facts.base_model}` in deepred)")
    return "\n".join([
        f"# {persona.title}: {what}",
        "",
        f"{shown} fine-tuned with LoRA by deepred to speak as {persona.title}: "
        f"{persona.description}",
    ])


def _persona_section(persona) -> str:
    return "\n".join([
        "## The persona and its limits",
        "",
        f"- Persona file: `{persona.file.name}` ({persona.title}); the system prompt it is evaluated with: "
        f"\"{persona.evaluation_system_prompt}\".",
        f"- Knowledge cutoff: **{persona.cutoff}**. Asked about later events it is trained to deflect in character; "
        "it still answers some as if known (the evaluation's temporal compliance measures how often it deflects).",
        "- It is a character, not a source of facts: small models invent dates and names while staying in voice.",
        "- Trained only to change voice and register: everything else is the base model's, limits and licence "
        "included.",
    ])


def _files_section(kind: str, facts: CardFacts) -> str:
    if kind == "adapter":
        use = ["```python", "from peft import AutoPeftModelForCausalLM",
               "model = AutoPeftModelForCausalLM.from_pretrained(\"PATH/TO/THIS/FOLDER\")", "```"]
    elif kind == "merged":
        use = ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
               "model = AutoModelForCausalLM.from_pretrained(\"PATH/TO/THIS/FOLDER\")", "```"]
    else:
        rows = [f"| `{Path(f).name}` | {_quant_of(Path(f))} | {Path(f).stat().st_size / 2**20:.1f} MiB |"
                for f in facts.files if Path(f).is_file()]
        use = ["| file | type | size |", "| --- | --- | --- |", *rows, "",
               "Each file carries the base model's chat template; load it in LM Studio (`deepred deploy FILE`), "
               "llama.cpp or `deepred serve FILE`."]
    return "\n".join(["## Use", "", *use])


def _quant_of(path: Path) -> str:
    """The GGUF's type from its own header (general.file_type), as the parity check names it."""
    try:
        from gguf import GGUFReader

        from .gguf import FILE_TYPE_NAMES

        file_type = int(GGUFReader(str(path)).fields["general.file_type"].contents())
        return FILE_TYPE_NAMES.get(file_type, f"file type {file_type}")
    except Exception:  # noqa: BLE001 - the table still lists the file
        return "?"


def _training_section(run: dict, train_dir: Path | None) -> str:
    if not run:
        return "## Training\n\nNo run_config.json was found beside the adapter, so the settings are not known here."
    config = run.get("config", {})
    lines = ["## Training", "", f"Resolved settings from `{train_dir.name}/run_config.json` (every flag, defaults "
             "included):", "", "| setting | value |", "| --- | --- |"]
    lines += [f"| {key} | {_cell(value)} |" for key, value in config.items() if key not in SETTINGS_SHOWN_ELSEWHERE]
    plan, hardware = run.get("batch_plan", {}), run.get("hardware", {})
    lines += ["", "| run | value |", "| --- | --- |",
              f"| dataset file | `{Path(run.get('dataset', '?')).name}`, sha256 `{run.get('dataset_sha256')}` |",
              f"| examples | {run.get('examples_used')} used of {run.get('examples')} "
              f"({run.get('truncated_examples', 0)} truncated) |",
              f"| tokens | {run.get('tokens_total')} |",
              f"| effective batch | {run.get('effective_batch')} |",
              f"| batch plan | {_cell(plan)} |",
              f"| hardware | {_cell(hardware)} |",
              f"| LoRA targets | {_cell(run.get('lora_target_modules'))} |",
              f"| started | {run.get('started')} |"]
    results = {**_json(train_dir / "train_results.json"), **_prefixed(_json(train_dir / "eval_results.json"))}
    if results:
        lines += ["", "### Training results", "", "| figure | value |", "| --- | --- |",
                  *[f"| {k} | {_cell(v)} |" for k, v in results.items()]]
    return "\n".join(lines)


def _prefixed(metrics: dict) -> dict:
    return {k if k.startswith("eval_") else f"eval_{k}": v for k, v in metrics.items()}


def _cell(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_cell(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return str(value).replace("|", "\\|")


def _evaluation_section(report: dict | None) -> str:
    if not report:
        return ""
    from .evaluate.aggregate import METRIC_TITLES, METRICS
    from .evaluate.report_text import format_value, sides_of

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
    lines += ["", "Definitions: deepred's docs/metrics.md. The full report with every answer is the run's "
              "`eval/report.html`."]
    return "\n".join(lines)


def _reproduce_section(commands: list[str]) -> str:
    if not commands:
        return ""
    return "\n".join(["## Reproduce", "", "```bash", *commands, "```"])


# ---------------------------------------------------------------------------------------------------------------
# command lines and writing


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


def is_ours_or_absent(path: Path) -> bool:
    return not path.exists() or (path.is_file() and MARK in path.read_text(encoding="utf-8", errors="replace"))


def write_card(folder: Path, kind: str, facts: CardFacts, replace_foreign: bool = True, log=print) -> Path | None:
    """Write FOLDER/README.md. replace_foreign=False keeps a README.md deepred did not write (a GGUF saved into a
    folder of the user's) and says so."""
    target = Path(folder) / CARD
    if not replace_foreign and not is_ours_or_absent(target):
        log(f"kept {target}: it is not a deepred model card (no card written beside the GGUF)")
        return None
    write_atomic(target, render_card(kind, facts))
    return target


# ---------------------------------------------------------------------------------------------------------------
# the standalone commands' cards: what is known when `deepred train`, `merge` or `convert` finishes


def train_command(train_dir: Path | None) -> list[str]:
    """The `deepred train` command line that reproduces a training run, from its run_config.json."""
    from .config import TrainConfig

    run = _json(train_dir / "run_config.json") if train_dir else {}
    if not run.get("config"):
        return []
    values = {key: value for key, value in run["config"].items()
              if key not in ("resume_from_checkpoint", "resume_latest")}
    values["dataset"] = run.get("dataset") or values.get("dataset")
    return [command_line("deepred train", values, TrainConfig, always=("base_model", "dataset", "output_dir"))]


def write_adapter_cards(train_dir: Path, base_model: str, facts: CardFacts | None = None) -> None:
    """The adapter's card in final/ (replacing PEFT's template) and in the training folder (replacing TRL's)."""
    facts = facts or CardFacts(base_model, train_dir, commands=train_command(train_dir))
    for folder in (train_dir / "final", train_dir):
        write_card(folder, "adapter", facts)


def merged_facts(base_model: str, lora_path: Path, output_path: Path, dtype: str) -> CardFacts:
    train_dir = train_dir_of_adapter(lora_path)
    merge = f"deepred merge --base_model {shlex.quote(base_model)} --lora_path {shlex.quote(str(lora_path))} " \
            f"--output_path {shlex.quote(str(output_path))} --dtype {dtype}"
    return CardFacts(base_model, train_dir, commands=[*train_command(train_dir), merge])


def write_gguf_card(gguf: Path, model_dir: Path, quant_type: str, log=print) -> Path | None:
    """A card beside a GGUF converted from a deepred merge (the merged folder's deepred_merge.json says which
    adapter); a model deepred did not merge gets none."""
    from .merge import MARKER

    record = _json(Path(model_dir) / MARKER)
    if not record:
        return None
    merged = merged_facts(record.get("base_model", ""), Path(record.get("lora_path", "")), Path(model_dir),
                          record.get("dtype", "auto"))
    convert = f"deepred convert --model_path {shlex.quote(str(model_dir))} --output_path " \
              f"{shlex.quote(str(gguf))} --quant_type {quant_type}"
    facts = dataclasses.replace(merged, commands=[*merged.commands, convert], files=[Path(gguf)])
    return write_card(Path(gguf).parent, "gguf", facts, replace_foreign=False, log=log)


# ---------------------------------------------------------------------------------------------------------------
# `deepred run` and the demo


def run_command(cfg, dataset: str | None) -> str:
    from .config import RunConfig

    values = {**dataclasses.asdict(cfg), "dataset": cfg.dataset or dataset}
    return command_line("deepred run", values, RunConfig, always=("base_model", "dataset", "output_dir"))


def write_run_cards(run) -> None:
    """Cards in the adapter's final/ (and its training folder), merged-deepred/ and the run folder beside the GGUFs,
    from the stages this invocation has run or kept so far: a card never shows figures of an earlier model."""
    outputs = run.outputs
    if "train" not in outputs:
        return
    train_dir = Path(outputs["train"]["train_dir"])
    report_html = outputs.get("evaluate", {}).get("report")
    report = _json(Path(report_html).with_name("report.json")) if report_html else None
    dataset = _json(train_dir / "run_config.json").get("dataset")
    facts = CardFacts(run.base_model, train_dir, report or None, run.cfg.persona,
                      commands=[run_command(run.cfg, dataset)])
    write_adapter_cards(train_dir, run.base_model, facts)
    if "merge" in outputs:
        write_card(Path(outputs["merge"]["merged"]), "merged", facts)
    if "convert" in outputs:
        ggufs = [Path(outputs["convert"][quant]) for quant in run.cfg.quant_types if quant in outputs["convert"]]
        write_card(run.run_dir, "gguf", dataclasses.replace(facts, files=ggufs), replace_foreign=False, log=run.log)
