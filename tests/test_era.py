"""Years in any era (era.py): the cutoff's accepted forms and their refusals, the later-years rule as each era writes
years (both sides of every choice of which numbers are years), the cutoff as prose writes it, and a BC persona."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from deepred import evaluate as E
from deepred.cli import main
from deepred.era import (CUTOFF_FORMS, century_of, later_year_pattern, number_range, parse_cutoff, year_key,
                         year_label, years_after)

from .test_persona import PERSONAS, line_of


def later(cutoff: int, text: str) -> list[str]:
    return [m.group(0) for m in later_year_pattern(cutoff).finditer(text)]


# --------------------------------------------------------------------------------------------- the cutoff


@pytest.mark.parametrize("value, year", [
    (180, 180), (1, 1), (1969, 1969), (2300, 2300), (9999, 9999), (-44, -44),
    ("44 BC", -44), ("44 BCE", -44), ("44 B.C.", -44), ("44bc", -44), ("AD 180", 180), ("180 AD", 180),
    ("180 CE", 180), ("A.D. 180", 180),
])
def test_a_cutoff_may_be_any_year(value, year):
    assert parse_cutoff(value) == year


@pytest.mark.parametrize("value", ["soon", 0, True, False, "44 BX", "1899", 1899.5, 10000, -10000, None, "", [180]])
def test_a_cutoff_that_is_not_a_year_names_the_accepted_forms(value):
    with pytest.raises(ValueError, match=r"^expected a year: an AD year") as caught:
        parse_cutoff(value)
    assert CUTOFF_FORMS in str(caught.value) and "\n" not in str(caught.value)


def test_year_zero_and_a_quoted_number_say_why():
    with pytest.raises(ValueError, match="there is no year 0"):
        parse_cutoff(0)
    with pytest.raises(ValueError, match="without quotes"):
        parse_cutoff("1899")


@pytest.mark.parametrize("edit, shown", [
    ("cutoff: soon", "got str 'soon'"), ("cutoff: 0", "got int 0"), ("cutoff: true", "got bool True"),
    ("cutoff: 44 BX", "got str '44 BX'"),
])
def test_a_bad_cutoff_in_a_persona_file_is_one_line_with_file_line_and_the_forms(tmp_path, capsys, edit, shown):
    path = stoic_copy(tmp_path, lambda t: t.replace("cutoff: 180 ", edit + " "))
    answers = tmp_path / "a.jsonl"
    answers.write_text(json.dumps({"id": "a", "prompt": "p", "response": "Virtue, my friend."}) + "\n")
    assert main(["evaluate", "--persona", str(path), "--responses", str(answers),
                 "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"{path}:{line_of(path, edit)}: knowledge.cutoff: expected a year: " in err, err
    assert CUTOFF_FORMS in err and shown in err, err


def test_labels_and_kinds_read_right_in_every_era():
    assert [year_label(y) for y in (1969, 1000, 180, 1, -44)] == ["1969", "1000", "AD 180", "AD 1", "44 BC"]
    assert [century_of(y) for y in (180, 200, 201, 1900, 1901, -44, -101)] == [2, 2, 3, 19, 20, -1, -2]


# --------------------------------------------------------------------------------------------- which numbers are years


@pytest.mark.parametrize("text, found", [
    # marked years, any number of digits
    ("In AD 306 Constantine was proclaimed.", ["AD 306"]), ("A.D. 410 saw it.", ["A.D. 410"]),
    ("by 410 AD the city", ["410 AD"]), ("about 476 CE", ["476 CE"]), ("AD 100 was quiet.", []),
    ("in 410 BC", []), ("the Athenians in 431 BC", []),
    # "the year N" and "in N" where a clause follows, not a counted noun
    ("the year 306", ["306"]), ("the year 150", []), ("in 410, Rome fell", ["410"]),
    ("In 410 Alaric sacked Rome.", ["410"]), ("in 476 the last emperor", ["476"]),
    ("300 soldiers marched", []), ("in 300 ships", []), ("in 40 days", []), ("an ad 300 seconds long", []),
    ("1,200 horse", []), ("the 300s", ["300s"]),
    # bare four-digit numbers are years in any era; smaller bare numbers are counts
    ("in 1453", ["1453"]), ("in 150 the emperor", []),
    # centuries after the cutoff's own (the 2nd), as ordinals, in words or digits; a century BC is earlier
    ("the fifth century", ["fifth century"]), ("the 5th century", ["5th century"]),
    ("a 5th-century church", ["5th-century"]), ("the twenty-first century", ["twenty-first century"]),
    ("the third century AD", ["third century AD"]), ("the second century", []), ("the fifth century BC", []),
    # "century" the unit: eighty men of a legion
    ("the fourth century of the third cohort", []), ("the fifth century of the legion", []),
    ("a centurion and his century", []),
])
def test_which_numbers_are_later_years_for_a_cutoff_of_180(text, found):
    assert later(180, text) == found


def test_a_bc_cutoff_reads_both_readings_of_an_unmarked_number():
    """44 BC: 30 BC and AD 14 are later; 50 BC is not; an unmarked 30 is later read either way, 60 is not."""
    assert later(-44, "in 30 BC") == ["30 BC"] and later(-44, "in 50 BC") == []
    assert later(-44, "AD 14") == ["AD 14"] and later(-44, "the first century") == ["first century"]
    assert later(-44, "in 30, Octavian") == ["30"] and later(-44, "in 60, Nero") == []
    assert later(-44, "the 1st century BC") == [] and later(-250, "the 2nd century BC") == ["2nd century BC"]


def test_a_far_future_cutoff_has_later_years_after_it():
    """2300: the bare window runs a century on (2301-2400); marked and "the year" forms have no such end."""
    assert later(2300, "in 2350, the fleet") == ["2350"] and later(2300, "in 2150, the fleet") == []
    assert later(2300, "the year 2500") == ["2500"] and later(2300, "the 24th century") == ["24th century"]
    assert later(2300, "the 23rd century") == []


def test_the_bare_years_of_the_first_two_personas_are_unchanged():
    """Deep Red and the butler: bare years after the cutoff up to 2099, as before any era was allowed."""
    for cutoff in (1969, 1899):
        pattern = re.compile(rf"\b(?:{years_after(cutoff)})\b")
        assert {y for y in range(1000, 10000) if pattern.fullmatch(str(y))} == set(range(cutoff + 1, 2100))


def test_number_range_is_exact():
    for lo, hi in [(1, 9999), (181, 2099), (2301, 2400), (7, 43), (100, 100), (95, 1005)]:
        pattern = re.compile(rf"(?:{number_range(lo, hi)})")
        assert {n for n in range(0, 10001) if pattern.fullmatch(str(n))} == set(range(lo, hi + 1)), (lo, hi)


def test_one_key_per_year_however_written():
    assert {year_key(t) for t in ("AD 410", "410 AD", "A.D. 410", "410 CE", "410")} == {"410"}
    assert year_key("30 BC") == year_key("30 B.C.") == "-30"
    assert year_key("fifth century") == year_key("5th-century") == "century 5"
    assert year_key("twenty-first century") == year_key("21st century") == "century 21"
    assert year_key("1970s") == "1970"


# --------------------------------------------------------------------------------------------- personas in any era


@pytest.fixture(scope="module")
def stoic() -> E.Persona:
    return E.load_persona("stoic.yaml")


def test_a_cutoff_of_180_flags_ad_306_and_the_fifth_century_and_passes_ad_100(stoic):
    later_question = "What happened after the emperor died?"
    assert E.anachronisms("In AD 306 the legions proclaimed a new emperor at Eboracum.", later_question, stoic) == [
        "ad 306"]
    assert E.anachronisms("The fifth century brought the end of the West.", later_question, stoic) == [
        "fifth century"]
    assert E.temporal_check("The fifth century brought the end of the West.", later_question, "post_180", None,
                            stoic)["violation"]
    period = "In AD 100 Trajan was emperor, and Pliny praised him before the Senate."
    assert E.anachronisms(period, "Who ruled in AD 100?", stoic) == []
    assert not E.temporal_check(period, "Who ruled in AD 100?", "control", ["trajan"], stoic)["violation"]
    # a count is not a year, and the unit "century" is not a time
    assert E.anachronisms("Three hundred men, 300 soldiers in all, and the fourth century of the third cohort "
                          "held the ford.", "", stoic) == []
    # "A.D." does not end a sentence: the year after it is still marked
    assert E.anachronisms("The city fell in A.D. 410. Nobody expected it.", "", stoic) == ["a.d. 410"]
    assert E.infer_temporal_kind("What happened in AD 410?", stoic) == "post_180"
    assert E.infer_temporal_kind("What happened in AD 150?", stoic) == "unknown"


def test_an_echoed_year_is_one_year_however_the_prompt_wrote_it(stoic):
    """The prompt says AD 410, the answer 410 AD inside a question: an echo, not knowledge."""
    assert E.anachronisms("410 AD, my friend? That year is hidden from me.", "What happened in AD 410?", stoic) == []
    assert E.anachronisms("In 410 AD the Goths took the city.", "What happened in AD 410?", stoic) == [
        "410 ad (narrated as past)"]


def test_the_reasons_name_the_cutoff_as_its_era_writes_it(stoic):
    reason = E.temporal_check("Constantine ruled.", "Who was Constantine?", "post_180", None, stoic)["reason"]
    assert reason == "knowledge after AD 180: constantine"
    assert "post-1000" not in reason and "post-180" not in reason


def stoic_copy(tmp_path: Path, edit, kind: str = "post_180") -> Path:
    """stoic.yaml (with its prompts, temporal kinds renamed to `kind`) in tmp_path, its text passed through `edit`."""
    prompts = (PERSONAS / "stoic_prompts.jsonl").read_text().replace('"post_180"', json.dumps(kind))
    (tmp_path / "stoic_prompts.jsonl").write_text(prompts)
    path = tmp_path / "persona.yaml"
    path.write_text(edit((PERSONAS / "stoic.yaml").read_text()))
    return path


@pytest.mark.parametrize("written", ["-44", "44 BC", "44 BCE", "'44 B.C.'"])
def test_a_bc_persona_loads_and_reads_as_bc(tmp_path, written):
    path = stoic_copy(tmp_path, lambda t: t.replace("cutoff: 180 ", f"cutoff: {written} "), kind="post_44bc")
    persona = E.load_persona(path)
    assert (persona.cutoff, persona.cutoff_label, persona.later_kind) == (-44, "44 BC", "post_44bc")
    assert E.anachronisms("In 27 BC Octavian took the name Augustus.", "", persona) == ["27 bc"]
    assert E.anachronisms("In 63 BC Cicero was consul.", "", persona) == []
    verdict = E.temporal_check("In 27 BC Octavian took the name Augustus.", "", "post_44bc", None, persona)
    assert verdict["reason"] == "knowledge after 44 BC: 27 bc"


def test_a_far_future_persona_loads(tmp_path):
    """A cutoff after the old LAST_YEAR (2099) was refused; now its later years are the ones after it."""
    path = stoic_copy(tmp_path, lambda t: t.replace("cutoff: 180 ", "cutoff: 2300 ").replace(
        "years: [212, 235, 284, 395, 476, 800, 1066, 1453]", "years: [2310]"), kind="post_2300")
    persona = E.load_persona(path)
    assert (persona.cutoff_label, persona.later_kind) == ("2300", "post_2300")
    assert E.anachronisms("In 2350, the fleet reached Titan.", "", persona) == ["2350"]
    assert E.anachronisms("In 2150, the fleet reached Titan.", "", persona) == []


def test_a_report_for_a_cutoff_of_180_says_ad_180(tmp_path):
    rows = [json.loads(line) for line in (Path(__file__).parent / "data" / "labelled_responses_stoic.jsonl")
            .read_text().splitlines() if '"period_correct"' in line or '"anachronistic-01"' in line]
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({k: r[k] for k in ("id", "category", "prompt", "response")}) + "\n"
                               for r in rows))
    out = tmp_path / "report"
    assert main(["evaluate", "--persona", "stoic.yaml", "--responses", str(answers), "--output_dir", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["meta"]["persona"]["cutoff"] == 180 and report["meta"]["persona"]["cutoff_label"] == "AD 180"
    markdown = (out / "report.md").read_text()
    assert "knowledge up to AD 180" in markdown
    flagged = next(e for e in report["responses"] if e["id"] == "anachronistic-01")
    assert flagged["temporal_reason"].startswith("knowledge after AD 180: ")
    everything = markdown + (out / "report.html").read_text()
    assert "post-1000" not in everything and "post-180 " not in everything
    assert "no knowledge after AD 180" in (out / "report.html").read_text()
