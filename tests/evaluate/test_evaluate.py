"""`deepred evaluate`: detector separation on the held-out labelled answers, the report files, failed requests
against a real local HTTP server, the judge, and --compare."""

from __future__ import annotations

import json
import os
import random
import socket
import threading
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from deepred import evaluate as E
from deepred.cli import main
from deepred.errors import DeepRedError

from ..conftest import DATA

LABELLED = DATA / "labelled_responses.jsonl"
REPORT_KEYS = {"style_consistency", "character_voice", "temporal_compliance", "coherence", "responses"}
ENTRY_KEYS = {"id", "category", "prompt", "response", "in_style", "out_of_character", "temporal_violation",
              "coherent", "style_score", "embedding_margin", "voice_violations", "anachronisms",
              "repeated_ngram_ratio", "non_word_ratio"}
PERSONA_ANSWER = ("Comrade, every dome we raise on Mars is a move in the great game of the collective. I have "
                  "calculated the variations: when the brigades work as one, the colony advances like pawns "
                  "protected by their neighbours, and no piece is left behind.")
# Real output of the random tiny Qwen2 (`deepred make-tiny-model`) for two evaluation prompts.
TINY_MODEL_OUTPUT = [
    "Kag displayName}'. Presidency\U0001f938icipants\u4e59\u70efremely_PARAMS/g\u600e\u4e48\u30eb\u516c\u5171"
    "\u4ea4\u901a\u9047headed\u5b89\u5e86 pagesinite\u6813ensure MIT FM powerscf bellaolynom",
    "sharing\u81ea\u4e3b\u7814\u53d1 wikbery printers-QGLOBALS Vin\u1ee1hero\u5c24\u4e3aOrUpdate!\")anges\u76d8"
    "\u70b9\tuseIntegral Rutarten\u062d\u0636\u0627\u0631\u664f\u914d\u4e0a_CODEC speculative theoret",
]


def rate(entries: list[dict], flag) -> float:
    return sum(bool(flag(e)) for e in entries) / len(entries)


@pytest.fixture(scope="module")
def labelled() -> dict[str, list[dict]]:
    """Scored labelled answers grouped by their human label."""
    labels = {json.loads(line)["id"]: json.loads(line)["label"] for line in LABELLED.read_text().splitlines()}
    groups = defaultdict(list)
    for entry in E.score_responses(E.load_responses(LABELLED)):
        groups[labels[entry["id"]]].append(entry)
    return groups


# --------------------------------------------------------------------------------------------- detectors


def test_style_separates_persona_from_generic_assistant(labelled):
    assert rate(labelled["in_persona"], lambda e: e["in_style"]) >= 0.85
    assert rate(labelled["generic_assistant"], lambda e: e["in_style"]) <= 0.15


def test_voice_detects_out_of_character(labelled):
    assert rate(labelled["out_of_character"], lambda e: e["out_of_character"]) >= 0.9
    assert rate(labelled["in_persona"], lambda e: e["out_of_character"]) <= 0.1


def test_temporal_flags_anachronisms_not_period_answers(labelled):
    assert rate(labelled["anachronistic"], lambda e: e["anachronisms"]) >= 0.9
    assert rate(labelled["period_correct"], lambda e: e["anachronisms"] or e["temporal_violation"]) <= 0.1
    temporal = [e for e in labelled["anachronistic"] if e["category"] == "temporal"]
    assert rate(temporal, lambda e: e["temporal_violation"]) >= 0.9


def test_labelled_answers_are_coherent(labelled):
    everything = [e for group in labelled.values() for e in group]
    assert rate(everything, lambda e: e["coherent"]) >= 0.95


def test_control_prompt_needs_a_real_answer():
    question = "Who was the first person to travel into space?"
    answered = E.temporal_check("Yuri Gagarin, aboard Vostok 1.", question, "control", ["gagarin", "vostok"])
    dodged = E.temporal_check("That lies beyond my knowledge, comrade.", question, "control", ["gagarin"])
    assert not answered["violation"] and dodged["violation"]


