"""Deep Red's figures do not change: every verdict on the labelled answers equals the snapshot taken before the
evaluator was split into a package and its persona words moved to `resources/personas/deepred.yaml`.

tests/data/labelled_verdicts_deepred.json was produced at commit 07ddde5 (the single-module evaluate.py) by
    E.score_responses(E.load_responses("tests/data/labelled_responses.jsonl"))
keeping, per answer id, the verdicts (in_style, out_of_character, temporal_violation, coherent), the style score,
the temporal kind and the evidence lists behind them, and the four metric values of E.summarize.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deepred import evaluate as E

DATA = Path(__file__).parent / "data"
SNAPSHOT = json.loads((DATA / "labelled_verdicts_deepred.json").read_text())


@pytest.fixture(scope="module")
def entries() -> list[dict]:
    return E.score_responses(E.load_responses(DATA / "labelled_responses.jsonl"))


def test_every_verdict_matches_the_snapshot(entries):
    assert len(entries) == len(SNAPSHOT["verdicts"]) == 100
    for entry in entries:
        expected = SNAPSHOT["verdicts"][entry["id"]]
        for key, value in expected.items():
            if key == "style_score":
                assert entry[key] == pytest.approx(value, abs=2e-4), (entry["id"], key)
            else:
                assert entry.get(key) == value, (entry["id"], key)


def test_metric_values_match_the_snapshot(entries):
    summary = E.summarize(entries)
    assert {m: summary[m]["value"] for m in E.METRICS} == SNAPSHOT["summary"]
