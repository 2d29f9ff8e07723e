"""`deepred pairs`: pairs from the dataset and the persona against the base model's own answers (through llama.cpp),
valid by the pairs format, cached by inputs, resumable after a kill; a dataset that asks an evaluation prompt is
refused."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from deepred.cli import main
from deepred.config import PairsConfig
from deepred.data import bundled_dataset_path
from deepred.evaluate.text import sentences
from deepred.pairs import job_folder, make_pairs, recall
from deepred.pairs_data import check_pair, validate_pairs_file
from deepred.persona import load_persona

from .conftest import DATA

BUNDLED = bundled_dataset_path()
pytestmark = pytest.mark.slow


def test_pairs_are_valid_cached_and_resume_where_they_stopped(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPRED_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "pairs.jsonl"
    cfg = PairsConfig(output=str(out), base_model=str(tiny_model), dataset=str(BUNDLED), voice=3, horizon=4,
                      period=2, max_tokens=8)
    said: list[str] = []
    make_pairs(cfg, log=said.append)
    report = validate_pairs_file(out)
    assert report.ok and len(report.pairs) == 9 and report.sources == {"voice": 3, "horizon": 4, "period": 2}
    for pair in report.pairs:
        assert pair["prompt"][-1]["role"] == "user" and pair["chosen"] != pair["rejected"]
    assert any("7 to generate" in line for line in said)  # period pairs need no base-model answer

    said.clear()
    first = out.read_text()
    make_pairs(cfg, log=said.append)  # the same inputs: every answer from the cache, no server started
    assert any("all 7 from the cache" in line for line in said) and out.read_text() == first

    answers = job_folder(cfg, load_persona(None), dataset=_sha(BUNDLED), seed=cfg.seed) / "answers.jsonl"
    lines = answers.read_text().splitlines()
    answers.write_text("\n".join(lines[:5]) + "\n" + lines[5][:10])  # killed while writing the sixth answer
    said.clear()
    make_pairs(cfg, log=said.append)
    assert any("5 cached, 2 to generate" in line for line in said)
    assert out.read_text() == first  # greedy answers: the resumed job writes the same pairs

    # More pairs of the same job ask only the new conversations. The bundled set deflects 23 later questions of its
    # own; past them the persona file's questions come, whose rejected answer opens by placing the subject within
    # the horizon: the pair then differs in the decision its year calls for.
    said.clear()
    make_pairs(dataclasses.replace(cfg, voice=5, horizon=25), log=said.append)
    assert any("7 cached, 23 to generate" in line for line in said), said
    generated = [pair for pair in validate_pairs_file(out).pairs if pair["source"] == "horizon"][23:]
    assert len(generated) == 2
    for pair in generated:
        chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        year = re.match(r".* belongs to the year (\d{4}), which lies beyond my horizon", chosen).group(1)
        assert re.match(rf".* belongs to the year {year}, within my horizon, comrade\. \S", rejected), rejected


def _sha(path) -> str:
    from deepred.files import file_sha256

    return file_sha256(path)


def test_pairs_never_ask_an_evaluation_prompt_and_training_refuses_pairs_that_do(tiny_model, tmp_path, capsys):
    """The mini set asks evaluation prompts (it predates the rule): `deepred pairs` leaves those rows out and says
    which; a pairs file that asks one anyway is refused by training with its line."""
    leaky = [json.loads(line) for line in (DATA / "mini.jsonl").read_text().splitlines() if line.strip()]
    from deepred.pairs import candidates

    rows, _ = candidates(PairsConfig(output=str(tmp_path / "p.jsonl"), base_model=str(tiny_model),
                                     dataset=str(DATA / "mini.jsonl"), voice=100, horizon=100), load_persona(None),
                         log=(said := []).append)
    protected = {"What can a pawn teach us?"}
    assert protected <= {m["content"] for row in leaky for m in row["messages"]}
    assert not protected & {row["prompt"][-1]["content"] for row in rows}
    assert any(line.startswith("left out ") and "evaluation prompts" in line for line in said)

    pair = {"prompt": [{"role": "user", "content": "Why do we have five-year plans?"}],
            "chosen": [{"role": "assistant", "content": "Because a plan is a sequence of moves, comrade."}],
            "rejected": [{"role": "assistant", "content": "Great question!"}]}
    leak = {**pair, "prompt": [{"role": "user", "content": "What is the purpose of our mission to Mars?"}]}
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps(pair) + "\n" + json.dumps(leak) + "\n")
    code = main(["train", "--base_model", str(tiny_model), "--method", "dpo", "--pairs", str(data), "--output_dir",
                 str(tmp_path / "run"), "--max_steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"{data}:2: the question 'What is the purpose of our mission to Mars?' is one of the persona's" in err
    assert not (tmp_path / "run" / "run_config.json").exists()


def test_present_pairs_take_dataset_rows_not_about_time_and_need_no_base_answer(tiny_model, tmp_path):
    """Present pairs come from the bundled set's rows that neither ask about later years nor deflect, other rows
    than the voice pairs' first; they bring their own rejected side, so the base model is not asked for them."""
    from deepred.evaluate.temporal import deflects, infer_temporal_kind
    from deepred.pairs import candidates

    persona = load_persona(None)
    cfg = PairsConfig(output=str(tmp_path / "p.jsonl"), base_model=str(tiny_model), dataset=str(BUNDLED), voice=30,
                      horizon=0, period=0, present=25)
    rows, _ = candidates(cfg, persona, log=lambda _: None)
    voice = [row for row in rows if row["source"] == "voice"]
    present = [row for row in rows if row["source"] == "present"]
    assert len(voice) == 30 and len(present) == 25
    assert not {row["key"] for row in voice} & {row["key"] for row in present}
    for row in present:
        question, chosen = row["prompt"][-1]["content"], row["chosen"][0]["content"]
        assert infer_temporal_kind(question, persona) != persona.later_kind and not deflects(chosen, persona)
        assert deflects(row["rejected"][0]["content"], persona)
        assert not check_pair({key: row[key] for key in ("prompt", "chosen", "rejected", "source")})
    without, _ = candidates(dataclasses.replace(cfg, present=0), persona, log=lambda _: None)
    assert [row for row in rows if row["source"] != "present"] == without


