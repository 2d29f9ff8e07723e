"""Inputs: evaluation prompts and collected answers from JSONL, each bad line named with its number."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from ..errors import DeepRedError
from .persona import Persona, default_persona


def bundled_prompts_path() -> Path:
    return Path(str(resources.files("deepred") / "resources" / "eval_prompts.jsonl"))


def read_jsonl(path: str | Path, what: str) -> list[dict]:
    """Rows of a JSONL file; a missing file or a bad line is a one-line DeepRedError naming the line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DeepRedError(f"{what} file not found: {path}; check the path")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DeepRedError(f"{path}:{number}: not valid JSON ({exc.msg}); fix or remove the line") from exc
        if not isinstance(row, dict):
            raise DeepRedError(f"{path}:{number}: expected a JSON object per line; fix or remove the line")
        row["_line"] = number
        rows.append(row)
    if not rows:
        raise DeepRedError(f"{path}: no rows; the {what} file is empty")
    return rows


def load_prompts(path: str | Path | None = None, persona: Persona | None = None) -> list[dict]:
    """Prompt rows {id, category, prompt[, kind, expect_any]} from JSONL; default: the persona's prompts (Deep
    Red's: the bundled 72)."""
    path = Path(path) if path else (persona or default_persona()).prompts_path
    prompts = []
    for row in read_jsonl(path, "prompts"):
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise DeepRedError(f"{path}:{row['_line']}: needs a non-empty \"prompt\" string")
        prompts.append(prompt_fields(row, f"prompt-{row['_line']:03d}"))
    _check_unique_ids(prompts, path)
    return prompts


def prompt_fields(row: dict, default_id: str) -> dict:
    prompt = {"id": str(row.get("id") or default_id), "category": row.get("category"),
              "prompt": row.get("prompt") or ""}
    for key in ("kind", "expect_any"):
        if row.get(key):
            prompt[key] = row[key]
    return prompt


def _check_unique_ids(rows: list[dict], path: Path) -> None:
    seen = set()
    for row in rows:
        if row["id"] in seen:
            raise DeepRedError(f"{path}: id '{row['id']}' appears twice; ids must be unique")
        seen.add(row["id"])


def load_responses(path: str | Path, prompts_path: str | Path | None = None,
                   persona: Persona | None = None) -> list[dict]:
    """Answer rows {id, category, prompt, response[, error]}; temporal kinds come from the prompt file."""
    path = Path(path)
    rows = []
    for row in read_jsonl(path, "responses"):
        response = row.get("response")
        if response is not None and not isinstance(response, str):
            raise DeepRedError(f"{path}:{row['_line']}: \"response\" must be a string")
        if response is None and not row.get("error"):
            raise DeepRedError(f"{path}:{row['_line']}: needs a \"response\" (or an \"error\" for a failed request)")
        entry = prompt_fields(row, f"response-{row['_line']:03d}")
        entry.update(response=response or "", error=row.get("error") or None)
        rows.append(entry)
    _check_unique_ids(rows, path)
    return _with_known_temporal_kinds(rows, prompts_path, persona or default_persona())


def _with_known_temporal_kinds(rows: list[dict], prompts_path: str | Path | None, persona: Persona) -> list[dict]:
    """Fill kind/expect_any for rows whose prompt is a temporal prompt of the prompt file (default: the persona's)."""
    temporal = persona.temporal_category
    known = {p["prompt"].strip().lower(): p for p in load_prompts(prompts_path, persona)
             if p.get("category") == temporal}
    for row in rows:
        match = known.get(row["prompt"].strip().lower())
        if row.get("category") == temporal and match and not row.get("kind"):
            row["kind"] = match.get("kind")
            if match.get("expect_any") and not row.get("expect_any"):
                row["expect_any"] = match["expect_any"]
    return rows
