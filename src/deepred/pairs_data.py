"""Preference pairs for DPO: TRL's conversational preference format, one JSON object per line, validated like the
ChatML dataset (every problem of every line as `FILE:LINE: message`) and handed to training.

    {"prompt": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."}],
     "chosen": [{"role": "assistant", "content": "..."}],
     "rejected": [{"role": "assistant", "content": "..."}],
     "source": "voice"}        # optional: how the pair was made ("voice", "horizon", "hand", ...)

The messages are checked with data.py's own checks; the conversations are tokenized later with the model's own chat
template (`pairs_to_conversations`).
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .data import check_content, check_message
from .errors import InvalidDatasetError
from .files import file_sha256, read_regular_file
from .jsonl import numbered_lines, parse_json_object

REQUIRED = ("prompt", "chosen", "rejected")
KEYS = (*REQUIRED, "source")
SHAPE = '{"prompt": [...], "chosen": [...], "rejected": [...]}'
ANSWER = '[{"role": "assistant", "content": ...}]'
NO_SOURCE = "(no source)"


@dataclass
class PairsReport:
    path: Path
    pairs: list[dict] = field(default_factory=list)  # valid pairs in file order, each with its "line"
    problems: list[str] = field(default_factory=list)  # "FILE:LINE: message"
    invalid_lines: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def sources(self) -> dict[str, int]:
        """Valid pairs per "source", most first; pairs without one are counted under "(no source)"."""
        counts = Counter(pair.get("source", NO_SOURCE) for pair in self.pairs)
        return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


# ---------------------------------------------------------------------------------------------------------------
# one line


def check_pair(obj: dict) -> list[str]:
    """Every problem of one parsed pair object."""
    problems = [f'missing "{key}"; a pair needs "prompt", "chosen" and "rejected"' for key in REQUIRED
                if key not in obj]
    unknown = [key for key in obj if key not in KEYS]
    if unknown:
        problems.append(f"unknown key(s) {', '.join(repr(k) for k in unknown)}; allowed keys are "
                        f"{', '.join(repr(k) for k in KEYS)} (remove the others)")
    if "prompt" in obj:
        problems += _check_prompt(obj["prompt"])
    answers_ok = True
    for key in ("chosen", "rejected"):
        if key in obj:
            answer_problems = _check_answer(obj[key], key)
            problems += answer_problems
            answers_ok = answers_ok and not answer_problems
        else:
            answers_ok = False
    if answers_ok and obj["chosen"][0]["content"].strip() == obj["rejected"][0]["content"].strip():
        problems.append("chosen and rejected are the same answer; a pair must prefer one answer to another")
    if "source" in obj:
        source = obj["source"]
        if not isinstance(source, str):
            problems.append(f'"source" must be a string naming how the pair was made (e.g. "voice", "horizon", '
                            f'"hand"), got {type(source).__name__}; fix it or leave "source" out')
        elif not source.strip():
            problems.append('"source" is empty; name how the pair was made (e.g. "voice", "horizon", "hand") or '
                            'leave "source" out')
    return problems


def _check_prompt(prompt) -> list[str]:
    if not isinstance(prompt, list):
        return [f'"prompt" must be a list of {{"role", "content"}} messages ending on a user turn, got '
                f"{type(prompt).__name__}"]
    if not prompt:
        return ['"prompt" is empty; it needs at least the user message that chosen and rejected answer']
    problems = [p for i, msg in enumerate(prompt) for p in check_message(msg, i, f"prompt message {i + 1}")]
    roles = [msg.get("role") for msg in prompt if isinstance(msg, dict)]
    if "user" not in roles:
        problems.append('"prompt" has no user turn; add the user message that chosen and rejected answer')
    elif roles[-1] != "user":
        problems.append(f'"prompt" ends on a {roles[-1]!r} turn; the last prompt message must be the user\'s, '
                        "which chosen and rejected answer (put the assistant's answers in chosen and rejected)")
    return problems


def _check_answer(answer, key: str) -> list[str]:
    if isinstance(answer, str):
        return [f'"{key}" is a bare string; wrap it as {ANSWER}']
    if isinstance(answer, dict):
        return [f'"{key}" is a single object; wrap it in a list: {ANSWER}']
    if not isinstance(answer, list):
        return [f'"{key}" must be a list of one assistant message, {ANSWER}, got {type(answer).__name__}']
    if len(answer) != 1:
        return [f'"{key}" has {len(answer)} messages; it must hold exactly one assistant message, {ANSWER}']
    message, where = answer[0], f'"{key}" message'
    if not isinstance(message, dict):
        return [f"{where} is not an object; write it as {ANSWER}"]
    problems = []
    if message.get("role") != "assistant":
        problems.append(f"{where} has role {message.get('role')!r}; it must be \"assistant\" (the answer to the "
                        "prompt's last user message)")
    return problems + check_content(message, where)


# ---------------------------------------------------------------------------------------------------------------
# the file


def validate_pairs_file(path: str | Path) -> PairsReport:
    """Read a preference-pairs JSONL file and report every problem of every line with its line number."""
    path = Path(path).expanduser()
    report = PairsReport(path=path)
    raw = read_regular_file(path, "pass a .jsonl file of preference pairs")  # a leading BOM removed
    nonblank = 0
    for lineno, line_bytes in numbered_lines(raw):
        nonblank += 1
        obj, problems = parse_json_object(line_bytes, SHAPE)
        if not problems:
            problems = check_pair(obj)
        if problems:
            report.invalid_lines += 1
            report.problems.extend(f"{path}:{lineno}: {p}" for p in problems)
            continue
        kept = {key: obj[key] for key in KEYS if key in obj}
        report.pairs.append({**kept, "line": lineno})
    if nonblank == 0:
        report.problems.append(f"{path}:1: file is empty (no pairs); expected one {SHAPE} object per line")
    return report


def load_pairs_for_training(path: str | Path, skip_invalid: bool, log=print) -> tuple[PairsReport, str]:
    """Validated pairs for training and the file's sha256. Invalid pairs stop training unless the user chose to
    skip them (and some are valid)."""
    path = Path(path).expanduser()
    log(f"preference pairs: {path}")
    report = validate_pairs_file(path)
    if report.problems and not (skip_invalid and report.pairs):
        for problem in report.problems:
            log(problem)
        hint = "fix the lines above or pass --skip_invalid to train on the valid pairs"
        if not report.pairs:
            hint = "fix the lines above; there are no valid pairs to train on"
        raise InvalidDatasetError(
            f"{path}: {report.invalid_lines} invalid line(s), {len(report.problems)} problem(s); {hint}",
            report.problems)
    if report.problems:
        for problem in report.problems:
            log(problem)
        log(f"--skip_invalid: dropped {report.invalid_lines} invalid line(s), "
            f"training on {len(report.pairs)} valid pair(s)")
    return report, file_sha256(path)


def summarize_pairs(report: PairsReport) -> str:
    lines = [f"{report.path}: {len(report.pairs)} valid pair(s), {report.invalid_lines} invalid line(s)"]
    if report.pairs:
        lines.append("  pairs by source: " + ", ".join(f"{source} {n}" for source, n in report.sources.items()))
        chosen = statistics.mean(len(pair["chosen"][0]["content"]) for pair in report.pairs)
        rejected = statistics.mean(len(pair["rejected"][0]["content"]) for pair in report.pairs)
        lines.append(f"  mean characters per answer: chosen {chosen:.0f}, rejected {rejected:.0f}")
    return "\n".join(lines)


def pairs_to_conversations(pair: dict) -> tuple[list[dict], list[dict]]:
    """The two whole conversations of a valid pair: prompt + chosen, prompt + rejected (fresh message dicts)."""
    prompt = [{"role": m["role"], "content": m["content"]} for m in pair["prompt"]]

    def answer(key: str) -> list[dict]:
        return [{"role": "assistant", "content": pair[key][0]["content"]}]

    return prompt + answer("chosen"), [dict(m) for m in prompt] + answer("rejected")
