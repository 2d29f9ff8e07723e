"""Writes that never leave a half-written file under the final name: a temporary sibling, then a rename."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import DeepRedError


def write_atomic(path: Path, data: bytes | str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if isinstance(data, str):
        tmp.write_text(data, encoding="utf-8")
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2, default=str))


def refuse_output_over_inputs(output: str | Path, inputs: dict[str, str | Path | None], flag: str) -> None:
    """An output that is, contains or lies inside one of the command's inputs would destroy it: one clear line.
    Inputs that are not paths here (hub names) cannot clash."""
    out = Path(output).expanduser().resolve()
    for label, given in inputs.items():
        source = Path(given).expanduser() if given else None
        if source is None or not source.exists():
            continue
        source = source.resolve()
        relation = ("is" if out == source else "lies inside" if source in out.parents
                    else "contains" if out in source.parents else None)
        if relation:
            raise DeepRedError(f"{flag} {output} {relation} the {label} {given}; writing there would destroy it: "
                               f"choose another {flag}")
