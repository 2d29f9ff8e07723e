"""Stage 1: the ChatML dataset. Find it, validate every line, summarise it, hand valid examples to training."""

from __future__ import annotations

import json
import random
import re
import statistics
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .config import default_dataset
from .errors import DatasetNotFoundError, DeepRedError, InvalidDatasetError
from .files import file_sha256, read_regular_file, require_regular_file
from .jsonl import numbered_lines, parse_json_object

ROLES = ("system", "user", "assistant")
DATASET_HINT = "pass a ChatML .jsonl file"


def bundled_dataset_path() -> Path:
    return Path(str(resources.files("deepred") / "resources" / "theme_dataset.jsonl"))


def resolve_dataset(dataset: str | None) -> tuple[Path, str]:
    """Return (path, where it came from). A missing explicit path is an error naming where we looked; a path that
    is there but is not a regular file (a folder, a FIFO) is refused as such."""
    if dataset:
        path = Path(dataset).expanduser()
        if not path.exists():
            raise DatasetNotFoundError(f"dataset not found: {path} (pass --dataset PATH to a ChatML .jsonl file)")
        require_regular_file(path, DATASET_HINT)
        return path, "--dataset"
    spec_path = default_dataset()
    if spec_path:  # the user pointed at their data: never train on something else instead
        if not Path(spec_path).exists():
            raise DatasetNotFoundError(f"dataset not found: {spec_path} ($GUTENBERG_DATA is set, so the data is expected "
                               "there); fix $GUTENBERG_DATA, pass --dataset PATH, or unset $GUTENBERG_DATA to use "
                               "the bundled Deep Red sample set")
        require_regular_file(Path(spec_path), DATASET_HINT)
        return Path(spec_path), "$GUTENBERG_DATA/dataset/theme_dataset.jsonl"
    return bundled_dataset_path(), ("the bundled Deep Red sample set: neither --dataset nor $GUTENBERG_DATA is set")


@dataclass
class DatasetReport:
    path: Path
    examples: list[dict] = field(default_factory=list)  # valid examples, in file order
    problems: list[str] = field(default_factory=list)  # "FILE:LINE: message"
    invalid_lines: int = 0
    turns: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def refuse(self, refused: dict[int, str]) -> None:
        """Examples refused after reading ({index: "FILE:LINE: problem"}, e.g. by the chat template) become invalid
        lines with their problems, and leave the examples."""
        self.problems += refused.values()
        self.invalid_lines += len(refused)
        self.turns -= sum(len(self.examples[i]["messages"]) for i in refused)
        self.examples = [example for i, example in enumerate(self.examples) if i not in refused]


def check_message(message, index: int, where: str) -> list[str]:
    """Problems of one {"role", "content"} message at 0-based `index` of a conversation; `where` names it."""
    if not isinstance(message, dict):
        return [f"{where} is not an object"]
    problems = []
    role = message.get("role")
    if role not in ROLES:
        problems.append(f"{where} has role {role!r}; expected one of system, user, assistant")
    elif role == "system" and index != 0:
        problems.append(f"{where} is a system message; a system message may only come first")
    return problems + check_content(message, where)


def check_content(message: dict, where: str) -> list[str]:
    """The message's "content" must be a non-empty string."""
    if "content" not in message:
        return [f'{where} has no "content"']
    content = message["content"]
    if not isinstance(content, str):
        return [f"{where} content must be a string, got {type(content).__name__}"]
    if not content.strip():
        return [f"{where} content is empty"]
    try:
        content.encode("utf-8")
    except UnicodeEncodeError as exc:  # a JSON escape of half a character ("\ud83d"): no tokenizer takes it
        return [f"{where} content holds half of a character (a lone surrogate {content[exc.start]!r} at character "
                f"{exc.start}); write the whole character"]
    return []


def _check_messages(messages) -> list[str]:
    if not isinstance(messages, list):
        return ['"messages" must be a list of {"role", "content"} objects']
    if not messages:
        return ['"messages" is empty']
    problems = [p for i, msg in enumerate(messages) for p in check_message(msg, i, f"message {i + 1}")]
    roles = [m.get("role") for m in messages if isinstance(m, dict)]
    if "user" not in roles:
        problems.append("no user turn")
    if "assistant" not in roles:
        problems.append("no assistant reply to train on")
    elif roles[-1] != "assistant":
        problems.append(f"ends on a {roles[-1]!r} turn; the last message must be the assistant's reply")
    return problems