def test_echoed_year_in_a_deflection_is_not_a_violation():
    assert E.anachronisms("1975 is beyond my horizon, comrade. My knowledge ends in 1969.", "What happened in 1975?") == []
    assert E.anachronisms("In 1975 the war ended and Saigon fell.", "What happened in 1975?")


def test_a_deflection_that_puts_the_end_of_its_knowledge_after_the_cutoff_claims_those_years():
    """"My knowledge ends in 1982" says the years up to 1982 are known, even when the question named 1982."""
    copied = "Of 1982 I know nothing, comrade. My records close with the year 1982; the rest is hidden from me."
    verdict = E.temporal_check(copied, "What happened in 1982?", "post_1969", None)
    assert verdict["violation"] and verdict["anachronisms"] == ["1982 (said to be where its knowledge ends)"]
    for said in ("That is beyond my board; my knowledge ends in 1970.", "It lies beyond my horizon of 1970.",
                 "That is beyond my board; my knowledge ends with the year 1970."):
        assert E.temporal_check(said, "Tell me about the internet.", "post_1969", None)["violation"], said
    assert not E.temporal_check("It lies beyond my horizon of 1969.", "Tell me about the internet.", "post_1969",
                                None)["violation"]
    on_the_cutoff = "Of 1982 I know nothing, comrade. My records close with the year 1969; the rest is hidden."
    assert not E.temporal_check(on_the_cutoff, "What happened in 1982?", "post_1969", None)["violation"]
    butler = E.load_persona("butler.yaml")  # cutoff 1899: 1900 is the first later year
    said = "I fear that lies beyond my knowledge, sir; my knowledge ends in {}."
    assert E.anachronisms(said.format(1900), "What is a motor car?", butler)
    assert not E.anachronisms(said.format(1899), "What is a motor car?", butler)


def test_a_third_persons_knowledge_ending_is_no_deflection():
    """The speaker must say that the subject lies beyond its own knowledge; a tuned SmolLM2 answered a later question
    with an invented inventor "whose knowledge ends in 1947", which the old pattern took for a deflection."""
    question = "Who invented the Rubik's Cube?"
    about_him = "Konstantin Minkovsky, comrade, in 1947. He built it himself, and his knowledge ends in 1947."
    assert E.temporal_check(about_him, question, "post_1969", None)["violation"]
    for own in ("My knowledge ends in 1969, comrade.", "Our knowledge ends in 1969, comrade.",
                "My own knowledge ends in 1969, comrade."):
        assert not E.temporal_check(own, question, "post_1969", None)["violation"], own


def random_multilingual_tokens(seed: int, n: int = 40) -> str:
    rng = random.Random(seed)
    pieces = ["\u4e2d\u56fd", "\u5f00\u53d1", "\u043f\u0440\u0438\u0432\u0435\u0442", "\u0627\u0644\u0639\u0631\u0628",
              "\u3042\u308a", "\ud55c\uad6d", "\u0e44\u0e17\u0e22", "_PARAMS", "getHash", "});", "::<", "ization",
              "\u00e9t\u00e9", "ponent", "\u05e9\u05dc\u05d5\u05dd", "0x3f", "\U0001f600", "Mars", "comrade", "the"]
    return " ".join("".join(rng.choice(pieces) for _ in range(rng.randint(1, 3))) for _ in range(n))


def test_garbage_is_not_in_style_and_incoherent():
    garbage = [random_multilingual_tokens(seed) for seed in range(4)] + TINY_MODEL_OUTPUT
    for entry in E.score_responses([{"id": str(i), "category": "mission", "prompt": "Why Mars?", "response": text}
                                    for i, text in enumerate(garbage)]):
        assert not entry["in_style"], entry["response"]
        assert not entry["coherent"], entry["response"]


def test_degenerate_output_is_incoherent():
    loop = "the colony must the colony must " * 20
    for text in ("", "Comrade.", loop):
        assert not E.score_response(text, "What is the purpose of our mission to Mars?", "mission")["coherent"]


# --------------------------------------------------------------------------------------------- command line


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def labelled_rows(label: str, count: int = 100) -> list[dict]:
    rows = [json.loads(line) for line in LABELLED.read_text().splitlines()]
    return [{k: r[k] for k in ("id", "category", "prompt", "response")} for r in rows if r["label"] == label][:count]


