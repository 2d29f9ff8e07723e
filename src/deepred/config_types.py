"""Settings take the type their field declares, whatever built them (flags, YAML, code): a bad value is one line
naming the setting, before any work starts."""

from __future__ import annotations

import dataclasses
import math
import operator
import types
import typing
from typing import Any

from .errors import DeepRedError


class Checked:
    """Values are converted to each field's type and checked against its choices when a config is built, whatever
    built it (flags, YAML, code): a bad value is one line naming the setting, before any work starts.
    YAML reads `5e-5` as a string (YAML 1.1 floats need a dot); here it becomes the float the field says."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, checked_value(f, hints[f.name], getattr(self, f.name)))


def canonical_choice(value: Any, choices) -> Any:
    """A choice written in another letter case (`Q4_K_M`, as LM Studio names its files) is that choice."""
    if isinstance(value, str) and value not in choices:
        return next((c for c in choices if isinstance(c, str) and c.lower() == value.lower()), value)
    return value


def checked_value(f: dataclasses.Field, tp: Any, value: Any) -> Any:
    kind = base_type(tp)
    if value is None:
        if type(None) in typing.get_args(tp) or f.default is None:
            return None
        raise DeepRedError(f"setting {f.name}: a value is required")
    value = converted(f.name, kind, value)
    outside = out_of_bounds(value, f.metadata) if kind in (int, float) else None
    if outside:
        raise DeepRedError(f"setting {f.name}: must be {outside}, got {value!r}")
    choices = f.metadata.get("choices")
    if choices:
        value = canonical_choice(value, choices)
    if choices and value not in choices:
        raise DeepRedError(f"setting {f.name}: {value!r} is not one of {', '.join(map(str, choices))}")
    item_choices = f.metadata.get("item_choices")
    return checked_items(f.name, value, item_choices) if item_choices else value


def checked_items(name: str, value: list, item_choices: list[str]) -> list:
    """A list of choices (--quant_types): at least one, each a choice (in any letter case), none named twice."""
    value = [canonical_choice(item, item_choices) for item in value]
    bad = [item for item in value if item not in item_choices]
    if bad:
        raise DeepRedError(f"setting {name}: {', '.join(map(repr, bad))} not one of {', '.join(item_choices)}")
    if not value:
        raise DeepRedError(f"setting {name}: name at least one of {', '.join(item_choices)}")
    repeated = sorted({item for item in value if value.count(item) > 1}, key=value.index)
    if repeated:
        raise DeepRedError(f"setting {name}: {', '.join(map(repr, repeated))} named more than once; name each once")
    return value


BOUNDS = {"at_least": (operator.ge, "at least"), "above": (operator.gt, "above"),
          "at_most": (operator.le, "at most"), "below": (operator.lt, "below")}


def out_of_bounds(value: float, metadata) -> str | None:
    """What a number must be where it is not (`at least 1`, `above 0 and below 1`), from the field's bounds
    (metadata at_least, above, at_most, below); None when it is within them."""
    bounds = [(name, metadata[name]) for name in BOUNDS if name in metadata]
    if all(BOUNDS[name][0](value, bound) for name, bound in bounds):
        return None
    return " and ".join(f"{BOUNDS[name][1]} {bound}" for name, bound in bounds)


def converted(name: str, kind: type, value: Any) -> Any:
    wanted = {bool: "true or false", int: "a whole number", float: "a number", str: "text", list: "a list"}[kind]
    problem = DeepRedError(f"setting {name}: expected {wanted}, got {value!r}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise problem
    if isinstance(value, bool):  # True is an int in Python, never a number here
        raise problem
    if kind in (int, float):
        try:
            number = float(value) if isinstance(value, str) else value
        except ValueError:
            raise problem from None
        if not isinstance(number, (int, float)):
            raise problem
        if not math.isfinite(number):  # nan, inf: no setting means "unbounded" by infinity
            raise DeepRedError(f"setting {name}: must be a finite number, got {value!r}")
        if kind is int:
            if not float(number).is_integer():
                raise problem
            return int(number)
        return float(number)
    if kind is list:
        items = parse_list(value) if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(item, str) for item in items):
            raise problem
        return list(items)
    if not isinstance(value, str):
        raise problem
    return value


def base_type(tp: Any) -> type:
    """`int | None` -> int; `list[str]` -> list."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return base_type(args[0])
    return origin or tp


def parse_list(text: str) -> list[str]:
    return [item for item in (part.strip() for part in text.split(",")) if item]
