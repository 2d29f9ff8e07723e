"""JSONL read line by line: the numbered non-blank lines of a file's bytes, and each line as one JSON object or the
one problem that stops it. The dataset (data.py), the preference pairs (pairs_data.py) and the prompt files
(prompts.py) all read this way, so a bad line is named the same way wherever it is."""

from __future__ import annotations

import json
from typing import Iterator


def numbered_lines(raw: bytes) -> Iterator[tuple[int, bytes]]:
    """(line number counted from 1, the line's bytes) for each line that is not blank."""
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if line.strip():
            yield number, line


def parse_json_object(line_bytes: bytes, shape: str) -> tuple[dict | None, list[str]]:
    """One JSONL line as a JSON object, or the one problem that stops it being read (`shape` shows what is
    expected, e.g. '{"messages": [...]}')."""
    try:
        line = line_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, [f"not valid UTF-8 (byte {exc.start}); re-save the file as UTF-8"]
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        return None, [f"not valid JSON ({exc.msg} at column {exc.colno})"]
    except (ValueError, RecursionError) as exc:  # a number of thousands of digits; nesting deeper than Python goes
        return None, [f"not JSON this reader can take ({str(exc).split(';')[0] or type(exc).__name__})"]
    if not isinstance(obj, dict):
        return None, [f"expected an object like {shape}"]
    return obj, []
