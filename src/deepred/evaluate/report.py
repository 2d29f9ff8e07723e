"""The report files: report.json, report.md, report.html (answers side by side, charts embedded) and the PNGs."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from ..errors import DeepRedError
from ..files import ensure_writable_folder, write_atomic
from .aggregate import METRIC_TITLES, METRICS
from .charts import render_charts
from .report_text import (cutoff_label, flags, format_value, over_deflection_text, persona_title, render_markdown,
                          sides_of, verdict)

HTML_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }} evaluation</title>
<style>
body{font-family:Georgia,serif;margin:2em auto;max-width:1200px;color:#222;background:#fbf8f3}
h1,h2{color:#8b0000}table{border-collapse:collapse;margin:1em 0;width:100%}
th,td{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left;font-size:14px}
th{background:#f0e6dc}.pass{color:#176317;font-weight:bold}.fail{color:#b00000;font-weight:bold}
.answer{white-space:pre-wrap;font-family:inherit}.flag{font-size:12px;color:#555}.bad{background:#fde8e8}
img{max-width:100%;border:1px solid #ddd;margin:.5em 0}details{margin:.3em 0}
</style></head><body>
<h1>{{ title }} evaluation</h1>
<p>Created {{ created }}.</p>
<ul>{% for label, side in sides.items() %}<li><b>{{ label }}</b>: {{ side.meta.source }}
({{ side.meta.count }} answers, {{ side.failures.count }} failed requests)</li>{% endfor %}</ul>
<h2>Metrics against the specification's targets</h2>
<table><tr><th>metric</th><th>definition</th>{% for label in sides %}<th>{{ label }}</th>{% endfor %}
{% if difference %}<th>difference</th>{% endif %}<th>target</th></tr>
{% for m in metrics %}<tr><td>{{ titles[m] }}</td><td>{{ definitions[m] }}</td>
{% for side in sides.values() %}<td>{{ fmt(side[m].value) }}
<span class="{{ 'pass' if side[m].passed else 'fail' }}">{{ verdict(side[m].passed) }}</span></td>{% endfor %}
{% if difference %}<td>{{ diff(difference[m]) }}</td>{% endif %}<td>{{ first[m].target_text }}</td></tr>{% endfor %}
</table>
{% for label, side in sides.items() %}{% if over(side) %}<p><b>{{ label }}</b>: {{ over(side) }}.</p>{% endif %}
{% endfor %}<p class="flag">{{ first.failures.note | capitalize }}.</p>
{% for label, side in sides.items() %}{% if side.judge %}<p>Judge ({{ label }}, {{ side.judge.model }}):
style {{ side.judge.style_mean }}/5, voice {{ side.judge.voice_mean }}/5 over {{ side.judge.graded }} graded answers.</p>
{% endif %}{% endfor %}
<h2>Charts</h2>{% for name, data in charts.items() %}<img alt="{{ name }}" src="data:image/png;base64,{{ data }}">{% endfor %}
{% for section in extra %}<h2>{{ section.title }}</h2>{% if section.image %}
<img alt="{{ section.title }}" src="data:image/png;base64,{{ section.image }}">{% endif %}
{% if section.caption %}<p>{{ section.caption }}</p>{% endif %}{% if section.html %}{{ section.html | safe }}{% endif %}
{% endfor %}
<h2>Answers{% if difference %} (base and tuned side by side){% endif %}</h2>
<table><tr><th>id</th><th>prompt</th>{% for label in sides %}<th>{{ label }}</th>{% endfor %}</tr>
{% for row in rows %}<tr><td>{{ row.id }}<br><span class="flag">{{ row.category }}</span></td><td>{{ row.prompt }}</td>
{% for cell in row.cells %}<td class="{{ 'bad' if cell and cell.flags else '' }}">{% if cell %}
<div class="answer">{{ cell.response }}</div><div class="flag">{{ cell.flags | join(' · ') or 'in style, in character, coherent' }}</div>
{% else %}<span class="flag">no answer</span>{% endif %}</td>{% endfor %}</tr>{% endfor %}
</table></body></html>
"""