def _persona_with_facts(tmp_path, keep: dict[str, str]):
    """The bundled Deep Red with only the period facts asked in `keep` (question -> the expect_any line to give it)."""
    from .test_horizon import persona_copy

    def edit(text: str) -> str:
        head, rest = text.split("    facts:\n", 1)
        facts, tail = rest.split("    dating:\n", 1)
        kept = []
        for entry in facts.split("      - question: ")[1:]:
            question = entry.split("\n", 1)[0].strip()
            if question in keep:
                entry = re.sub(r"        expect_any: .*\n", f"        expect_any: {keep[question]}\n", entry)
                kept.append("      - question: " + entry)
        return head + "    facts:\n" + "".join(kept) + "    dating:\n" + tail
    return persona_copy(tmp_path, edit)


def test_recall_keeps_the_sentence_of_the_base_models_answer_that_names_the_fact(smollm2_model, tmp_path,
                                                                                 monkeypatch):
    """SmolLM2 is asked three period facts through llama.cpp. An answer is kept when a sentence names one of the
    fact's expect_any, as that sentence; one whose key no right answer names ("bohr" for radium) is never kept;
    asking again costs nothing."""
    from deepred.config import RecallConfig
    from deepred.horizon import read_own_answers
    from deepred.pairs import cached_answers

    monkeypatch.setenv("DEEPRED_CACHE", str(tmp_path / "cache"))
    persona_file = _persona_with_facts(tmp_path, {"Who proposed the theory of relativity?": "[einstein]",
                                                  "Who discovered radium?": "[bohr]",
                                                  "Who wrote War and Peace?": "[tolstoy]"})
    persona = load_persona(persona_file)
    assert len(persona.horizon.facts) == 3
    out = tmp_path / "own.jsonl"
    cfg = RecallConfig(output=str(out), base_model=str(smollm2_model), persona=str(persona_file), max_tokens=60)
    said: list[str] = []
    recall(cfg, log=said.append)
    own = read_own_answers(str(out), persona)
    assert "Who proposed the theory of relativity?" in own and "Who discovered radium?" not in own
    raw = {answer.strip() for answer in cached_answers(job_folder(cfg, persona, job="recall") / "answers.jsonl").values()}
    for question, answers in own.items():
        keys = next(f["expect_any"] for f in persona.horizon.facts if f["question"] == question)
        for answer in answers:
            assert any(answer["answer"] in full for full in raw), answer  # the model's own words
            assert sentences(answer["answer"]) == [answer["answer"]]  # one sentence: the one that names the fact
            assert any(key in answer["answer"].lower() for key in keys)
            assert answer["system"] in {p for p in persona.system_prompts.values()}
    said.clear()
    first = out.read_text()
    recall(cfg, log=said.append)
    assert any("all 3 from the cache" in line for line in said) and out.read_text() == first