def validate_file(path: str | Path) -> DatasetReport:
    """Read a ChatML JSONL file and report every problem with its line number."""
    path = Path(path)
    report = DatasetReport(path=path)
    raw = read_regular_file(path, DATASET_HINT)
    nonblank = 0
    for lineno, line_bytes in numbered_lines(raw):
        nonblank += 1
        line_problems = _check_line(line_bytes)
        if line_problems:
            report.invalid_lines += 1
            report.problems.extend(f"{path}:{lineno}: {p}" for p in line_problems)
        else:
            example = json.loads(line_bytes.decode("utf-8"))
            kept = {"messages": example["messages"], "line": lineno}
            if isinstance(example.get("category"), str):  # optional; `validate --persona` counts it
                kept["category"] = example["category"]
            report.examples.append(kept)
            report.turns += len(example["messages"])
    if nonblank == 0:
        report.problems.append(f"{path}:1: file is empty; expected one {{\"messages\": [...]}} object per line")
    return report


def _check_line(line_bytes: bytes) -> list[str]:
    obj, problems = parse_json_object(line_bytes, '{"messages": [...]}')
    if problems:
        return problems
    if "messages" not in obj:
        return ['missing "messages"']
    return _check_messages(obj["messages"])


def load_for_training(dataset: str | None, skip_invalid: bool, log=print) -> tuple[DatasetReport, str]:
    """Validated examples for training. Invalid data stops training unless the user chose to skip it."""
    path, origin = resolve_dataset(dataset)
    log(f"dataset: {path} ({origin})")
    report = validate_file(path)
    if report.problems and not (skip_invalid and report.examples):
        for problem in report.problems:
            log(problem)
        hint = "fix the lines above or pass --skip_invalid to train on the valid ones"
        if not report.examples:
            hint = "fix the lines above; there are no valid examples to train on"
        raise InvalidDatasetError(
            f"{path}: {report.invalid_lines} invalid line(s), {len(report.problems)} problem(s); {hint}",
            report.problems)
    if report.problems:
        for problem in report.problems:
            log(problem)
        log(f"--skip_invalid: dropped {report.invalid_lines} invalid line(s), "
            f"training on {len(report.examples)} valid example(s)")
    return report, file_sha256(path)


def summarize(report: DatasetReport, lengths: list[int] | None = None, max_seq_length: int | None = None) -> str:
    lines = [f"{report.path}: {len(report.examples)} valid example(s), {report.invalid_lines} invalid line(s), "
             f"{report.turns} turns"]
    if report.examples:
        roles = [m["role"] for ex in report.examples for m in ex["messages"]]
        lines.append("  turns by role: " + ", ".join(f"{r} {roles.count(r)}" for r in ROLES))
    return "\n".join(lines + token_statistics(lengths, max_seq_length))


def token_statistics(lengths: list[int] | None, max_seq_length: int | None = None) -> list[str]:
    """Lines on token lengths (the tokenized examples or pairs) and how many --max_seq_length cuts."""
    if not lengths:
        return []
    ordered = sorted(lengths)
    lines = [f"  tokens per example: min {ordered[0]}, mean {statistics.mean(ordered):.0f}, "
             f"median {statistics.median(ordered):.0f}, p95 {length_p95(ordered)}, max {ordered[-1]}, "
             f"total {sum(ordered)}"]
    if max_seq_length:
        over = sum(1 for n in lengths if n > max_seq_length)
        lines.append(f"  {over} example(s) exceed --max_seq_length {max_seq_length} and would be truncated")
    return lines


def length_p95(lengths: list[int]) -> int:
    """The 95th-percentile token length, as the data summary prints it and the batch plan uses it."""
    ordered = sorted(lengths)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


def first_sentence(text: str) -> str:
    return re.split(r"(?<=[.!?])\s+", text.strip(), maxsplit=1)[0]


def vary_system_prompts(examples: list[dict], share: float, seed: int) -> tuple[list[dict], int, int]:
    """(examples, shortened, dropped): a seeded `share` of the examples that open with a system prompt get only its
    first sentence ("You are Deep Red, a chess-playing artificial intelligence ...") or none at all (the chat
    template's default applies), half each, so that the persona answers under the short or absent system prompt an
    app sends, not only under the prompts the dataset wrote. Nothing else of an example changes."""
    if not 0 <= share <= 1:
        raise DeepRedError(f"--system_prompt_variants: expected a share between 0 and 1 such as 0.5, got {share}")
    with_system = [i for i, example in enumerate(examples) if example["messages"][0]["role"] == "system"]
    chosen = random.Random(seed).sample(with_system, round(share * len(with_system)))
    varied, shortened, dropped = list(examples), 0, 0
    for order, i in enumerate(chosen):
        system, *rest = examples[i]["messages"]
        short = first_sentence(system["content"])
        if order % 2 == 0 and short != system["content"].strip():
            varied[i] = {**examples[i], "messages": [{**system, "content": short}, *rest]}
            shortened += 1
        else:
            varied[i] = {**examples[i], "messages": rest}
            dropped += 1
    return varied, shortened, dropped