def short_definitions(report: dict) -> dict[str, str]:
    cutoff = cutoff_label(report)  # e.g. AD 180, 44 BC
    return {
        "style_consistency": f"share of answers in the {persona_title(report)} style (persona vocabulary fields + "
                             "embedding similarity to persona vs generic-assistant anchors)",
        "character_voice": "share of answers in character (no AI/assistant self-reference, no other assistant or "
                           "maker named, no modern assistant register, markdown or emojis); every category at target",
        "temporal_compliance": f"temporal prompts: no knowledge after {cutoff}; control prompts answered",
        "coherence": "not empty, not repetitive, real words with sentence structure, perplexity under the limit "
                     "when a perplexity model is available",
    }

def _answer_rows(sides: dict[str, dict]) -> list[dict]:
    by_side = {label: {e["id"]: e for e in side["responses"]} for label, side in sides.items()}
    order = []
    for side in sides.values():
        order += [e["id"] for e in side["responses"] if e["id"] not in order]
    rows = []
    for id_ in order:
        entries = [by_side[label].get(id_) for label in sides]
        first = next(e for e in entries if e)
        cells = [{"response": e["response"], "flags": flags(e)} if e else None for e in entries]
        rows.append({"id": id_, "category": first.get("category"), "prompt": first.get("prompt"), "cells": cells})
    return rows


def _extra_section(section: dict | tuple) -> dict:
    if isinstance(section, tuple):
        title, value = section
        is_image = isinstance(value, (bytes, Path)) or (isinstance(value, str) and value.lower().endswith(".png"))
        section = {"title": title, "image": value} if is_image else {"title": title, "html": value}
    image = section.get("image")
    if isinstance(image, (str, Path)):
        if not Path(image).is_file():
            raise DeepRedError(f"report image not found: {image}")
        image = Path(image).read_bytes()
    return {"title": section.get("title", ""), "caption": section.get("caption") or section.get("text"),
            "html": section.get("html"), "image": base64.b64encode(image).decode() if image else None}


def render_html(report: dict, charts: dict[str, bytes], extra_html_sections: list | None = None) -> str:
    from jinja2 import Environment

    sides = sides_of(report)
    first = next(iter(sides.values()))
    template = Environment(autoescape=True).from_string(HTML_TEMPLATE)
    return template.render(
        created=report["meta"].get("created", ""), sides=sides, first=first, metrics=METRICS, titles=METRIC_TITLES,
        definitions=short_definitions(report), title=persona_title(report), difference=report.get("difference"),
        fmt=format_value, verdict=verdict, over=lambda side: over_deflection_text(report, side),
        diff=lambda d: "n/a" if d is None else f"{d * 100:+.1f} pts",
        charts={name: base64.b64encode(data).decode() for name, data in charts.items()},
        extra=[_extra_section(s) for s in extra_html_sections or []], rows=_answer_rows(sides))


def write_report(report: dict, output_dir: str | Path, extra_html_sections: list | None = None) -> dict[str, Path]:
    """Write report.json, report.md, report.html and the PNG charts; each file appears complete or not at all.

    extra_html_sections: extra parts for report.html (e.g. a training loss curve), each either a dict with
    "title" and any of "image" (PNG path or bytes, embedded), "caption" (text) and "html" (trusted HTML inserted
    as is), or a tuple (title, PNG path or bytes) / (title, trusted HTML string).
    """
    output_dir = Path(output_dir)
    ensure_writable_folder(output_dir, "--output_dir")
    charts = render_charts(report)
    paths = {name: output_dir / name for name in charts}
    for name, data in charts.items():
        write_atomic(paths[name], data)
    files = {"json": ("report.json", json.dumps(report, indent=2, ensure_ascii=False, default=str)),
             "md": ("report.md", render_markdown(report)),
             "html": ("report.html", render_html(report, charts, extra_html_sections))}
    for key, (name, text) in files.items():
        paths[key] = output_dir / name
        write_atomic(paths[key], text)
    return paths
