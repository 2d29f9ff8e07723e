"""What every deploy target shares: the file it publishes, the CLI it drives, and the question it asks the model."""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

from ..errors import DeepRedError
from ..persona import load_persona
from ..prompts import sample_chat

_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def one_line(text: str, limit: int = 500) -> str:
    """A tool's output as one line without colour codes, cut to `limit` characters."""
    text = _ANSI_RE.sub("", text)
    line = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def executable_from_env(variable: str) -> str | None:
    """The executable `$variable` names; None when unset; an error when set to anything else."""
    explicit = os.environ.get(variable)
    if not explicit:
        return None
    path = Path(explicit).expanduser()
    if path.is_file() and os.access(path, os.X_OK):
        return str(path)
    raise DeepRedError(f"{variable}={explicit} is not an executable file; fix it or unset it")


def persona_chat(persona_path: str | None) -> list[dict]:
    """The persona's sample question with its evaluation system prompt (the specification's manual test for Deep
    Red: "You are Deep Red." and "What is the purpose of our Mars mission?")."""
    return sample_chat(load_persona(persona_path))


def curl_command(url: str, model: str, messages: list[dict]) -> str:
    body = {"model": model, "messages": messages}
    return (f"curl -s {shlex.quote(url + '/chat/completions')} -H 'Content-Type: application/json' "
            f"-d {shlex.quote(json.dumps(body))}")
