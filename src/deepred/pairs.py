"""`deepred pairs`: preference pairs from what the user already has, the dataset and the persona file; and
`deepred recall`, the base model's own right answers to the persona's period facts.

- Voice pairs: a dataset conversation up to its last user turn; chosen = the dataset's persona reply, rejected = the
  base model's own answer to the same conversation.
- Horizon pairs: a question about what lies after the persona's cutoff (horizon.py, and the dataset's own rows
  whose reply deflects); chosen = the in-character deflection, rejected = the base model's answer, which on such
  questions describes the event as if known; where the persona dates its horizon, that answer opens with the
  dating sentence that places the subject within the horizon (the wrong decision for its year).
- Period pairs: one of the persona's period facts; chosen = its in-character answer, rejected = an in-character
  deflection, dated beyond the horizon where the fact has a year. They hold the other side of the line, so
  preference training does not learn to deflect everything (no base-model answer needed).
- Present pairs: a dataset conversation not about later years whose reply does not deflect; chosen = that reply,
  rejected = an in-character deflection dated beyond the horizon (no base-model answer needed). They hold the
  persona's own world on the near side of the line.

`deepred recall` asks the base model the persona's period facts the same way and keeps the sentence of each right
answer that names the fact (its `expect_any`): SFT's period rows can then answer what the model knows in its own
words (`--period_answers`).

The base model answers through the existing inference path: its GGUF (export.convert) served by `deepred serve`
(serve.start_server) and asked through the OpenAI-compatible client the evaluation uses. Answers are appended to a
cache file keyed by the base model's and the inputs' hashes, so an interrupted job resumes where it stopped and a
repeated one costs nothing; the pairs file is written atomically once every answer is in.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from .config import ConvertConfig, PairsConfig, RecallConfig
from .data import load_for_training
from .errors import DeepRedError
from .evaluate.endpoint import chat_with_retries, openai_client
from .evaluate.temporal import deflects, infer_temporal_kind, temporal_check
from .evaluate.text import sentences
from .export.convert import convert
from .files import file_sha256, hash_path, write_atomic
from .horizon import horizon_pairs, period_pairs, present_pairs, training_system_prompts
from .llama_runtime import llama_cpp_version
from .models.cache import cache_dir
from .models.registry import local_model_dir
from .persona import Persona, load_persona
from .prompts import prompt_key, protected_prompts, refuse_evaluation_prompts
from .serve import start_server

MODEL_ALIAS = "base"
SOURCES = ("voice", "horizon", "period", "present")
PAIRS_RECIPE = 2  # how pairs are made from their inputs; a new recipe makes `deepred run` make them again


def candidates(cfg: PairsConfig, persona: Persona, log) -> tuple[list[dict], str]:
    """Prompts with their chosen answer, before the base model answers ({key, prompt, chosen, source}), and the
    dataset's sha256."""
    report, data_hash = load_for_training(cfg.dataset, skip_invalid=False, log=log)
    rng = random.Random(cfg.seed)
    protected = protected_prompts(persona)
    voice, temporal, held = [], [], []
    for example in report.examples:
        *prompt, reply = example["messages"]
        if prompt_key(prompt[-1]["content"]) in protected:
            held.append(str(example["line"]))
            continue
        later = infer_temporal_kind(prompt[-1]["content"], persona) == persona.later_kind
        deflecting = deflects(reply["content"], persona)
        row = {"prompt": prompt, "chosen": [reply], "line": example["line"], "timeless": not later and not deflecting}
        (temporal if later and deflecting else voice).append(row)
    rng.shuffle(voice)
    made = [{**row, "source": "voice"} for row in voice[:cfg.voice]]
    # present pairs: the rows voice pairs did not take first, then those it did (another rejected side)
    made += present_pairs(persona, [row for row in voice[cfg.voice:] + voice[:cfg.voice] if row["timeless"]]
                          [:cfg.present], cfg.seed)
    made += [{**row, "source": "horizon"} for row in temporal[:cfg.horizon]]
    made += horizon_pairs(persona, max(0, cfg.horizon - len(temporal)), cfg.seed)
    if held:
        log(f"left out {len(held)} dataset row(s) that ask one of the persona's evaluation prompts (line "
            f"{', '.join(held)}): pairs never train on the test")
    made += period_pairs(persona, cfg.period, cfg.seed)
    refuse_evaluation_prompts(made, persona, report.path)
    return [{**row, "key": conversation_key(row["prompt"])} for row in made], data_hash


