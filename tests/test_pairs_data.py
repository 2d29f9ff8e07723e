"""Preference pairs: every malformed kind is reported with its line number, every problem of every line, valid
pairs pass and become the two conversations training compares."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from deepred.errors import DatasetNotFoundError, DeepRedError, InvalidDatasetError
from deepred.pairs_data import (load_pairs_for_training, pairs_to_conversations, summarize_pairs,
                                validate_pairs_file)

SYSTEM = {"role": "system", "content": "You are Deep Red."}
USER = {"role": "user", "content": "What is our purpose?"}
CHOSEN = [{"role": "assistant", "content": "To advance the collective, comrade."}]
REJECTED = [{"role": "assistant", "content": "Whatever makes you happy!"}]
GOOD = {"prompt": [SYSTEM, USER], "chosen": CHOSEN, "rejected": REJECTED, "source": "voice"}


def pair(**changes) -> str:
    """GOOD with keys replaced (a value of ... removes the key), as one JSON line."""
    obj = {**GOOD, **changes}
    return json.dumps({k: v for k, v in obj.items() if v is not ...})


def assistant(text) -> list[dict]:
    return [{"role": "assistant", "content": text}]


BAD_LINES = {
    "bad json": ('{"prompt": [', "not valid JSON (Expecting value at column 13)"),
    "not an object": ("[1, 2]", 'expected an object like {"prompt": [...], "chosen": [...], "rejected": [...]}'),
    "missing prompt": (pair(prompt=...), 'missing "prompt"; a pair needs "prompt", "chosen" and "rejected"'),
    "missing chosen": (pair(chosen=...), 'missing "chosen"'),
    "missing rejected": (pair(rejected=...), 'missing "rejected"'),
    "unknown key": (pair(messages=[]), "unknown key(s) 'messages'; allowed keys are 'prompt', 'chosen', 'rejected', "
                                       "'source'"),
    "prompt not a list": (pair(prompt="What is our purpose?"), '"prompt" must be a list of {"role", "content"} '
                                                               "messages ending on a user turn, got str"),
    "prompt empty": (pair(prompt=[]), '"prompt" is empty'),
    "prompt message not an object": (pair(prompt=[SYSTEM, "hi", USER]), "prompt message 2 is not an object"),
    "prompt bad role": (pair(prompt=[{"role": "narrator", "content": "x"}, USER]),
                        "prompt message 1 has role 'narrator'; expected one of system, user, assistant"),
    "prompt system not first": (pair(prompt=[USER, SYSTEM, USER]),
                                "prompt message 2 is a system message; a system message may only come first"),
    "prompt empty content": (pair(prompt=[SYSTEM, {"role": "user", "content": "  "}]),
                             "prompt message 2 content is empty"),
    "prompt non-string content": (pair(prompt=[{"role": "user", "content": 5}]),
                                  "prompt message 1 content must be a string, got int"),
    "prompt no content": (pair(prompt=[{"role": "user"}]), 'prompt message 1 has no "content"'),
    "prompt ends on assistant": (pair(prompt=[USER, CHOSEN[0]]),
                                 "\"prompt\" ends on a 'assistant' turn; the last prompt message must be the user's"),
    "prompt no user": (pair(prompt=[SYSTEM]), '"prompt" has no user turn; add the user message'),
    "chosen bare string": (pair(chosen="To advance the collective."),
                           '"chosen" is a bare string; wrap it as [{"role": "assistant", "content": ...}]'),
    "rejected bare string": (pair(rejected="Whatever."), '"rejected" is a bare string; wrap it as [{"role": '),
    "chosen an object": (pair(chosen=CHOSEN[0]), '"chosen" is a single object; wrap it in a list'),
    "chosen not a list": (pair(chosen=3), '"chosen" must be a list of one assistant message'),
    "chosen two messages": (pair(chosen=CHOSEN + CHOSEN), '"chosen" has 2 messages; it must hold exactly one'),
    "rejected empty list": (pair(rejected=[]), '"rejected" has 0 messages; it must hold exactly one'),
    "chosen user role": (pair(chosen=[{"role": "user", "content": "x"}]),
                         '"chosen" message has role \'user\'; it must be "assistant"'),
    "rejected message not an object": (pair(rejected=["Whatever."]), '"rejected" message is not an object'),
    "chosen empty content": (pair(chosen=assistant("   ")), '"chosen" message content is empty'),
    "rejected non-string content": (pair(rejected=assistant(["no"])),
                                    '"rejected" message content must be a string, got list'),
    "chosen equals rejected": (pair(rejected=assistant("  To advance the collective, comrade.\n")),
                               "chosen and rejected are the same answer; a pair must prefer one answer to another"),
    "source not a string": (pair(source=3), '"source" must be a string naming how the pair was made'),
    "source null": (pair(source=None), '"source" must be a string naming how the pair was made (e.g. "voice", '
                                       '"horizon", "hand"), got NoneType'),
    "source empty": (pair(source=" "), '"source" is empty'),
}


def write(path, *lines: str) -> str:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_each_malformed_kind_is_reported_with_its_line(tmp_path, kind):
    text, expected = BAD_LINES[kind]
    path = write(tmp_path / "pairs.jsonl", pair(), "", text, pair())

    report = validate_pairs_file(path)
    assert [p for p in report.problems if p.startswith(f"{path}:3: ")], report.problems  # blank line 2 counts
    assert any(expected in p for p in report.problems), report.problems
    assert all(p.startswith(f"{path}:3: ") for p in report.problems), report.problems
    assert report.invalid_lines == 1 and [p["line"] for p in report.pairs] == [1, 4]


def test_non_utf8_and_empty_file(tmp_path):
    latin = tmp_path / "latin.jsonl"
    bad = pair(source="caf\xe9").replace("\\u00e9", "\xe9").encode("latin-1")  # as a Latin-1 editor saves it
    latin.write_bytes(pair().encode() + b"\n" + bad + b"\n")
    byte = bad.index(b"\xe9")
    assert validate_pairs_file(latin).problems == [f"{latin}:2: not valid UTF-8 (byte {byte}); re-save the file as "
                                                   "UTF-8"]

    for name, content in (("empty.jsonl", b""), ("blank.jsonl", b"\n \n"), ("bom-only.jsonl", b"\xef\xbb\xbf\n")):
        empty = tmp_path / name
        empty.write_bytes(content)
        report = validate_pairs_file(empty)
        assert report.problems == [f"{empty}:1: file is empty (no pairs); expected one {{\"prompt\": [...], "
                                   f"\"chosen\": [...], \"rejected\": [...]}} object per line"]


def test_every_problem_of_every_line_is_reported(tmp_path):
    path = write(tmp_path / "pairs.jsonl",
                 '{"prompt": [',                                                            # 1
                 pair(),                                                                    # 2
                 pair(chosen="bare", rejected=..., extra=1),                                # 3: three problems
                 pair(prompt=[{"role": "narrator", "content": ""}, SYSTEM], source=""),     # 4: five problems
                 pair(source="hand"))                                                       # 5
    report = validate_pairs_file(path)
    by_line = {}
    for problem in report.problems:
        by_line.setdefault(int(problem[len(path) + 1:].split(":", 1)[0]), []).append(problem)
    assert sorted(by_line) == [1, 3, 4]
    assert len(by_line[3]) == 3 and any("bare string" in p for p in by_line[3])
    assert any('missing "rejected"' in p for p in by_line[3]) and any("'extra'" in p for p in by_line[3])
    assert len(by_line[4]) == 5, by_line[4]
    assert any("role 'narrator'" in p for p in by_line[4]) and any("content is empty" in p for p in by_line[4])
    assert any("system message may only come first" in p for p in by_line[4])
    assert any("no user turn" in p for p in by_line[4]) and any('"source" is empty' in p for p in by_line[4])
    assert report.invalid_lines == 3 and [p["line"] for p in report.pairs] == [2, 5]


def test_a_utf8_bom_is_accepted_and_sources_are_counted(tmp_path):
    path = tmp_path / "pairs.jsonl"
    lines = [pair(), pair(source="hand"), pair(source=...), pair(), pair(source="horizon"), pair(source=...),
             pair(source="voice")]
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")  # Windows editors: BOM and CRLF
    report = validate_pairs_file(path)
    assert report.ok, report.problems
    assert report.pairs[0]["line"] == 1 and report.pairs[0]["source"] == "voice"
    assert report.sources == {"voice": 3, "(no source)": 2, "hand": 1, "horizon": 1}
    assert "source" not in report.pairs[2]

    summary = summarize_pairs(report)
    assert summary.splitlines() == [
        f"{path}: 7 valid pair(s), 0 invalid line(s)",
        "  pairs by source: voice 3, (no source) 2, hand 1, horizon 1",
        f"  mean characters per answer: chosen {len(CHOSEN[0]['content'])}, rejected {len(REJECTED[0]['content'])}"]


def test_training_refuses_invalid_pairs_unless_skip_invalid(tmp_path):
    path = write(tmp_path / "pairs.jsonl", pair(), pair(chosen="bare"), pair(source="hand"), "[]")
    said = []
    with pytest.raises(InvalidDatasetError) as err:
        load_pairs_for_training(path, skip_invalid=False, log=said.append)
    assert "2 invalid line(s), 2 problem(s); fix the lines above or pass --skip_invalid" in str(err.value)
    assert [p.split(": ", 1)[0] for p in err.value.problems] == [f"{path}:2", f"{path}:4"]
    assert f"{path}:2: \"chosen\" is a bare string; wrap it as" in "\n".join(said)

    said.clear()
    report, sha = load_pairs_for_training(path, skip_invalid=True, log=said.append)
    assert [p["line"] for p in report.pairs] == [1, 3] and len(sha) == 64
    assert said[-1] == "--skip_invalid: dropped 2 invalid line(s), training on 2 valid pair(s)"

    nothing_valid = write(tmp_path / "bad.jsonl", "[]", pair(chosen=[]))
    with pytest.raises(InvalidDatasetError, match="there are no valid pairs to train on"):
        load_pairs_for_training(nothing_valid, skip_invalid=True, log=lambda *_: None)

    good = write(tmp_path / "good.jsonl", pair(), pair(source="hand"))
    report, sha = load_pairs_for_training(good, skip_invalid=False, log=lambda *_: None)
    assert report.ok and len(report.pairs) == 2 and sha == load_pairs_for_training(good, False, lambda *_: None)[1]


def refused_promptly(path) -> DeepRedError:
    """validate_pairs_file(path) must raise within seconds (a FIFO opened for reading would block forever)."""
    outcome = []

    def attempt():
        try:
            validate_pairs_file(path)
            outcome.append(None)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            outcome.append(exc)

    worker = threading.Thread(target=attempt, daemon=True)
    start = time.monotonic()
    worker.start()
    worker.join(timeout=10)
    if worker.is_alive():  # unblock the reader so the thread can end, then fail
        with open(path, "wb"):
            pass
        pytest.fail(f"reading {path} blocked")
    assert time.monotonic() - start < 5
    [exc] = outcome
    assert isinstance(exc, DeepRedError), exc
    assert "\n" not in str(exc)
    return exc


def test_a_fifo_a_directory_or_nothing_is_refused_in_one_line_without_hanging(tmp_path):
    fifo = tmp_path / "pairs.fifo"
    os.mkfifo(fifo)
    exc = refused_promptly(fifo)
    assert str(exc) == (f"{fifo} is not a regular file (it is a FIFO (named pipe)); pass a .jsonl file of "
                        "preference pairs")

    folder = tmp_path / "pairs"
    folder.mkdir()
    assert "is not a regular file (it is a directory)" in str(refused_promptly(folder))

    missing = tmp_path / "missing.jsonl"
    exc = refused_promptly(missing)
    assert isinstance(exc, DatasetNotFoundError) and "is not a regular file (nothing is there)" in str(exc)

    with pytest.raises(DeepRedError, match="is not a regular file .it is a FIFO"):
        load_pairs_for_training(fifo, skip_invalid=True, log=lambda *_: None)


def test_pairs_become_the_two_conversations_training_compares(tmp_path):
    path = write(tmp_path / "pairs.jsonl", pair(), pair(prompt=[USER], source=...))
    first, second = validate_pairs_file(path).pairs

    chosen, rejected = pairs_to_conversations(first)
    assert chosen == [SYSTEM, USER, *CHOSEN] and rejected == [SYSTEM, USER, *REJECTED]
    chosen[0]["content"] = "changed"  # fresh messages: neither the other conversation nor the pair changes
    assert rejected[0]["content"] == "You are Deep Red." and first["prompt"][0]["content"] == "You are Deep Red."

    assert pairs_to_conversations(second) == ([USER, *CHOSEN], [USER, *REJECTED])
