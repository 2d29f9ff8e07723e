"""Inputs: answers collected elsewhere (`--responses`), from JSONL, each bad line named with its number; the
prompts themselves are read by deepred.prompts."""

from __future__ import annotations

from pathlib import Path

from ..errors import DeepRedError
from ..persona import Persona, default_persona
from ..prompts import checked_kind, load_prompts, prompt_fields, read_jsonl, unique_ids


def load_responses(path: str | Path, prompts_path: str | Path | None = None,
                   persona: Persona | None = None) -> list[dict]:
    """Answer rows {id, category, prompt, response[, kind, expect_any, error]}; a row without a kind takes its kind
    and expect_any from the temporal prompt of the prompt file (default: the persona's) with the same prompt text
    (compared whole, ignoring case and the spaces around it). A kind is checked as in a prompt file."""
    path = Path(path)
    persona = persona or default_persona()

    def answer_row(row: dict) -> dict:
        response = row.get("response")
        if response is not None and not isinstance(response, str):
            raise DeepRedError(f"{path}:{row['_line']}: \"response\" must be a string")
        if response is None and not row.get("error"):
            raise DeepRedError(f"{path}:{row['_line']}: needs a \"response\" (or an \"error\" for a failed request)")
        entry = prompt_fields(row, f"response-{row['_line']:03d}", checked_kind(row, persona, path),
                              f"{path}:{row['_line']}")
        entry.update(response=response or "", error=row.get("error") or None, _line=row["_line"])
        return entry

    rows = read_jsonl(path, "responses", '{"id": ..., "prompt": ..., "response": ...}', check=answer_row)
    return _with_known_temporal_kinds(unique_ids(rows, path), prompts_path, persona)


def _with_known_temporal_kinds(rows: list[dict], prompts_path: str | Path | None, persona: Persona) -> list[dict]:
    """Fill kind and expect_any, where a row leaves them out, for rows whose prompt is a temporal prompt of the prompt
    file (default: the persona's)."""
    temporal = persona.temporal_category
    known = {p["prompt"].strip().lower(): p for p in load_prompts(prompts_path, persona)
             if p.get("category") == temporal}
    for row in rows:
        match = known.get(row["prompt"].strip().lower())
        if row.get("category") != temporal or not match:
            continue
        if not row.get("kind") and match.get("kind"):
            row["kind"] = match["kind"]
        if row.get("kind") == match.get("kind") and match.get("expect_any") and not row.get("expect_any"):
            row["expect_any"] = match["expect_any"]  # a control row that gave its kind still needs the keys
    return rows
