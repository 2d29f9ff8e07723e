"""A YAML file read with the line of every key and list item, so that a check of its content can name FILE:LINE.
Whatever makes the file unreadable (not UTF-8, not YAML, a tag the safe loader does not build) is one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import DeepRedError, invalid_yaml


def read_yaml_with_lines(path: Path) -> tuple[Any, dict[tuple, int]]:
    """The data and the line of every key and list item, keyed by its path of keys and indexes."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DeepRedError(f"{path}: not valid UTF-8 (byte {exc.start}); save the file as UTF-8") from exc
    lines: dict[tuple, int] = {}
    constructor = yaml.SafeLoader("")

    def walk(node, where: tuple):
        lines[where] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            data = {}
            for k, v in node.value:
                key = constructor.construct_object(k)
                data[key] = walk(v, where + (key,))
                lines[where + (key,)] = k.start_mark.line + 1  # "key:" names the line, even for a block below it
            return data
        if isinstance(node, yaml.SequenceNode):
            return [walk(item, where + (i,)) for i, item in enumerate(node.value)]
        return constructor.construct_object(node)

    try:  # composing finds the syntax errors; building the values, tags it cannot build (a `<<:` merge key)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        return (walk(root, ()) if root is not None else None), lines
    except yaml.YAMLError as exc:
        raise invalid_yaml(path, exc) from exc
