"""Charts for the report: each metric against its target, and the in-style share per category (PNG bytes)."""

from __future__ import annotations

import io

from .aggregate import METRIC_TITLES, METRICS
from .report_text import persona_title, sides_of


def render_charts(report: dict) -> dict[str, bytes]:
    """PNG bytes: metrics.png (each metric against its target) and style_by_category.png."""
    import matplotlib

    matplotlib.use("Agg")
    return {"metrics.png": _metrics_chart(report), "style_by_category.png": _category_chart(report)}


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _bar_groups(ax, labels: list[str], series: dict[str, list[float]]) -> None:
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        positions = [x + (i - (len(series) - 1) / 2) * width for x in range(len(labels))]
        bars = ax.bar(positions, [v * 100 for v in values], width, label=name)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    ax.set_ylim(0, 110)
    ax.set_ylabel("% of responses")


def _metrics_chart(report: dict) -> bytes:
    import matplotlib.pyplot as plt

    sides = sides_of(report)
    fig, ax = plt.subplots(figsize=(7, 3.8))
    _bar_groups(ax, [METRIC_TITLES[m] for m in METRICS],
                {label: [s[m]["value"] or 0.0 for m in METRICS] for label, s in sides.items()})
    targets = next(iter(sides.values()))
    for x, metric in enumerate(METRICS):
        ax.plot([x - 0.45, x + 0.45], [targets[metric]["target"] * 100] * 2, color="black", lw=1.2, ls="--")
    ax.set_title(f"{persona_title(report)} persona metrics (dashed: target)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(fig)


def _category_chart(report: dict) -> bytes:
    import matplotlib.pyplot as plt

    sides = sides_of(report)
    categories = sorted({c for s in sides.values() for c in s["style_consistency"]["per_category"]})
    fig, ax = plt.subplots(figsize=(7, 3.8))
    _bar_groups(ax, categories, {label: [s["style_consistency"]["per_category"].get(c) or 0.0 for c in categories]
                                 for label, s in sides.items()})
    ax.axhline(next(iter(sides.values()))["style_consistency"]["target"] * 100, color="black", lw=1.2, ls="--")
    ax.set_title("In-style responses per category")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(fig)


