"""A minimal renderer for the part of Go's text/template that Ollama chat templates of the ChatML kind use.

No Go template engine installs on this project's Python from a package registry (the one PyPI package, a Go
library behind ctypes, ships wheels for CPython 3.12 only), so the Modelfile's TEMPLATE is rendered here. Supported,
with Go's semantics: text; actions `{{ ... }}` with the trim markers `{{- ` and ` -}}` (all adjacent whitespace);
`.Field` chains on the current value and `$.Field` on the root; `if` / `else` / `end` with Go's truth (empty
string, zero, nil and empty lists are false); `range` over a list, which sets the current value. Anything else
raises, so a template using more than this cannot pass a test by accident.
"""

from __future__ import annotations

import re

_ACTION = re.compile(r"\{\{(- )?\s*(.*?)\s*( -)?\}\}", re.S)


def _tokens(template: str) -> list[tuple[str, str]]:
    """[('text', ...), ('action', ...)] with the trim markers applied to the neighbouring text."""
    out: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for match in _ACTION.finditer(template):
        text = template[pos:match.start()]
        if trim_next:
            text = text.lstrip(" \t\r\n")
        if match.group(1):
            text = text.rstrip(" \t\r\n")
        out.append(("text", text))
        out.append(("action", match.group(2)))
        pos, trim_next = match.end(), bool(match.group(3))
    tail = template[pos:]
    out.append(("text", tail.lstrip(" \t\r\n") if trim_next else tail))
    return out


def _parse(tokens: list[tuple[str, str]], i: int = 0, closers: tuple[str, ...] = ()) -> tuple[list, int, str]:
    """Nodes until one of `closers` ('end', 'else'); returns (nodes, next index, the closer met)."""
    nodes: list = []
    while i < len(tokens):
        kind, value = tokens[i]
        i += 1
        if kind == "text":
            if value:
                nodes.append(("text", value))
            continue
        word, _, rest = value.partition(" ")
        if word in closers:
            return nodes, i, word
        if word in ("if", "range"):
            body, i, closer = _parse(tokens, i, ("end", "else"))
            other: list = []
            if closer == "else":
                other, i, _ = _parse(tokens, i, ("end",))
            nodes.append((word, rest.strip(), body, other))
        elif re.fullmatch(r"\$?(\.[A-Za-z_]\w*)+|\.", value):
            nodes.append(("field", value))
        else:
            raise ValueError(f"unsupported action {{{{ {value} }}}}")
    if closers:
        raise ValueError(f"missing {{{{ end }}}} (expected one of {closers})")
    return nodes, i, ""


def _lookup(path: str, dot, root):
    value = root if path.startswith("$") else dot
    for name in filter(None, path.lstrip("$").split(".")):
        value = value.get(name) if isinstance(value, dict) else getattr(value, name, None)
    return value


def _truth(value) -> bool:
    return value not in (None, False, 0, "") and not (isinstance(value, (list, tuple, dict)) and not value)


def _render(nodes: list, dot, root) -> str:
    out = []
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "field":
            value = _lookup(node[1], dot, root)
            out.append("" if value is None else str(value))
        elif node[0] == "if":
            _, path, body, other = node
            out.append(_render(body if _truth(_lookup(path, dot, root)) else other, dot, root))
        else:  # range
            _, path, body, other = node
            items = _lookup(path, dot, root) or []
            out.append("".join(_render(body, item, root) for item in items) if items else _render(other, dot, root))
    return "".join(out)


def render(template: str, data: dict) -> str:
    nodes, _, _ = _parse(_tokens(template))
    return _render(nodes, data, data)


def ollama_chat_data(messages: list[dict]) -> dict:
    """What Ollama passes a `.Messages` template (template.Execute): System is every system message joined by a
    blank line, Messages every message, consecutive ones of the same role merged with a blank line."""
    merged: list[dict] = []
    for message in messages:
        if merged and merged[-1]["Role"] == message["role"]:
            merged[-1]["Content"] += "\n\n" + message["content"]
        else:
            merged.append({"Role": message["role"], "Content": message["content"]})
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return {"System": system, "Messages": merged, "Tools": None, "Response": ""}
