"""`deepred validate`: a dataset checked the way training will read it. Every problem as `FILE:LINE: message`,
token statistics and the share of tokens that carry loss under the model's own chat template, and how the examples
cover the persona (its system prompts, categories, and evaluation prompts that should stay held out)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .chat_template import ChatFormat, TemplateError, refusal_line, tokenize_each
from .data import DatasetReport, summarize, validate_file
from .models.loading import load_tokenizer
from .models.registry import resolve_base_model
from .persona import Persona, load_persona
from .prompts import load_prompts, prompt_key


@dataclass
class Validation:
    report: DatasetReport
    lines: list[str] = field(default_factory=list)  # what to print, in order

    @property
    def ok(self) -> bool:
        return not self.report.problems


def validate(dataset: str, base_model: str | None = None, max_seq_length: int = 1024, trust_remote_code: bool = False,
             persona: str | None = None) -> Validation:
    """Validate `dataset`; with `base_model`, tokenize it as training will. A bad persona file is refused before the
    dataset is read."""
    persona_ = load_persona(persona)
    report = validate_file(dataset)
    result = Validation(report, list(report.problems))
    lengths = template_check(report, base_model, trust_remote_code, result.lines) if base_model and report.examples \
        else None
    result.lines.append(summarize(report, lengths, max_seq_length if lengths else None))
    if report.examples:
        result.lines.append(persona_coverage(report, persona_))
    if report.problems:
        result.lines.append(f"{len(report.problems)} problem(s) in {report.invalid_lines} line(s)")
    else:
        result.lines.append("ok")
    return result


def template_check(report: DatasetReport, base_model: str, trust_remote_code: bool, lines: list[str]) -> list[int] | None:
    """Tokenize every example with the model's chat template, as training will; a template problem is a problem."""
    tokenizer = load_tokenizer(resolve_base_model(base_model), trust_remote_code)
    try:
        rows, refused = tokenize_each(report.examples, ChatFormat.of(tokenizer), report.path)
    except TemplateError as exc:  # the template itself (no template, a slow tokenizer)
        report.problems.append(str(exc))
        lines.append(report.problems[-1])
        return None
    report.refuse(refused)
    if not rows:  # every conversation refused: the template itself, said once
        lines += [refusal_line(refused)] if refused else []
        return None
    lines += refused.values()
    supervised = sum(sum(row["assistant_masks"]) for row in rows)
    total = sum(len(row["input_ids"]) for row in rows)
    lines.append(f"  loss on the replies and their end-of-turn token: {supervised} of {total} tokens "
                 f"({supervised / max(total, 1):.0%}), located with {base_model}'s chat template")
    return [len(row["input_ids"]) for row in rows]


def persona_coverage(report: DatasetReport, persona: Persona) -> str:
    """How the examples cover the persona: examples per system prompt of the persona file, per evaluation category
    (from an optional "category" field on each line), and evaluation prompts that appear as a user turn (held-out
    questions should not be trained on)."""
    names = {text: name for name, text in persona.system_prompts.items()}
    systems: dict[str, int] = dict.fromkeys(persona.system_prompts, 0)
    categories: dict[str, int] = dict.fromkeys(persona.categories, 0)
    for example in report.examples:
        first = example["messages"][0]
        system = names.get(first["content"].strip(), "another system prompt") if first["role"] == "system" \
            else "no system prompt"
        systems[system] = systems.get(system, 0) + 1
        category = example.get("category")
        if category is not None:
            key = category if category in categories else f"{category} (not a category of the persona)"
            categories[key] = categories.get(key, 0) + 1
    lines = [f"  persona {persona.title} ({persona.file}):",
             "    examples per system prompt: " + ", ".join(f"{name} {count}" for name, count in systems.items())]
    if any(example.get("category") for example in report.examples):
        lines.append("    examples per category: " + ", ".join(f"{c} {n}" for c, n in categories.items()))
    else:
        lines.append(f"    examples per category: not known (no line has a \"category\" field; the persona's "
                     f"categories are {', '.join(persona.categories)})")
    questions = {prompt_key(p["prompt"]): p for p in load_prompts(None, persona)}  # as the pairs refusal compares
    seen = sorted({questions[prompt_key(m["content"])]["id"] for example in report.examples
                   for m in example["messages"] if m["role"] == "user" and prompt_key(m["content"]) in questions})
    lines.append(f"    evaluation prompts asked in the dataset: {len(seen)} of {len(questions)}"
                 + (f" ({', '.join(seen[:10])}{', ...' if len(seen) > 10 else ''}): held-out questions should not "
                    "be trained on" if seen else ""))
    return "\n".join(lines)
