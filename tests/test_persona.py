"""The persona file: a second persona (Hargreaves, a Victorian butler whose knowledge ends in 1899) proven end to
end with its own labelled answers, every malformed-file guard refusing in one line, `validate --persona`
coverage, `run --persona` checked before training (the evaluation package's one-way imports: .importlinter).

tests/data/labelled_responses_butler.jsonl was written by hand for this test, with the labels of Deep Red's set
(16 answers per label); the thresholds below are the ones tests/evaluate/test_evaluate.py asserts for Deep Red
(docs/metrics.md, "Separation measured on the labelled set").
"""

from __future__ import annotations

import json
import re
import shutil
from collections import defaultdict
from pathlib import Path

import pytest

from deepred import evaluate as E
from deepred.cli import main
from deepred.config import RunConfig, resolve_with_yaml

from .conftest import DATA
from .evaluate import test_evaluate as deep_red
from .test_horizon import persona_copy as deep_red_copy

BUTLER_LABELLED = DATA / "labelled_responses_butler.jsonl"
PACKAGE = Path(E.__file__).parent
PERSONAS = PACKAGE.parent / "resources" / "personas"
DATASET = PACKAGE.parent / "resources" / "theme_dataset.jsonl"


def rate(entries: list[dict], flag) -> float:
    return sum(bool(flag(e)) for e in entries) / len(entries)


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def butler() -> E.Persona:
    return E.load_persona("butler.yaml")


@pytest.fixture(scope="module")
def labelled(butler) -> dict[str, list[dict]]:
    labels = {row["id"]: row["label"] for row in rows_of(BUTLER_LABELLED)}
    groups = defaultdict(list)
    for entry in E.score_responses(E.load_responses(BUTLER_LABELLED, persona=butler), persona=butler):
        groups[labels[entry["id"]]].append(entry)
    return groups


# --------------------------------------------------------------------------------------------- the second persona


def test_butler_set_has_deep_reds_labels_and_sizes():
    ours = defaultdict(int)
    for row in rows_of(BUTLER_LABELLED):
        ours[row["label"]] += 1
    assert set(ours) == {row["label"] for row in rows_of(DATA / "labelled_responses.jsonl")}
    assert min(ours.values()) >= 15


@pytest.mark.parametrize("deep_reds_check", [
    deep_red.test_style_separates_persona_from_generic_assistant, deep_red.test_voice_detects_out_of_character,
    deep_red.test_temporal_flags_anachronisms_not_period_answers, deep_red.test_labelled_answers_are_coherent,
], ids=lambda check: check.__name__[len("test_"):])
def test_butler_detectors_separate_as_deep_reds_do(labelled, deep_reds_check):
    """The per-label rates Deep Red's labelled set must reach, on the butler's."""
    deep_reds_check(labelled)
    temporal = [e for e in labelled["anachronistic"] if e["category"] == "temporal"]
    assert len(temporal) >= 10


def test_the_cutoff_comes_from_the_persona(butler):
    """Whether a year is later knowledge depends on the persona's cutoff: 1925 is for the butler, not for Deep Red."""
    answer = "In 1925 the family bought a wireless set."
    assert E.anachronisms(answer, "What happened?", butler) == ["1925"]
    assert E.anachronisms(answer, "What happened?") == []  # Deep Red knows 1925
    assert E.temporal_check("That lies beyond my knowledge, sir.", "What happened in 1905?", None, None,
                            butler)["kind"] == "post_1899"


@pytest.mark.parametrize("name", ["butler", "stoic"])
def test_the_style_fields_come_from_the_persona(name):
    """A persona's own answers are its style far more often than they are Deep Red's."""
    persona = E.load_persona(f"{name}.yaml")
    answers = [row for row in rows_of(DATA / f"labelled_responses_{name}.jsonl") if row["label"] == "in_persona"]
    as_itself = rate(E.score_responses(answers, persona=persona), lambda e: e["in_style"])
    as_deep_red = rate(E.score_responses(answers), lambda e: e["in_style"])
    assert as_itself - as_deep_red >= 0.3


