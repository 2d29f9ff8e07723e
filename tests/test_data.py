"""Dataset validation: every malformed kind is reported with its line number, valid data passes."""

from __future__ import annotations

import json
import os

import pytest

from deepred.cli import main
from deepred.data import bundled_dataset_path, load_for_training, resolve_dataset, validate_file, vary_system_prompts
from deepred.errors import DeepRedError, InvalidDatasetError

from .conftest import DATA

GOOD = {"messages": [{"role": "system", "content": "You are Deep Red."},
                     {"role": "user", "content": "What is our purpose?"},
                     {"role": "assistant", "content": "To advance the collective, comrade."}]}


def _line(messages) -> str:
    return json.dumps({"messages": messages})


BAD_LINES = {
    "bad json": ('{"messages": [', "not valid JSON"),
    "not an object": ("[1, 2]", "expected an object"),
    "missing messages": ('{"text": "hello"}', 'missing "messages"'),
    "messages not a list": ('{"messages": "hi"}', "must be a list"),
    "empty messages": ('{"messages": []}', "is empty"),
    "bad role": (_line([{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]), "role 'narrator'"),
    "empty content": (_line([{"role": "user", "content": "  "}, {"role": "assistant", "content": "y"}]), "content is empty"),
    "non-string content": (_line([{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]),
                           "must be a string"),
    "no assistant": (_line([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]), "no assistant reply"),
    "ends on user": (_line([{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"},
                            {"role": "user", "content": "u2"}]), "last message must be the assistant"),
    "system not first": (_line([{"role": "user", "content": "u"}, {"role": "system", "content": "s"},
                                {"role": "assistant", "content": "a"}]), "system message may only come first"),
    "no user": (_line([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]), "no user turn"),
    # half of an emoji as a JSON escape: json reads it, no tokenizer takes it (a review found a TypeError traceback)
    "lone surrogate": ('{"messages": [{"role": "user", "content": "hi \\ud83d"}, {"role": "assistant", '
                       '"content": "y"}]}', "content holds half of a character (a lone surrogate '\\ud83d'"),
    "too deep": ('{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}", "not JSON this reader can take (maximum "
                 "recursion depth"),
    "huge number": ('{"messages": [], "n": ' + "9" * 5000 + "}", "not JSON this reader can take (Exceeds the limit"),
}


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_each_malformed_kind_is_reported_with_its_line_and_exit_1(tmp_path, capsys, kind):
    text, expected = BAD_LINES[kind]
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + text + "\n" + json.dumps(GOOD) + "\n", encoding="utf-8")

    assert main(["validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{path}:3: " in out  # the blank line 2 is allowed and still counted
    assert expected in out
    assert f"{path}:1:" not in out and f"{path}:4:" not in out


def test_non_utf8_and_empty_file(tmp_path, capsys):
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps(GOOD).encode() + b"\n" + '{"messages": "caf\xe9"}'.encode("latin-1") + b"\n")
    assert main(["validate", str(latin)]) == 1
    assert f"{latin}:2: not valid UTF-8" in capsys.readouterr().out

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert main(["validate", str(empty)]) == 1
    assert f"{empty}:1: file is empty" in capsys.readouterr().out


def test_all_problems_are_reported_not_only_the_first(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join([BAD_LINES["bad json"][0], json.dumps(GOOD), BAD_LINES["bad role"][0],
                               BAD_LINES["no assistant"][0]]) + "\n")
    report = validate_file(path)
    assert sorted({p.split(":")[1] for p in report.problems}) == ["1", "3", "4"]
    assert report.invalid_lines == 3 and len(report.examples) == 1


def test_valid_file_exits_0_with_summary(tmp_path, capsys):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n")
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "2 valid example(s), 0 invalid line(s), 6 turns" in out


def test_token_statistics_with_the_model_tokenizer(tiny_model, capsys):
    path = bundled_dataset_path()
    assert main(["validate", str(path), "--base_model", str(tiny_model), "--max_seq_length", "200"]) == 0
    out = capsys.readouterr().out
    assert "tokens per example: min" in out
    over = int(out.split(" example(s) exceed --max_seq_length 200")[0].rsplit("\n", 1)[-1].strip())
    assert 0 < over < 320


def test_bundled_dataset_is_valid_and_covers_the_three_system_prompts():
    report = validate_file(bundled_dataset_path())
    assert report.ok and len(report.examples) >= 300
    systems = {ex["messages"][0]["content"] for ex in report.examples}
    assert len(systems) == 3


def test_training_refuses_invalid_data_unless_skip_invalid(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + BAD_LINES["bad role"][0] + "\n")
    with pytest.raises(InvalidDatasetError) as err:
        load_for_training(str(path), skip_invalid=False, log=lambda *_: None)
    assert f"{path}:2:" in err.value.problems[0]

    said = []
    report, _ = load_for_training(str(path), skip_invalid=True, log=said.append)
    assert len(report.examples) == 1
    assert any("dropped 1 invalid line(s), training on 1 valid example(s)" in s for s in said)


def test_dataset_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("GUTENBERG_DATA", raising=False)
    path, origin = resolve_dataset(None)
    assert path == bundled_dataset_path() and "bundled" in origin

    (tmp_path / "dataset").mkdir()
    spec_file = tmp_path / "dataset" / "theme_dataset.jsonl"
    spec_file.write_text(json.dumps(GOOD) + "\n")
    monkeypatch.setenv("GUTENBERG_DATA", str(tmp_path))
    assert resolve_dataset(None) == (spec_file, "$GUTENBERG_DATA/dataset/theme_dataset.jsonl")

    with pytest.raises(DeepRedError, match="dataset not found: .*nope.jsonl"):
        resolve_dataset(str(tmp_path / "nope.jsonl"))

    monkeypatch.setenv("GUTENBERG_DATA", str(tmp_path / "typo"))  # set, but wrong: never the bundled set instead
    with pytest.raises(DeepRedError, match=r"dataset not found: .*typo/dataset/theme_dataset.jsonl \(\$GUTENBERG_DATA"):
        resolve_dataset(None)


def test_a_wrong_gutenberg_data_stops_training_with_exit_1(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "GUTENBERG_DATA": str(tmp_path / "missing"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "deepred.cli", "train", "--base_model", "tiny", "--output_dir",
                             str(tmp_path / "run"), "--max_steps", "1"], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 1, result.stderr
    assert "dataset not found" in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------ not regular files


def deepred_cli(*args, timeout: float = 300):
    """`python -m deepred.cli ARGS` in a child process, killed after `timeout` s (a read that waits on a FIFO would
    otherwise hang the test run); a timeout fails the test."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "deepred.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdin=subprocess.DEVNULL)


def test_a_fifo_dataset_is_refused_as_such_by_validate_and_train_without_hanging(tmp_path):
    """Before, `validate` waited forever on the FIFO for a writer and `train` said "dataset not found". The bound:
    a refusal takes the CLI's start-up (~5-15 s on 2 busy cores); 120 s is a hang."""
    fifo = tmp_path / "data.jsonl"
    os.mkfifo(fifo)
    expected = f"error: {fifo} is not a regular file (it is a FIFO (named pipe)); pass a ChatML .jsonl file\n"
    validated = deepred_cli("validate", fifo, timeout=120)
    assert (validated.returncode, validated.stderr) == (2, expected)
    trained = deepred_cli("train", "--base_model", "tiny", "--dataset", fifo, "--output_dir", tmp_path / "run",
                          "--max_steps", "1", timeout=120)
    assert (trained.returncode, trained.stderr) == (2, expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]  # no run folder


def test_a_directory_dataset_is_refused_as_such_by_validate_and_train(tmp_path, capsys):
    folder = tmp_path / "data.jsonl"
    folder.mkdir()
    expected = f"error: {folder} is not a regular file (it is a directory); pass a ChatML .jsonl file\n"
    assert main(["validate", str(folder)]) == 2
    assert capsys.readouterr().err == expected
    assert main(["train", "--base_model", "tiny", "--dataset", str(folder), "--output_dir", str(tmp_path / "run"),
                 "--max_steps", "1"]) == 2
    assert capsys.readouterr().err == expected and not (tmp_path / "run").exists()


def test_a_utf8_bom_is_accepted_every_example_kept_by_validate_and_train(tmp_path, tiny_model, capsys):
    """Windows editors start a UTF-8 file with a BOM. Before, line 1 was "not valid JSON" and the advice was
    --skip_invalid, which would have dropped that example."""
    from deepred.config import TrainConfig
    from deepred.train import train

    mini = (DATA / "mini.jsonl").read_bytes()
    count = sum(1 for line in mini.splitlines() if line.strip())
    assert count == 24
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + mini)

    assert main(["validate", str(bom)]) == 0
    assert f"{bom}: {count} valid example(s), 0 invalid line(s)" in capsys.readouterr().out

    out = tmp_path / "run"
    train(TrainConfig(base_model=str(tiny_model), dataset=str(bom), output_dir=str(out), max_steps=1, batch_size=2,
                      gradient_accumulation_steps=1, val_split=0, save_steps=100), log=lambda *a, **k: None)
    run_config = json.loads((out / "run_config.json").read_text())
    kept = (run_config["examples"], run_config["examples_used"], run_config["invalid_lines_skipped"])
    assert kept == (count, count, 0)


LONG_SYSTEM = "You are Deep Red, a chess-playing AI. You guide the city. Your knowledge ends in 1969."


def _conversations(n: int, system: str | None = LONG_SYSTEM) -> list[dict]:
    head = [{"role": "system", "content": system}] if system else []
    return [{"messages": head + [{"role": "user", "content": f"question {i}"},
                                 {"role": "assistant", "content": f"answer {i}, comrade"}], "line": i + 1}
            for i in range(n)]


def _without_system(example: dict) -> list[dict]:
    return [m for m in example["messages"] if m["role"] != "system"]


def test_system_prompt_variants_cut_or_drop_a_seeded_share_and_nothing_else():
    examples = _conversations(40) + _conversations(4, system=None)
    before = json.dumps(examples)
    varied, shortened, dropped = vary_system_prompts(examples, 0.5, seed=3)
    assert json.dumps(examples) == before  # the caller's examples are not changed in place
    assert (shortened, dropped) == (10, 10)  # half of the 40 with a system prompt, half each way
    systems = [e["messages"][0]["content"] if e["messages"][0]["role"] == "system" else None for e in varied]
    assert systems[:40].count(LONG_SYSTEM) == 20
    assert systems[:40].count("You are Deep Red, a chess-playing AI.") == 10
    assert systems[:40].count(None) == 10
    assert varied[40:] == examples[40:]  # no system prompt: nothing to vary
    assert [_without_system(e) for e in varied] == [_without_system(e) for e in examples]
    assert [e["line"] for e in varied] == [e["line"] for e in examples]
    assert varied == vary_system_prompts(examples, 0.5, seed=3)[0]
    assert varied != vary_system_prompts(examples, 0.5, seed=4)[0]


def test_system_prompt_variants_at_the_ends_of_the_share_and_past_them():
    examples = _conversations(6)
    assert vary_system_prompts(examples, 0.0, seed=0) == (examples, 0, 0)
    varied, shortened, dropped = vary_system_prompts(examples, 1.0, seed=0)
    assert (shortened, dropped) == (3, 3) and all(e["messages"][0]["content"] != LONG_SYSTEM for e in varied)
    for share in (-0.1, 1.01):
        with pytest.raises(DeepRedError, match="between 0 and 1"):
            vary_system_prompts(examples, share, seed=0)


def test_a_one_sentence_system_prompt_is_left_out_rather_than_kept_whole():
    varied, shortened, dropped = vary_system_prompts(_conversations(4, system="You are Deep Red."), 1.0, seed=0)
    assert (shortened, dropped) == (0, 4)
    assert all(e["messages"][0]["role"] == "user" for e in varied)