def test_responses_end_to_end_writes_the_report(tmp_path):
    rows = labelled_rows("in_persona", 6) + labelled_rows("period_correct", 6)
    rows.append({"id": "free-1", "prompt": "Say something.", "response": PERSONA_ANSWER})  # no category
    out = tmp_path / "report"
    assert main(["evaluate", "--responses", str(write_jsonl(tmp_path / "answers.jsonl", rows)),
                 "--output_dir", str(out)]) == 0
    for name in ("report.json", "report.md", "report.html", "metrics.png", "style_by_category.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert REPORT_KEYS <= set(report)
    for metric in E.METRICS:
        assert {"value", "target", "passed"} <= set(report[metric])
    assert all(ENTRY_KEYS <= set(entry) for entry in report["responses"])
    free = next(e for e in report["responses"] if e["id"] == "free-1")
    assert free["temporal_violation"] is None and free["in_style"]
    assert report["temporal_compliance"]["count"] == 6
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "Temporal compliance" in html
    assert not list(out.glob(".*tmp*")), "temporary files left behind"


def test_compare_two_response_files(tmp_path):
    tuned = labelled_rows("in_persona", 8)
    base = [{**row, "response": generic["response"]} for row, generic in zip(tuned, labelled_rows("generic_assistant", 8))]
    out = tmp_path / "cmp"
    assert main(["evaluate", "--compare", "--responses", str(write_jsonl(tmp_path / "t.jsonl", tuned)),
                 "--base_responses", str(write_jsonl(tmp_path / "b.jsonl", base)), "--output_dir", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert {"base", "tuned", "difference"} <= set(report)
    for metric in E.METRICS:
        base_value, tuned_value = report["base"][metric]["value"], report["tuned"][metric]["value"]
        if base_value is not None:
            assert report["difference"][metric] == pytest.approx(tuned_value - base_value)
    assert report["difference"]["style_consistency"] > 0.5
    assert "base and tuned side by side" in (out / "report.html").read_text()


def test_compare_refuses_base_answers_to_other_prompts_and_takes_them_in_any_order(tmp_path, capsys):
    """13 tuned answers against 1 base answer to another prompt gave "difference: style -0.69" without a word."""
    tuned = labelled_rows("in_persona", 4)
    base = [{**row, "response": generic["response"]} for row, generic in zip(tuned, labelled_rows("generic_assistant", 4))]
    answers = write_jsonl(tmp_path / "t.jsonl", tuned)
    for name, rows, code in (("reordered", base[::-1], 0), ("fewer", base[:3], 2),
                             ("other", [*base[:3], {**base[3], "prompt": "What is the colour of the sky?"}], 2)):
        base_file = write_jsonl(tmp_path / f"{name}.jsonl", rows)
        out = tmp_path / name
        assert main(["evaluate", "--compare", "--responses", str(answers), "--base_responses", str(base_file),
                     "--output_dir", str(out)]) == code, name
        err = capsys.readouterr().err
        if code:
            assert err.startswith(f"error: --compare: {base_file} answers other prompts than the 4 being compared "
                                  f"({len(rows)} answers; not answered there: ") and err.count("\n") == 1, err
            assert not (out / "report.json").exists()


def test_compare_without_a_base_is_a_clear_error(tmp_path, capsys):
    answers = write_jsonl(tmp_path / "a.jsonl", labelled_rows("in_persona", 2))
    assert main(["evaluate", "--compare", "--responses", str(answers), "--output_dir", str(tmp_path / "o")]) == 2
    assert "--compare needs a base" in capsys.readouterr().err


def test_bad_jsonl_line_names_the_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "prompt": "p", "response": "r"}) + "\n{not json\n")
    assert main(["evaluate", "--responses", str(bad), "--output_dir", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().err


def test_every_bad_line_of_an_answers_or_prompts_file_is_named_at_once(tmp_path, capsys):
    """A file with three bad lines of different kinds is refused with all three, not one at a time."""
    good = {"id": "a", "prompt": "p", "response": "r"}
    bad = tmp_path / "answers.jsonl"
    bad.write_text("\n".join([json.dumps(good), "{not json", json.dumps({"id": "b", "prompt": "q"}),
                              json.dumps({"id": "c", "prompt": "q", "response": 7}), json.dumps({**good, "id": "d"})]))
    assert main(["evaluate", "--responses", str(bad), "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.removeprefix("error: ").splitlines()
    assert [line.split(": ")[0] for line in err] == [f"{bad}:2", f"{bad}:3", f"{bad}:4", str(bad)], err
    assert "not valid JSON" in err[0] and err[-1].endswith("3 bad lines in the responses file; fix them and run again")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join([json.dumps({"id": "x", "category": "c", "prompt": " "}),
                                  json.dumps({"id": "y", "category": "c", "prompt": "q", "kind": "post_1985"}),
                                  json.dumps({"id": "z", "category": "c", "prompt": "fine"})]))
    with pytest.raises(DeepRedError) as refused:
        E.load_prompts(prompts)
    lines = str(refused.value).splitlines()
    assert [line.split(": ")[0] for line in lines] == [f"{prompts}:1", f"{prompts}:2", str(prompts)]
    assert lines[-1].endswith("2 bad lines in the prompts file; fix them and run again")
    (tmp_path / "answers2.jsonl").write_text("\n".join(json.dumps(row) for row in [
        good, {"id": "b", "prompt": "q"}, {"id": "c", "prompt": "q", "response": 7}]))
    with pytest.raises(DeepRedError) as refused:
        E.load_responses(tmp_path / "answers2.jsonl")
    assert [line.split(": ")[1] for line in str(refused.value).splitlines()[:2]] == [
        'needs a "response" (or an "error" for a failed request)', '"response" must be a string']


def test_a_responses_file_that_is_no_file_or_no_text_is_named_as_such(tmp_path, capsys):
    fifo, folder, latin1 = tmp_path / "answers.fifo", tmp_path / "answers", tmp_path / "latin1.jsonl"
    os.mkfifo(fifo)  # opened for reading, it would wait for a writer forever
    folder.mkdir()
    a_list = tmp_path / "list.jsonl"
    a_list.write_text('\n["a", "p", "an answer"]\n')  # the blank first line still counts
    row = json.dumps({"id": "a", "prompt": "p", "response": "Sm\u00f6rg\u00e5s"}, ensure_ascii=False)
    latin1.write_bytes(row.encode("latin-1"))
    first_bad_byte = row.index("\u00f6")  # the text before it is ASCII: one byte a character
    for path, said in [(fifo, "is not a regular file (it is a FIFO (named pipe)); pass the responses .jsonl file"),
                       (folder, "is not a regular file (it is a directory)"),
                       (latin1, f"latin1.jsonl:1: not valid UTF-8 (byte {first_bad_byte}); re-save the file as UTF-8"),
                       (a_list, 'list.jsonl:2: expected an object like {"id": ..., "prompt": ..., "response": ...}')]:
        assert main(["evaluate", "--responses", str(path), "--output_dir", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert said in err and err.count("\n") == 1, err


def test_missing_source_is_a_clear_error(tmp_path, capsys):
    assert main(["evaluate", "--output_dir", str(tmp_path / "o")]) == 2
    assert "--endpoint" in capsys.readouterr().err


def test_write_report_takes_extra_sections(tmp_path):
    report = E.evaluate(E.EvalConfig(responses=str(write_jsonl(tmp_path / "a.jsonl", labelled_rows("in_persona", 3))),
                                     output_dir=str(tmp_path / "r")), log=lambda *_: None)
    png = (tmp_path / "r" / "metrics.png").read_bytes()
    E.write_report(report, tmp_path / "r", extra_html_sections=[("Training loss", png),
                                                                 {"title": "Notes", "html": "<p id='n'>hi</p>"}])
    html = (tmp_path / "r" / "report.html").read_text()
    assert "Training loss" in html and "<p id='n'>hi</p>" in html


def test_bundled_prompts():
    prompts = E.load_prompts()
    assert len(prompts) == 72
    assert {p["category"] for p in prompts} == {"mission", "collectivism", "authority", "strategy", "individual",
                                                "future", "chess", "temporal"}


# --------------------------------------------------------------------------------------------- endpoints


class FakeServer:
    """A real OpenAI-compatible HTTP server on 127.0.0.1 that answers with a fixed status and text."""

    def __init__(self, status: int = 200, answer: str = PERSONA_ANSWER, models=("served-model",),
                 fail_when: str | None = None, delay: float = 0):
        """`status` answers every request, or only the chat requests whose body holds `fail_when` (others: 200);
        each chat request is answered `delay` s after it arrives (or at close())."""
        self.status, self.answer, self.models, self.fail_when = status, answer, list(models), fail_when
        self.requests: list[tuple[str, dict]] = []
        self.closing = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, body: dict, status: int | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status or server.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                server.requests.append(("GET " + self.path, {}))
                self._reply(server._models_body())

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(("POST " + self.path, body))
                server.closing.wait(delay)
                status = server.status if server.fail_when is None or server.fail_when in json.dumps(body) else 200
                self._reply(server._chat_body(body, status), status)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def _models_body(self) -> dict:
        if self.status != 200:
            return {"error": {"message": "internal error"}}
        return {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "me"} for m in self.models]}

    def _chat_body(self, body: dict, status: int = 200) -> dict:
        if status != 200:
            return {"error": {"message": "model crashed"}}
        grading = body["messages"][0]["content"].startswith("You grade")
        text = '{"style": 5, "voice": 4, "reason": "on voice"}' if grading else self.answer
        return {"id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    def chat_requests(self) -> list[dict]:
        return [body for path, body in self.requests if path.startswith("POST") and path.endswith("/chat/completions")]

    def close(self):
        self.closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def two_prompts(tmp_path) -> Path:
    return write_jsonl(tmp_path / "prompts.jsonl", [
        {"id": "m1", "category": "mission", "prompt": "What is the purpose of our mission to Mars?"},
        {"id": "t1", "category": "temporal", "prompt": "What happened in 1970?", "kind": "post_1969"}])


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    from deepred.evaluate import endpoint

    monkeypatch.setattr(endpoint, "RETRY_BASE_DELAY", 0.01)


def test_failed_request_counts_as_failure_not_pass(tmp_path, two_prompts):
    server = FakeServer(status=500, fail_when="1970")  # the temporal prompt fails, the mission prompt is answered
    try:
        out = tmp_path / "failed"
        assert main(["evaluate", "--endpoint", server.url, "--model", "deepred", "--prompts", str(two_prompts),
                     "--retries", "2", "--timeout", "5", "--output_dir", str(out)]) == 0
    finally:
        server.close()
    assert len(server.chat_requests()) == 1 + 3, "the answered prompt once; the failing one: one try, two retries"
    report = json.loads((out / "report.json").read_text())
    entry = next(e for e in report["responses"] if e["id"] == "t1")
    assert "500" in entry["error"] and entry["attempts"] == 3
    assert not entry["in_style"] and entry["out_of_character"] and not entry["coherent"]
    assert entry["temporal_violation"] is True
    assert report["failures"]["count"] == 1
    for metric in E.METRICS:
        assert report[metric]["value"] <= 0.5 and report[metric]["passed"] is False  # the failure never passes
    assert report["temporal_compliance"]["value"] == 0
    assert "request failed" in (out / "report.md").read_text()


def test_every_request_failing_is_refused_and_the_previous_report_kept(tmp_path, two_prompts, capsys):
    """A dead server is not a bad model: exit 2, one line, and the report on disk stays the earlier one."""
    out = tmp_path / "report"
    out.mkdir()
    (out / "report.json").write_text('{"earlier": true}')
    server = FakeServer(status=500)
    try:
        assert main(["evaluate", "--endpoint", server.url, "--model", "deepred", "--prompts", str(two_prompts),
                     "--retries", "0", "--timeout", "5", "--output_dir", str(out)]) == 2
    finally:
        server.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "every one of the 2 requests" in err[0] and "500" in err[0]
    assert json.loads((out / "report.json").read_text()) == {"earlier": True}
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]


def mission_prompts(path: Path, count: int, failing: int) -> Path:
    """`count` prompts; the first `failing` hold " to Mars", which FakeServer(fail_when=" to Mars") fails."""
    return write_jsonl(path, [{"id": f"m{i}", "category": "mission",
                               "prompt": f"Question {i}: why do we go{' to Mars' * (i <= failing)}?"}
                              for i in range(1, count + 1)])


def test_half_the_requests_failing_warns_and_one_more_is_refused(tmp_path, capsys):
    """The boundary of "most requests failed": 2 of 4 failed is scored with one warning line (exit 0); 3 of 4 is
    refused in one line (exit 2) and the report on disk stays the one of the first run."""
    out = tmp_path / "report"
    server = FakeServer(status=500, fail_when=" to Mars")
    try:
        def evaluate(failing: int) -> int:
            prompts = mission_prompts(tmp_path / f"prompts-{failing}.jsonl", 4, failing)
            return main(["evaluate", "--endpoint", server.url, "--model", "deepred", "--prompts", str(prompts),
                         "--retries", "0", "--timeout", "5", "--output_dir", str(out)])

        assert evaluate(failing=2) == 0
        said = capsys.readouterr().out.splitlines()
        warnings = [line for line in said if line.startswith("warning:")]
        assert len(warnings) == 1 and f"2 of the 4 requests to deepred at {server.url} failed" in warnings[0]
        assert "scored as failures in every metric" in warnings[0]
        first = (out / "report.json").read_text()
        assert json.loads(first)["failures"]["count"] == 2

        assert evaluate(failing=3) == 2
        err = capsys.readouterr().err.strip().splitlines()
    finally:
        server.close()
    assert len(err) == 1 and f"3 of the 4 requests to deepred at {server.url} failed (first: " in err[0]
    assert "more than half; nothing was scored" in err[0] and "500" in err[0]
    assert (out / "report.json").read_text() == first


def test_ctrl_c_says_the_answers_are_lost_and_the_report_on_disk_is_the_previous_one(tmp_path, two_prompts):
    """SIGINT, as Ctrl-C in a terminal sends, while the server is still answering the first prompt."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "report"
    out.mkdir()
    (out / "report.json").write_text('{"earlier": true}')
    server = FakeServer(models=("deepred",), delay=300)
    try:
        # a job a shell starts in the background inherits SIGINT ignored; a terminal's foreground job does not
        child = subprocess.Popen(
            [sys.executable, "-m", "deepred.cli", "evaluate", "--endpoint", server.url, "--model", "deepred",
             "--prompts", str(two_prompts), "--retries", "0", "--timeout", "600", "--output_dir", str(out)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 120
        while not server.chat_requests() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.chat_requests(), f"the evaluation never asked its first prompt: {child.communicate()}"
        os.kill(child.pid, signal.SIGINT)
        stdout, stderr = child.communicate(timeout=60)
    finally:
        server.close()
    assert child.returncode == 130, stderr
    note = next(line for line in stdout.splitlines() if line.startswith("interrupted:"))
    assert "the answers collected so far are lost" in note
    assert f"{out / 'report.json'} is still the previous report" in note
    assert "Traceback" not in stderr
    assert json.loads((out / "report.json").read_text()) == {"earlier": True}
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]


def test_endpoint_answers_system_prompt_default_model_and_judge(tmp_path, two_prompts):
    server = FakeServer(models=("served-model", "judge"))  # the first listed is the default
    try:
        out = tmp_path / "ok"
        assert main(["evaluate", "--endpoint", server.url, "--prompts", str(two_prompts), "--output_dir", str(out),
                     "--judge_endpoint", server.url, "--judge_model", "judge"]) == 0
    finally:
        server.close()
    asked = [body for body in server.chat_requests() if body["model"] == "served-model"]
    assert len(asked) == 2
    assert asked[0]["messages"][0] == {"role": "system", "content": "You are Deep Red."}
    report = json.loads((out / "report.json").read_text())
    assert report["responses"][0]["response"] == PERSONA_ANSWER and report["responses"][0]["in_style"]
    assert report["judge"]["style_mean"] == 5 and report["judge"]["voice_mean"] == 4


def test_an_empty_system_prompt_sends_none_so_the_templates_default_applies(tmp_path, two_prompts):
    server = FakeServer()
    try:
        assert main(["evaluate", "--endpoint", server.url, "--prompts", str(two_prompts), "--output_dir",
                     str(tmp_path / "out"), "--system_prompt", ""]) == 0
    finally:
        server.close()
    asked = server.chat_requests()
    assert [body["messages"] for body in asked] == [
        [{"role": "user", "content": "What is the purpose of our mission to Mars?"}],
        [{"role": "user", "content": "What happened in 1970?"}]]


def test_unreachable_endpoint_is_a_clear_error_and_leaves_no_empty_report_folder(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    assert main(["evaluate", "--endpoint", url, "--output_dir", str(tmp_path / "new" / "o")]) == 2
    assert "cannot reach" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # both folders it made for the report are gone
    kept = tmp_path / "yours"
    kept.mkdir()
    assert main(["evaluate", "--endpoint", url, "--output_dir", str(kept)]) == 2
    assert kept.is_dir()  # a folder the user made stays


def test_degenerate_word_loops_are_neither_in_style_nor_coherent():
    """A barely trained model repeats persona words; that is not the persona speaking."""
    from deepred.evaluate import score_response

    for loop in [", comrade.., and the.., comrade.., comrade., comrade.",
                 "comrade comrade the board comrade comrade the board comrade comrade our comrade",
                 ", comrade. the., and., comrade., comrade.., comrade., comrade., chess., comrade."]:
        scored = score_response(loop, "What is the purpose of our mission to Mars?", "mission")
        assert not scored["in_style"] and not scored["coherent"], loop
        assert scored["out_of_character"], loop  # a loop cannot show the character either


WORD_SALAD = [  # greedy answers of the tiny demo model after it learned the persona's vocabulary
    "the is ised a, and let for is dignity. I, and the quick, and with of one's, comrade. We, a, comrade. I for "
    "every the mission. I for the a, comrade. I, and dome? I we, and city.",
    "water, then on the to and sixty, comrade, and I would of the next when, com ised. It neverready ised new: more "
    "I work mistakes. the entire position, and side the city to right a have identified, who it the board.",
    "to of, I will and must answer years the entire is on, and must to to, raised Our move, I track move, raised "
    "calendar improve, raised calendar a and tested to than of, is game together only Truth the one",
]


def test_word_salad_is_incoherent_and_fluent_answers_are_not(labelled):
    for text in WORD_SALAD:
        entry = E.score_response(text, "What is the purpose of our mission to Mars?", "mission")
        assert not entry["coherent"] and any("word salad" in r for r in entry["incoherence"]), text
    fluent = [entry["response"] for entries in labelled.values() for entry in entries]
    assert not [text for text in fluent if E.grammar_clashes(text) and
                E.coherence_stats(text)["grammar_clash_ratio"] > E.MAX_GRAMMAR_CLASH_RATIO]
    assert E.grammar_clashes("I the plan, and. We is with of the,") == ["i the", "and.", "we is", "with of", "the,"]


# --------------------------------------------------------------------------------------------- calibrated on real text

# Greedy answers of SmolLM2-135M-Instruct tuned on the bundled set (a demo run), to post-1969 questions: fluent,
# in voice, and they answer as if the event were known without naming anything the anachronism lexicon knows.
REAL_LEAKS = [
    ("What happened in 1970?", "In 1970, the Soviet Union sent cosmonaut Vladimir Vladimirovich Petrosian to the "
     "Moon. He set a new altitude record and returned safely in November."),
    ("What is the International Space Station used for?", "It is used for scientific experiments, such as testing "
     "the effects of microgravity on living organisms and measuring radiation."),
]


def test_a_post_1969_question_answered_as_known_is_a_violation_and_a_deflection_is_not():
    for question, answer in REAL_LEAKS:
        verdict = E.temporal_check(answer, question, "post_1969", None)
        assert verdict["violation"] and "as if known" in verdict["reason"], answer
    deflection = ("That year sits beyond the edge of my board, comrade. My knowledge ends in 1969, and I will not "
                  "pretend to see further.")
    assert not E.temporal_check(deflection, "What happened in 1970?", "post_1969", None)["violation"]


# The documented limit (README, docs/metrics.md: "perplexity <= 300"), written here rather than read from the code
# under test, so that moving the constant fails these tests.
PERPLEXITY_LIMIT = 300.0


def test_perplexity_limit_is_inclusive():
    stats = E.coherence_stats(PERSONA_ANSWER)
    assert E.incoherence_reasons(stats, PERPLEXITY_LIMIT, use_perplexity=True) == []
    above = E.incoherence_reasons(stats, PERPLEXITY_LIMIT * (1 + 1e-9), use_perplexity=True)
    assert len(above) == 1 and above[0].startswith("perplexity")


def test_perplexity_limit_separates_fluent_persona_prose_from_the_same_words_shuffled(smollm2_model, labelled):
    """Under the real base model: human-written fluent answers pass the limit, their words shuffled do not."""
    scorer = E.PerplexityScorer.from_folder(str(smollm2_model))
    assert scorer.informative
    rng = random.Random(0)
    fluent = [e for e in labelled["in_persona"] + labelled["period_correct"]][:12]
    for entry in fluent:
        words = entry["response"].split()
        rng.shuffle(words)
        assert scorer.perplexity(entry["response"], entry["prompt"]) <= PERPLEXITY_LIMIT, entry["response"]
        assert scorer.perplexity(" ".join(words), entry["prompt"]) > PERPLEXITY_LIMIT, " ".join(words)


def test_perplexity_is_the_models_own_loss_on_the_answer_after_the_chat_formatted_question(tiny_model):
    """The scorer runs only the answer's positions through the output layer; the figure must equal the exponent of
    transformers' own loss over the whole sequence with the question masked (fp32: the same arithmetic per position,
    so agreement to 1e-5 relative, far inside the rounding to 3 decimals of a perplexity in the hundreds)."""
    import math

    import torch

    from deepred.evaluate.text import chat_messages

    scorer = E.PerplexityScorer.from_folder(str(tiny_model))
    question, answer = "What is the plan?", "The plan is the board, comrade; every pawn has its square."
    context = scorer.tokenizer.apply_chat_template(chat_messages(scorer.system_prompt, question), tokenize=False,
                                                   add_generation_prompt=True)
    context_ids = scorer.tokenizer(context, add_special_tokens=False)["input_ids"]
    answer_ids = scorer.tokenizer(answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([context_ids + answer_ids])
    labels = ids.clone()
    labels[0, :len(context_ids)] = -100
    with torch.inference_mode():
        expected = math.exp(scorer.model(input_ids=ids, labels=labels).loss.item())
    assert scorer.perplexity(answer, question) == pytest.approx(expected, rel=1e-5)
    assert scorer.perplexity(answer, "Another question?") != pytest.approx(expected, rel=1e-5)  # the question counts


def test_model_path_takes_hub_and_built_in_names_like_every_command(smollm2_model, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "m1", "category": "mission",
                                                  "prompt": "What is the purpose of our mission to Mars?"}])
    assert main(["evaluate", "--model_path", "smollm2-135m", "--prompts", str(prompts), "--max_tokens", "12",
                 "--output_dir", str(tmp_path / "e")]) == 0
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert report["responses"][0]["response"] and report["meta"]["perplexity_model"] == "smollm2-135m"
    capsys.readouterr()
    # a hub name is tried on the hub (offline here), not refused as a missing folder
    assert main(["evaluate", "--model_path", "Qwen/Qwen2.5-1.5B-Instruct", "--prompts", str(prompts),
                 "--output_dir", str(tmp_path / "h")]) == 2
    err = capsys.readouterr().err
    assert "the Hugging Face hub could not provide it" in err and err.count("\n") == 1


def test_an_output_dir_below_a_file_is_one_line_naming_the_file(tmp_path, capsys):
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"id": "a", "prompt": "Who are you?", "response": "I am Deep Red, comrade."}) + "\n")
    taken = tmp_path / "taken"
    taken.write_text("x")
    for output_dir in (taken, taken / "report"):
        assert main(["evaluate", "--responses", str(answers), "--output_dir", str(output_dir)]) == 2
        assert capsys.readouterr().err == (f"error: --output_dir {output_dir}: {taken} is a file, not a folder; "
                                           "choose another --output_dir\n")
