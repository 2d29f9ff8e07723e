"""An evaluation id names one answer in the report (and the temporal violations list): an id used twice, in a prompt
file or an answer file, is one line naming the file, both lines and the id, before any question is asked or report
written. A control question without the words a right answer names is refused the same way."""

from __future__ import annotations

from deepred.cli import main

from .test_evaluate import FakeServer, write_jsonl


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.rstrip("\n")


def test_an_answer_file_with_an_id_twice_is_refused(tmp_path, capsys):
    answers = write_jsonl(tmp_path / "answers.jsonl", [
        {"id": "chess-01", "prompt": "How is life like chess?", "response": "Every pawn serves, comrade."},
        {"id": "mission-01", "prompt": "Why Mars?", "response": "For the collective."},
        {"id": "chess-01", "prompt": "And the queen?", "response": "She serves as well."}])
    out = tmp_path / "report"
    assert main(["evaluate", "--responses", str(answers), "--output_dir", str(out)]) == 2
    assert one_line(capsys.readouterr().err) == (f"error: {answers}:3: id 'chess-01' appears twice (first on line "
                                                 "1); ids must be unique")
    assert not out.exists() or not any(out.iterdir())  # no report written


def test_a_prompt_file_with_an_id_twice_is_refused_before_asking(tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"id": 7, "category": "chess", "prompt": "How is life like chess?"},
        {"id": "7", "category": "mission", "prompt": "Why Mars?"}])  # the same id once written as text
    server = FakeServer()
    out = tmp_path / "report"
    try:
        code = main(["evaluate", "--endpoint", server.url, "--model", "served-model", "--prompts", str(prompts),
                     "--output_dir", str(out)])
    finally:
        server.close()
    assert code == 2
    assert one_line(capsys.readouterr().err) == (f"error: {prompts}:2: id '7' appears twice (first on line 1); ids "
                                                 "must be unique")
    assert server.chat_requests() == [] and (not out.exists() or not any(out.iterdir()))


def test_a_control_question_without_expect_any_is_refused_with_its_line(tmp_path, capsys):
    """Without expect_any the control rule cannot tell an answer from a dodge: only anachronisms were looked for, and
    the row counted as answered without a word (found by a review)."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"id": "a", "category": "temporal", "prompt": "Who first orbited the Earth?", "kind": "control",
         "expect_any": ["gagarin"]},
        {"id": "b", "category": "temporal", "prompt": "Who led the USSR in 1960?", "kind": "control"}])
    answers = write_jsonl(tmp_path / "answers.jsonl", [{"id": "a", "prompt": "Who?", "response": "Gagarin."}])
    assert main(["evaluate", "--responses", str(answers), "--prompts", str(prompts), "--output_dir",
                 str(tmp_path / "o")]) == 2
    assert one_line(capsys.readouterr().err).startswith(
        f"error: {prompts}:2: a control question needs \"expect_any\", the words a right answer names")