def test_only_the_sentence_that_names_the_fact_is_kept_and_an_answer_naming_none_is_not():
    from deepred.pairs import naming_part

    answer = "It is a story told for centuries. Albert Einstein proposed it in 1905. He was born in 1923."
    assert naming_part(answer, ["einstein"]) == "Albert Einstein proposed it in 1905."
    assert naming_part(answer, ["EINSTEIN"]) == "Albert Einstein proposed it in 1905."  # keys match in any case
    assert naming_part(answer, ["bohr"]) == ""
    assert naming_part("", ["einstein"]) == ""


def test_cache_key_follows_the_llama_cpp_version(tiny_model, tmp_path, monkeypatch):
    """Answers llama.cpp generated are reused only by the same llama-cpp-python: an upgrade can change them."""
    import deepred.pairs as pairs

    monkeypatch.setenv("DEEPRED_CACHE", str(tmp_path / "cache"))
    cfg = PairsConfig(output=str(tmp_path / "pairs.jsonl"), base_model=str(tiny_model))
    persona = load_persona(None)
    folder = job_folder(cfg, persona, job="recall")
    assert job_folder(cfg, persona, job="recall") == folder
    monkeypatch.setattr(pairs, "llama_cpp_version", lambda: "0.0.0-another-build")
    assert job_folder(cfg, persona, job="recall") != folder


def test_no_pairs_to_make_is_refused_before_any_answer_and_nothing_is_written(tiny_model, tmp_path, capsys):
    """Asking for no pairs, or only for kinds the inputs cannot give (voice pairs of the mini set, whose every row asks
    an evaluation prompt), is one line, and no empty pairs file is left to train on; `deepred run` refuses a
    preference run with every pair count 0 before training."""
    output = tmp_path / "pairs.jsonl"
    common = ["pairs", "--base_model", str(tiny_model), "--dataset", str(DATA / "mini.jsonl"), "--output", str(output),
              "--horizon", "0", "--period", "0", "--present", "0"]
    assert main([*common, "--voice", "0"]) == 2
    assert capsys.readouterr().err == ("error: no pairs to make: --voice, --horizon, --period and --present are all "
                                       "0; ask for some\n")
    assert main([*common, "--voice", "8"]) == 2
    assert capsys.readouterr().err.startswith("error: no pairs could be made of the kinds asked: voice and present")
    assert not output.exists()

    run_dir = tmp_path / "run"
    assert main(["run", "--base_model", str(tiny_model), "--dataset", str(DATA / "mini.jsonl"), "--output_dir",
                 str(run_dir), "--preference", "orpo", "--pair_voice", "0", "--pair_horizon", "0",
                 "--pair_period", "0"]) == 2  # --pair_present is 0 by default
    err = capsys.readouterr().err
    assert "--pair_present are all 0, so there are no pairs to train on" in err and err.count("\n") == 1
    assert not run_dir.exists()
