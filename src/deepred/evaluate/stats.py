"""Small numeric helpers shared by the scorers, the judge and the aggregation."""

from __future__ import annotations

import statistics
from typing import Iterable


def rate(flags: list[bool]) -> float | None:
    return round(sum(flags) / len(flags), 4) if flags else None


def mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return statistics.mean(values) if values else None


def rounded(value: float | None, digits: int = 4) -> float | None:
    return round(value, digits) if value is not None else None


def clip(value: float, low: float = 0.0, high: float = 1.0) -> float:
    return max(low, min(high, value))