def conversation_key(messages: list[dict]) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:24]


def job_folder(cfg: PairsConfig | RecallConfig, persona: Persona, **inputs) -> Path:
    """The cache of this job: same base model, persona, inputs and settings, same folder. Answers are kept per
    conversation, so asking for more pairs generates only the new ones."""
    base = Path(local_model_dir(cfg.base_model))
    identity = {"base": hash_path(base, ignore=frozenset({"README.md"})), "persona": file_sha256(persona.file),
                "max_tokens": cfg.max_tokens, "quant_type": cfg.quant_type, "llama_cpp": llama_cpp_version(),
                **inputs}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "pairs" / digest


def cached_answers(path: Path) -> dict[str, str]:
    """key -> answer from the job's answer log (a line cut by a kill is ignored)."""
    answers = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            answers[row["key"]] = row["answer"]
    return answers


def base_answers(rows: list[dict], cfg: PairsConfig, folder: Path, log) -> dict[str, str]:
    """The base model's answer to every prompt, from the cache or generated now (progress bar, appended as they
    come)."""
    from tqdm.auto import tqdm

    log_file = folder / "answers.jsonl"
    answers = cached_answers(log_file)
    asked = [row for row in rows if "rejected" not in row]  # period pairs bring their own rejected side
    todo = [row for row in asked if row["key"] not in answers]
    if not todo:
        log(f"base answers: all {len(asked)} from the cache ({folder})")
        return answers
    log(f"base answers: {len(asked) - len(todo)} cached, {len(todo)} to generate with {cfg.base_model} (llama.cpp)")
    gguf = folder / f"base-{cfg.quant_type}.gguf"
    if not gguf.is_file():
        convert(ConvertConfig(model_path=local_model_dir(cfg.base_model), output_path=str(gguf),
                              quant_type=cfg.quant_type, check=False), log=log)
    with start_server({MODEL_ALIAS: gguf}) as server, open(log_file, "a", encoding="utf-8") as out:
        if ends_mid_line(log_file):
            out.write("\n")  # a line cut by a kill ends here, or the next answer would be glued to it and lost
        client = openai_client(server.url, None, timeout=300.0)
        for row in tqdm(todo, desc="base answers", unit="prompt", dynamic_ncols=True):
            answer = chat_with_retries(client, MODEL_ALIAS, row["prompt"], max_tokens=cfg.max_tokens,
                                       temperature=0.0, retries=2)
            if answer.error:
                raise DeepRedError(f"the base model did not answer ({answer.error}); run `deepred pairs` again to "
                                   "resume from the answers kept")
            answers[row["key"]] = answer.response
            out.write(json.dumps({"key": row["key"], "answer": answer.response}) + "\n")
            out.flush()
    return answers


def ends_mid_line(path: Path) -> bool:
    """Whether the file's last byte is not a newline (its last line was cut), reading that byte alone."""
    with open(path, "rb") as fh:
        if fh.seek(0, 2) == 0:
            return False
        fh.seek(-1, 2)
        return fh.read(1) != b"\n"