def test_evaluate_with_a_persona_writes_a_report_titled_for_it(tmp_path):
    rows = [{k: r[k] for k in ("id", "category", "prompt", "response")} for r in rows_of(BUTLER_LABELLED)
            if r["label"] in ("in_persona", "period_correct")]
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "report"
    assert main(["evaluate", "--persona", "butler.yaml", "--responses", str(answers), "--output_dir", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["meta"]["persona"]["title"] == "Hargreaves" and report["meta"]["persona"]["cutoff"] == 1899
    assert report["temporal_compliance"]["count"] == 16 and report["temporal_compliance"]["value"] == 1.0
    assert set(report["temporal_compliance"]["per_kind"]) == {"post_1899", "control"}
    markdown = (out / "report.md").read_text()
    assert markdown.startswith("# Hargreaves evaluation\n") and "knowledge up to 1899" in markdown
    html = (out / "report.html").read_text()
    assert "<title>Hargreaves evaluation</title>" in html and "<h1>Hargreaves evaluation</h1>" in html
    # Deep Red is named only as the other persona an answer sits nearer (the contrast), never as this one
    assert "Deep Red" not in html.replace("nearer Deep Red", "")


# --------------------------------------------------------------------------------------------- malformed files


def persona_copy(tmp_path: Path, edit) -> Path:
    """butler.yaml (with its prompts beside it) in tmp_path, its text passed through `edit`."""
    shutil.copy(PERSONAS / "butler_prompts.jsonl", tmp_path / "butler_prompts.jsonl")
    path = tmp_path / "persona.yaml"
    path.write_text(edit((PERSONAS / "butler.yaml").read_text()))
    return path


def line_of(path: Path, text: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if text in line)


MALFORMED = {
    # name: (edit, the line the error must name (text on it), words the message must hold)
    "missing field": (lambda t: t.replace("title: Hargreaves\n", ""), "name: butler", "missing 'title'"),
    "wrong type": (lambda t: t.replace("categories: [household", "categories: {a: 1}\n#"), "categories:",
                   "categories: expected a list"),
    "bad regex": (lambda t: t.replace("- 'pantry'", "- 'pantry('"), "pantry(",
                  "style.fields.household[3]: bad regular expression"),
    "cutoff not a year": (lambda t: t.replace("cutoff: 1899", "cutoff: soon"), "cutoff: soon",
                          "knowledge.cutoff: expected a year"),
    "cutoff a fraction": (lambda t: t.replace("cutoff: 1899", "cutoff: 1899.5"), "cutoff: 1899.5",
                          "knowledge.cutoff: expected a year"),
    "unknown key": (lambda t: t.replace("temporal_category:", "temporal_categry:"), "temporal_categry",
                    "temporal_categry: unknown key"),
    "no evaluation prompt": (lambda t: t.replace("  evaluation: You are Hargreaves", "  eval: You are Hargreaves"),
                             "system_prompts:", "missing 'evaluation'"),
    "prompts not found": (lambda t: t.replace("prompts: butler_prompts.jsonl", "prompts: nowhere.jsonl"),
                          "prompts: nowhere", "evaluation prompts not found"),
    "not YAML": (lambda t: t.replace("title: Hargreaves", "title: [Hargreaves"), "description:", "not valid YAML"),
    "merge key": (lambda t: t.replace("system_prompts:\n", "system_prompts:\n  <<: {extra: You serve.}\n"), "<<:",
                  "not valid YAML"),  # the safe loader builds no `<<` merge (a review found a traceback)
    "target above 1": (lambda t: t + "targets:\n  temporal: 95\n", "temporal: 95",
                       "targets.temporal: expected a share between 0 and 1 such as 0.9, got int 95"),
    "target below 0": (lambda t: t + "targets:\n  coherence: -0.1\n", "coherence: -0.1",
                       "targets.coherence: expected a share between 0 and 1 such as 0.9, got float -0.1"),
    "two anchors": (lambda t: re.sub(r"(  persona_anchors:\n(?:    - .*\n){2})(?:    - .*\n)+", r"\1", t),
                    "persona_anchors:", "style.persona_anchors: expected a list of at least 3 text item(s)"),
    "empty style field": (lambda t: re.sub(r"    household:\n(?:      - .*\n)+", "    household: []\n", t),
                          "household: []", "style.fields.household: expected a list of at least 1 text item(s), "
                                           "got list []"),
    "no style fields": (lambda t: re.sub(r"  fields:\n(?:    .*\n)+", "  fields: {}\n", t), "fields: {}",
                        "style.fields: no style fields; add at least one field with its word stems"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_persona_is_one_line_naming_file_and_line(tmp_path, capsys, case):
    edit, line_text, message = MALFORMED[case]
    path = persona_copy(tmp_path, edit)
    answers = tmp_path / "a.jsonl"
    answers.write_text(json.dumps({"id": "a", "prompt": "p", "response": "Very good, sir."}) + "\n")
    assert main(["evaluate", "--persona", str(path), "--responses", str(answers),
                 "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"{path}:{line_of(path, line_text)}: " in err and message in err, err


def test_a_persona_file_that_is_not_utf8_is_one_line(tmp_path, capsys):
    """Saved in Latin-1 (an editor's default on some systems): one line, not a UnicodeDecodeError traceback."""
    path = tmp_path / "persona.yaml"
    text = (PERSONAS / "butler.yaml").read_text().replace("title: Hargreaves", "title: Hargreaves the Café")
    path.write_bytes(text.encode("latin-1"))
    assert main(["validate", str(DATA / "mini.jsonl"), "--persona", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: not valid UTF-8 (byte ") and err.endswith("save the file as UTF-8\n")


def test_a_persona_file_that_is_not_there_is_one_line(tmp_path, capsys):
    assert main(["validate", str(DATA / "mini.jsonl"), "--persona", str(tmp_path / "none.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "persona file not found" in err


# --------------------------------------------------------------------------------------------- validate, run


def test_validate_reports_coverage_of_the_personas_system_prompts_and_categories(tmp_path, capsys, butler):
    assert main(["validate", str(DATA / "mini.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "persona Deep Red" in out and "examples per system prompt: evaluation 0, primary " in out
    assert "examples per category: not known" in out

    rows = [{"category": "household", "messages": [{"role": "system", "content": butler.system_prompts["primary"]},
                                                   {"role": "user", "content": "How should the silver be cared for"},
                                                   {"role": "assistant", "content": "With rouge, sir."}]},
            {"category": "etiquette", "messages": [{"role": "user", "content": "Hello?"},
                                                   {"role": "assistant", "content": "Good evening, sir."}]},
            {"category": "chess", "messages": [{"role": "system", "content": "You are someone else."},
                                               {"role": "user", "content": "Play?"},
                                               {"role": "assistant", "content": "Certainly, sir."}]}]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["validate", str(data), "--persona", "butler.yaml"]) == 0
    out = capsys.readouterr().out
    assert ("examples per system prompt: evaluation 0, primary 1, no system prompt 1, another system prompt 1"
            in out)
    assert "household 1, etiquette 1, service 0" in out and "chess (not a category of the persona) 1" in out
    assert "evaluation prompts asked in the dataset: 1 of 48 (household-01)" in out  # "?" left off: the same question


def test_run_and_demo_take_a_persona_and_refuse_a_bad_one_before_training(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("persona: butler.yaml\nevaluate: true\n")
    assert resolve_with_yaml(RunConfig, str(config), None).persona == "butler.yaml"

    bad = persona_copy(tmp_path, lambda t: t.replace("cutoff: 1899", "cutoff: '1899'"))
    out = tmp_path / "run"
    assert main(["run", "--persona", str(bad), "--base_model", "tiny", "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "knowledge.cutoff: expected a year" in err and err.count("\n") == 1
    assert not (out / "manifest.json").exists(), "no stage may start with a bad persona file"

    demo = tmp_path / "demo"
    assert main(["demo", "--persona", str(bad), "--output_dir", str(demo)]) == 2
    assert "knowledge.cutoff: expected a year" in capsys.readouterr().err
    assert not (demo / "manifest.json").exists()


# --------------------------------------------------------------------------------------------- the package


def test_no_persona_words_in_the_evaluation_code():
    for path in PACKAGE.glob("*.py"):
        text = path.read_text().lower()
        for word in ("comrade", "1969", "chess"):
            assert word not in text, f"{path.name} mentions {word!r}: it belongs in the persona file"


def test_a_dated_topic_written_in_quotes_is_one_line_not_a_topic_named_with_its_year(tmp_path, capsys):
    """`- 'electronic mail: 1971'` is YAML text, not {electronic mail: 1971}: before, deepred run asked "What can you
    tell me about electronic mail: 1971?" and answered without a dating sentence, with no word said."""
    path = deep_red_copy(tmp_path, lambda text: text.replace("- electronic mail: 1971", "- 'electronic mail: 1971'"))
    assert main(["validate", str(DATASET), "--persona", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {path}:{line_of(path, 'electronic mail: 1971')}: knowledge.horizon.topics[2]: "
                   "'electronic mail: 1971' is text because of its quotes, not a topic and its year; write it "
                   "without quotes: electronic mail: 1971\n")


def test_a_dated_topic_without_a_space_after_its_colon_says_to_add_one(tmp_path, capsys):
    """`- television:1936` is YAML text even without quotes: the advice is the space, not the quotes (a review)."""
    path = deep_red_copy(tmp_path, lambda text: text.replace("- electronic mail: 1971", "- electronic mail:1971"))
    assert main(["validate", str(DATASET), "--persona", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"error: {path}:{line_of(path, 'electronic mail:1971')}: knowledge.horizon.topics[2]: 'electronic mail:1971' "
        "is text, not a topic and its year: YAML needs a space after the colon; write it as: electronic mail: 1971\n")


def test_question_templates_may_use_the_cutoff_and_are_checked_like_replies(tmp_path, capsys):
    """A question template with {cutoff} (replies may use it) passed validate and then made deepred run's horizon rows
    fail with KeyError: 'cutoff'; one with an unknown field is now refused with its line (found by a review)."""
    from deepred.horizon import horizon_questions
    from deepred.persona import load_persona

    path = deep_red_copy(tmp_path, lambda text: text.replace("- Please explain {topic} to me.",
                                                             "- Please explain {topic} to me, as of {cutoff}."))
    asked = [question for question, _, _ in horizon_questions(load_persona(str(path)))]
    assert "Please explain Wikipedia to me, as of 1969." in asked

    path = deep_red_copy(tmp_path, lambda text: text.replace("- Tell me about {topic}.",
                                                             "- Tell me about {topic} in {country}."),
                         "unknown-field.yaml")
    assert main(["validate", str(DATASET), "--persona", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}:{line_of(path, '{country}')}: knowledge.horizon.questions[6]: a template "
                          "may use {topic} and {cutoff} only (KeyError('country'))") and err.count("\n") == 1
