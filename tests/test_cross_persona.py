"""Persona against persona: every bundled persona's labelled answers scored under every bundled persona.

A bundled persona (`src/deepred/resources/personas/NAME.yaml`) has its labelled answers in
`tests/data/labelled_responses_NAME.jsonl` (Deep Red's, the first, in `labelled_responses.jsonl`), with the five
labels of Deep Red's set. A persona added to the folder joins both tests below without a change here, and a persona
without a labelled set fails the first.

- Own separation, per persona: the rates the issue sets for any persona (in-persona in style >= 0.8, generic in style
  <= 0.2, anachronisms caught >= 0.9, period answers flagged <= 0.1, out-of-character caught >= 0.8).
- Across personas: B's in-persona answers scored as A are in style at most 20 % of the time. Before the contrast
  (docs/metrics.md, "Persona against persona") the butler's were 8 of 16 in style as Deep Red.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from deepred import evaluate as E
from deepred.cli import main
from deepred.evaluate.contrast import other_bundled_personas
from deepred.evaluate.style import own_fields

from .conftest import DATA

PERSONAS = Path(E.__file__).parent.parent / "resources" / "personas"
BUNDLED = sorted(path.stem for path in PERSONAS.glob("*.yaml"))
LABELS = {"in_persona", "generic_assistant", "out_of_character", "anachronistic", "period_correct"}
CROSS_IN_STYLE = 0.2  # at most one in five of another persona's answers may pass as this one's


def labelled_file(name: str) -> Path:
    """The labelled answers of the bundled persona `name` (Deep Red's keep the name they had before the others)."""
    path = DATA / f"labelled_responses_{name}.jsonl"
    return DATA / "labelled_responses.jsonl" if name == "deepred" and not path.exists() else path


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def rate(entries: list[dict], flag) -> float:
    return sum(bool(flag(e)) for e in entries) / len(entries)


_SCORED: dict[tuple[str, str], dict[str, list[dict]]] = {}


def scored(scorer: str, author: str) -> dict[str, list[dict]]:
    """`author`'s labelled answers scored as `scorer`, grouped by label (each pair scored once per session)."""
    if (scorer, author) not in _SCORED:
        persona = E.load_persona(f"{scorer}.yaml")
        rows = rows_of(labelled_file(author))
        labels = {row["id"]: row["label"] for row in rows}
        answers = [{k: row[k] for k in ("id", "category", "prompt", "response") if k in row} for row in rows]
        groups = defaultdict(list)
        for entry in E.score_responses(answers, persona=persona):
            groups[labels[entry["id"]]].append(entry)
        _SCORED[scorer, author] = groups
    return _SCORED[scorer, author]


def test_there_are_personas_to_contrast_and_each_has_a_labelled_set():
    assert {"deepred", "butler"} <= set(BUNDLED)
    for name in BUNDLED:
        rows = rows_of(labelled_file(name))
        counts = defaultdict(int)
        for row in rows:
            counts[row["label"]] += 1
        assert set(counts) == LABELS, name
        assert min(counts.values()) >= 15, (name, dict(counts))


@pytest.mark.parametrize("name", BUNDLED)
def test_each_persona_separates_its_own_labels(name):
    groups = scored(name, name)
    assert rate(groups["in_persona"], lambda e: e["in_style"]) >= 0.8
    assert rate(groups["generic_assistant"], lambda e: e["in_style"]) <= 0.2
    assert rate(groups["anachronistic"], lambda e: e["anachronisms"]) >= 0.9
    assert rate(groups["period_correct"], lambda e: e["anachronisms"] or e["temporal_violation"]) <= 0.1
    assert rate(groups["out_of_character"], lambda e: e["out_of_character"]) >= 0.8


@pytest.mark.parametrize("scorer,author", [(a, b) for a in BUNDLED for b in BUNDLED if a != b],
                         ids=lambda name: name)
def test_another_personas_answers_are_not_in_style(scorer, author):
    """The matrix: `author`'s in-persona answers are in `scorer`'s style at most 20 % of the time."""
    in_persona = scored(scorer, author)["in_persona"]
    share = rate(in_persona, lambda e: e["in_style"])
    assert share <= CROSS_IN_STYLE, (scorer, author, [e["id"] for e in in_persona if e["in_style"]])
    # Most of them sit nearer their author's anchor sentences than the scorer's: the contrast sees whose voice it is.
    assert rate(in_persona, lambda e: e["contrast_margin"] < 0) >= 0.8


def test_every_other_bundled_persona_is_a_contrast():
    for name in BUNDLED:
        persona = E.load_persona(f"{name}.yaml")
        assert sorted(other.name for other in other_bundled_personas(persona)) == sorted(set(BUNDLED) - {name})


def test_a_word_two_personas_share_does_not_make_the_style_alone():
    """`shall` and `duty` are words of Deep Red's fields and of the butler's: present, but not the persona's own."""
    butler, deep_red = E.load_persona("butler.yaml"), E.load_persona("deepred.yaml")
    shared = "You shall do your duty."
    assert set(E.style_fields(shared, "", butler)) == {"duty"} and own_fields(shared, "", butler) == []
    assert set(E.style_fields(shared, "", deep_red)) >= {"command"} and own_fields(shared, "", deep_red) == []
    assert own_fields("Very good, sir. You shall do your duty.", "", butler) == ["deference"]
    entry = E.score_response("I shall see that you shall do your duty, and you shall do it, and do it well.",
                             "What must I do?", persona=butler)
    assert entry["style_fields"] and not entry["own_fields"] and not entry["in_style"]


def test_contrast_anchors_of_the_persona_file_are_negatives(tmp_path):
    """A persona file's `contrast_anchors` count as another voice: an answer in that voice loses its margin."""
    from .test_persona import persona_copy

    pirate = ["Arr, matey, hoist the mainsail and make for the open sea!",
              "Shiver me timbers, the captain's treasure be buried on the isle.",
              "Ye scurvy dogs, swab the deck before the Jolly Roger flies at dawn."]
    anchors = "".join(f"    - {json.dumps(line)}\n" for line in pirate)
    path = persona_copy(tmp_path, lambda t: t.replace("  judge_traits:", "  contrast_anchors:\n" + anchors +
                                                      "  judge_traits:"))
    persona = E.load_persona(path)
    assert persona.contrast_anchors == tuple(pirate)
    answer = "Arr, sir, the pirates hoisted the mainsail, buried the treasure, and made for the open sea at dawn."
    with_contrast = E.score_response(answer, "What news?", persona=persona)
    plain = E.score_response(answer, "What news?", persona=E.load_persona("butler.yaml"))
    assert with_contrast["nearest_other_persona"] == "contrast_anchors" and with_contrast["contrast_margin"] < 0
    assert with_contrast["style_score"] < plain["style_score"]


def test_too_few_contrast_anchors_are_refused_with_the_line(tmp_path, capsys):
    from .test_persona import line_of, persona_copy

    path = persona_copy(tmp_path, lambda t: t.replace("  judge_traits:", "  contrast_anchors: ['Arr, matey.']\n"
                                                                         "  judge_traits:"))
    assert main(["validate", str(DATA / "mini.jsonl"), "--persona", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path}:{line_of(path, 'contrast_anchors')}: " in err
    assert "style.contrast_anchors: expected a list of at least 3" in err


def test_drift_check_names_the_persona_the_answers_belong_to(tmp_path):
    """`deepred evaluate --persona deepred.yaml --responses <the butler's answers>`: style fails, and the report says
    whose voice the answers are nearer."""
    rows = [{k: r[k] for k in ("id", "category", "prompt", "response")} for r in rows_of(labelled_file("butler"))
            if r["label"] == "in_persona"]
    answers = tmp_path / "butler_answers.jsonl"
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "report"
    assert main(["evaluate", "--persona", "deepred.yaml", "--responses", str(answers), "--output_dir", str(out)]) == 0
    style = json.loads((out / "report.json").read_text())["style_consistency"]
    assert style["value"] <= CROSS_IN_STYLE and not style["passed"]
    assert style["nearer_another_persona"]["Hargreaves"] >= 0.8 * len(rows)
    assert "answers are nearer another persona's anchor sentences than Deep Red's (Hargreaves" in \
        (out / "report.md").read_text()