def make_pairs(cfg: PairsConfig, log=print) -> Path:
    """Write the pairs file; returns its path. Pairs whose base answer is empty or the same as the chosen one are
    left out (and counted)."""
    persona = load_persona(cfg.persona)
    if not cfg.voice + cfg.horizon + cfg.period + cfg.present:
        raise DeepRedError("no pairs to make: --voice, --horizon, --period and --present are all 0; ask for some")
    rows, data_hash = candidates(cfg, persona, log)
    if not rows:
        raise DeepRedError(f"no pairs could be made of the kinds asked: voice and present pairs need dataset rows that "
                           f"do not ask an evaluation prompt, horizon and period pairs the persona's horizon "
                           f"({persona.file}); ask for other kinds or use another dataset")
    folder = job_folder(cfg, persona, dataset=data_hash, seed=cfg.seed)
    folder.mkdir(parents=True, exist_ok=True)
    answers = base_answers(rows, cfg, folder, log)
    pairs, dropped = [], 0
    for row in rows:
        rejected = row["rejected"][0]["content"] if "rejected" in row else answers[row["key"]].strip()
        if not rejected or rejected == row["chosen"][0]["content"].strip():
            dropped += 1
            continue
        if row.get("wrong_side"):  # the base answer, opened by the dating sentence that decides the wrong way
            rejected = f"{row['wrong_side']} {rejected}"
        pairs.append({"prompt": row["prompt"], "chosen": row["chosen"],
                      "rejected": [{"role": "assistant", "content": rejected}], "source": row["source"]})
    if not pairs:
        raise DeepRedError(f"no pairs: the base model's answer was empty or the chosen one for all {dropped}; nothing "
                           f"was written to {cfg.output}")
    output = Path(cfg.output)
    write_atomic(output, "".join(json.dumps(pair, ensure_ascii=False) + "\n" for pair in pairs))
    counts = {source: sum(p["source"] == source for p in pairs) for source in SOURCES}
    log(f"wrote {output}: {len(pairs)} pairs ("
        + ", ".join(f"{counts[source]} {source}" for source in SOURCES if counts[source] or source != "present") + ")"
        + (f"; {dropped} left out (the base model's answer was empty or the chosen one)" if dropped else ""))
    return output


def recall(cfg: RecallConfig, log=print) -> Path:
    """Ask the base model each period fact that says what a right answer names (expect_any), under the persona's
    training system prompts in turn, and write the answers that are right and show no later knowledge, as
    {question, system, answer}. Each answer is kept as its sentence that names the fact. Cached like the pairs."""
    persona = load_persona(cfg.persona)
    protected = protected_prompts(persona)
    facts = [fact for fact in (persona.horizon.facts if persona.horizon else [])
             if fact.get("expect_any") and prompt_key(fact["question"]) not in protected]
    if not facts:
        raise DeepRedError(f"{persona.file}: no period fact says what its right answer names (knowledge.horizon.facts: "
                           "expect_any); add them to tell which facts the base model knows")
    systems = training_system_prompts(persona)
    rows = []
    for i, fact in enumerate(facts):  # one system prompt each, in turn: one answer per fact keeps the job short
        prompt = [{"role": "system", "content": systems[i % len(systems)]}, {"role": "user", "content": fact["question"]}]
        rows.append({"prompt": prompt, "key": conversation_key(prompt), "fact": fact})
    folder = job_folder(cfg, persona, job="recall")
    folder.mkdir(parents=True, exist_ok=True)
    answers = base_answers(rows, cfg, folder, log)
    kept = []
    for row in rows:
        fact = row["fact"]
        answer = naming_part(answers[row["key"]], fact["expect_any"])
        if answer and not temporal_check(answer, fact["question"], "control", fact["expect_any"], persona)["violation"]:
            kept.append({"question": fact["question"], "system": row["prompt"][0]["content"], "answer": answer})
    output = Path(cfg.output)
    write_atomic(output, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in kept))
    known = len({row["question"] for row in kept})
    log(f"wrote {output}: {cfg.base_model} answered {known} of {len(facts)} period facts right ({len(kept)} of "
        f"{len(rows)} answers); training answers those in the model's own words, the others in the persona's")
    return output


def naming_part(text: str, keys: list[str]) -> str:
    """The first sentence of the answer that names one of `keys`, or "" when none does: only that sentence was
    checked; what a small model adds around it is often invented ("Capablanca … born in 1923") or filler."""
    for sentence in sentences(text):
        if any(key.lower() in sentence.lower() for key in keys):
            return sentence
    return ""
