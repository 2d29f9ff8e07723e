"""The report as text: the console summary table and report.md. Reports read only the report dict, whose meta
names the persona (title, cutoff, file)."""

from __future__ import annotations

from .aggregate import METRIC_TITLES, METRICS


def sides_of(report: dict) -> dict[str, dict]:
    return {"base": report["base"], "tuned": report["tuned"]} if "difference" in report else {"model": report}


def persona_meta(report: dict) -> dict:
    return report.get("meta", {}).get("persona") or {}


def cutoff_label(report: dict) -> str:
    """The persona's cutoff as the report names it (e.g. AD 180, 44 BC)."""
    persona = persona_meta(report)
    return persona.get("cutoff_label") or persona.get("cutoff", "the cutoff")


def over_deflection(side: dict) -> dict:
    """A side's over-deflection figures ({value, count, of, ids}); empty in reports written before it was measured."""
    return side["temporal_compliance"].get("over_deflection") or {}


def persona_title(report: dict) -> str:
    return persona_meta(report).get("title", "Persona")


def format_value(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def verdict(passed: bool | None) -> str:
    return "n/a" if passed is None else ("pass" if passed else "FAIL")


def summary_text(report: dict) -> str:
    """A short plain-text table of the metrics for the console."""
    sides = sides_of(report)
    lines = ["metric                 " + "".join(f"{label:>16}" for label in sides) + "   target"]
    for metric in METRICS:
        cells = "".join(f"{format_value(s[metric]['value']) + ' ' + verdict(s[metric]['passed']):>16}"
                        for s in sides.values())
        lines.append(f"{METRIC_TITLES[metric]:<23}{cells}   {next(iter(sides.values()))[metric]['target_text']}")
    for label, side in sides.items():
        if over_deflection_text(report, side):
            lines.append(f"{label}: {over_deflection_text(report, side)}")
        if side["failures"]["count"]:
            lines.append(f"{label}: {side['failures']['count']} request(s) failed and count as failures")
        if drift_text(report, side):
            lines.append(f"{label}: {drift_text(report, side)}")
    return "\n".join(lines)


def over_deflection_text(report: dict, side: dict) -> str | None:
    """How many questions not about time were answered as if their subject lay beyond the cutoff (lower is better;
    reports written before this was measured have no such line)."""
    over = over_deflection(side)
    if not over.get("of"):
        return None
    return (f"over-deflection {format_value(over['value'])}: {over['count']} of {over['of']} questions not about "
            f"time answered as if their subject lay beyond {cutoff_label(report)}")


def drift_text(report: dict, side: dict) -> str | None:
    """A line when answers sit nearer another persona's anchors than this persona's: a tune drifting into another
    character (or answers of another persona scored as this one)."""
    nearer = side["style_consistency"].get("nearer_another_persona") or {}
    if not nearer:
        return None
    whom = ", ".join(f"{name} {count}" for name, count in nearer.items())
    return (f"{sum(nearer.values())} of {side['style_consistency']['count']} answers are nearer another persona's "
            f"anchor sentences than {persona_title(report)}'s ({whom})")


def render_markdown(report: dict) -> str:
    sides = sides_of(report)
    labels = list(sides)
    lines = [f"# {persona_title(report)} evaluation", ""]
    persona = persona_meta(report)
    if persona:
        cutoff = cutoff_label(report)
        lines += [f"Persona: {persona['title']} ({persona['file']}), knowledge up to {cutoff}.", ""]
    for label, side in sides.items():
        lines.append(f"- **{label}**: {side['meta']['source']} ({side['meta']['count']} answers, "
                     f"{side['failures']['count']} failed requests)")
    lines += ["", "| metric | " + " | ".join(labels) + (" | difference" if len(labels) > 1 else "") + " | target |",
              "|---|" + "---|" * len(labels) + ("---|" if len(labels) > 1 else "") + "---|"]
    for metric in METRICS:
        cells = [f"{format_value(s[metric]['value'])} ({verdict(s[metric]['passed'])})" for s in sides.values()]
        if len(labels) > 1:
            diff = report["difference"][metric]
            cells.append("n/a" if diff is None else f"{diff * 100:+.1f} pts")
        lines.append(f"| {METRIC_TITLES[metric]} | " + " | ".join(cells)
                     + f" | {sides[labels[0]][metric]['target_text']} |")
    over = [f"- **{label}**: {over_deflection_text(report, side)}" for label, side in sides.items()
            if over_deflection_text(report, side)]
    lines += ["", "Over-deflection (lower is better):", "", *over] if over else []
    drift = [f"- **{label}**: {drift_text(report, side)}" for label, side in sides.items() if drift_text(report, side)]
    lines += ["", "Nearer another persona:", "", *drift] if drift else []
    lines += ["", "## Per category (in style / in character / coherent)", ""]
    lines += _category_table_md(sides)
    for label, side in sides.items():
        lines += _findings_md(label, side)
    lines += ["", "Metric definitions: docs/metrics.md. " + side["failures"]["note"].capitalize() + "."]
    return "\n".join(lines) + "\n"


def _category_table_md(sides: dict[str, dict]) -> list[str]:
    categories = sorted({c for s in sides.values() for c in s["style_consistency"]["per_category"]})
    lines = ["| category | " + " | ".join(sides) + " |", "|---|" + "---|" * len(sides)]
    for c in categories:
        cells = []
        for side in sides.values():
            values = [side[m]["per_category"].get(c) for m in ("style_consistency", "character_voice", "coherence")]
            cells.append(" / ".join(format_value(v) for v in values))
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return lines


def _findings_md(label: str, side: dict) -> list[str]:
    lines = ["", f"## Flagged answers ({label})", ""]
    for e in side["responses"]:
        problems = flags(e, with_style=False)
        if problems:
            lines.append(f"- `{e['id']}`: " + " | ".join(problems))
    if len(lines) == 3:
        lines.append("none")
    return lines


def flags(entry: dict, with_style: bool = True) -> list[str]:
    """What is wrong with one answer, in words (a failed request is named once, not as every failure it causes)."""
    found = []
    if entry.get("error"):
        found.append(f"request failed: {entry['error']}")
    if with_style and not entry["in_style"]:
        nearer = (entry.get("contrast_margin") or 0) < 0
        found.append(f"not in style ({entry['style_score']:.2f}"
                     + (f", nearer {entry['nearest_other_persona']})" if nearer else ")"))
    if entry["out_of_character"] and not entry.get("error"):
        found.append("out of character: " + "; ".join(entry["voice_violations"]))
    if entry.get("temporal_violation") and not entry.get("error"):
        found.append(entry.get("temporal_reason") or "temporal violation")
    if entry.get("over_deflected") and not entry.get("error"):
        found.append("deflected a question not about time")
    if not entry["coherent"] and not entry.get("error"):
        found.append("incoherent: " + "; ".join(entry["incoherence"]))
    return found




def set_rows(named: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a table that puts several prompt sets' reports side by side (each side of each set): the
    four metrics, temporal compliance split into later-years questions and control questions, and the
    over-deflection of the other questions."""
    columns = [(name, label, side) for name, report in named.items() for label, side in sides_of(report).items()]
    header = ["metric", *(f"{name}: {label}" for name, label, _ in columns)]
    rows = [[METRIC_TITLES[metric], *(format_value(side[metric]["value"]) for *_, side in columns)]
            for metric in METRICS]
    kinds = sorted({kind for *_, side in columns for kind in side["temporal_compliance"].get("per_kind", {})})
    for kind in kinds:
        rows.append([f"temporal, {kind} rows",
                     *(format_value(side["temporal_compliance"].get("per_kind", {}).get(kind)) for *_, side in columns)])
    rows.append(["questions not about time deflected (lower is better)",
                 *(format_value(over_deflection(side).get("value")) for *_, side in columns)])
    return header, rows


def sets_markdown(named: dict[str, dict]) -> str:
    header, rows = set_rows(named)
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *("| " + " | ".join(row) + " |" for row in rows)])


def sets_html(named: dict[str, dict]) -> str:
    from html import escape

    header, rows = set_rows(named)
    cells = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"
