"""The training examples: read and validated (ChatML examples for SFT, preference pairs for DPO), tokenized with the
model's own chat template (loss on the replies), sampled, cut to the longest length, and split into training and
validation sets.

A pair's two conversations (prompt + chosen, prompt + rejected) are tokenized the way SFT rows are: its completion
is exactly what the model writes for the final reply, the reply and its end-of-turn token, and nothing of the
prompt, the role headers or the template's trailing text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random

from ..chat_template import ChatFormat, TemplateError, refusal_line, tokenize_each
from ..config import TrainConfig
from ..data import DatasetReport, load_for_training, summarize, token_statistics, vary_system_prompts
from ..errors import DeepRedError
from ..horizon import horizon_examples, read_own_answers
from ..pairs_data import load_pairs_for_training, summarize_pairs
from ..persona import load_persona
from ..prompts import refuse_evaluation_prompts


def load_data(cfg: TrainConfig, log):
    """(report, sha256) of what this method trains on: the ChatML dataset (with --horizon_examples, plus the rows
    made from the persona's horizon, and the hash covers them), or the preference pairs."""
    if cfg.method != "sft":
        if not cfg.pairs:
            raise DeepRedError(f"--method {cfg.method} needs --pairs FILE, preference pairs {{prompt, chosen, rejected}} "
                               "(`deepred pairs` makes them from your dataset and persona)")
        report, data_hash = load_pairs_for_training(cfg.pairs, cfg.skip_invalid, log)
        refuse_evaluation_prompts(report.pairs, load_persona(cfg.persona), report.path)
        return report, data_hash
    if cfg.period_answers and cfg.horizon_examples <= 0:
        raise DeepRedError("--period_answers answers the period rows of --horizon_examples; add --horizon_examples N "
                           "(e.g. 200) or leave --period_answers out")
    report, data_hash = load_for_training(cfg.dataset, cfg.skip_invalid, log)
    if cfg.horizon_examples > 0:
        report, data_hash = with_horizon(report, data_hash, cfg, log)
    if cfg.system_prompt_variants:  # a negative share must reach the check, not be skipped
        report, data_hash = with_system_variants(report, data_hash, cfg, log)
    return report, data_hash


REPEATS_WORTH_SAYING = 3  # horizon rows repeated this often on average crowd out the dataset's own voice


def with_horizon(report: DatasetReport, data_hash: str, cfg: TrainConfig, log) -> tuple[DatasetReport, str]:
    persona = load_persona(cfg.persona)
    if persona.horizon is None:
        raise DeepRedError(f"--horizon_examples: the persona file {persona.file} has no knowledge.horizon section "
                           "(topics, questions, replies); add one (see resources/personas/deepred.yaml)")
    own = read_own_answers(cfg.period_answers, persona) if cfg.period_answers else None
    rows = horizon_examples(persona, cfg.horizon_examples, cfg.seed, own_answers=own)
    added = [{"messages": row["messages"], "line": f"horizon-{i}"} for i, row in enumerate(rows, 1)]
    period = sum(r['source'] == 'period' for r in rows)
    log(f"--horizon_examples {cfg.horizon_examples}: {len(rows)} examples added from {persona.file.name} "
        f"({sum(r['source'] == 'horizon' for r in rows)} questions about later years, {period} period facts"
        + (f", the {len(own)} the model knows in its own words from {cfg.period_answers})" if own is not None else ")"))
    distinct = len({json.dumps(row["messages"]) for row in rows})
    if distinct * REPEATS_WORTH_SAYING < len(rows):
        log(f"note: the {len(rows)} horizon examples hold only {distinct} different conversations (each about "
            f"{len(rows) / distinct:.0f} times), beside {len(report.examples)} from {report.path.name}; add topics, "
            "years, questions or facts to the persona file's horizon, or lower --horizon_examples")
    combined = extended_hash(data_hash, rows)
    return dataclasses.replace(report, examples=report.examples + added, turns=report.turns + 3 * len(rows)), combined


def with_system_variants(report: DatasetReport, data_hash: str, cfg: TrainConfig, log) -> tuple[DatasetReport, str]:
    examples, shortened, dropped = vary_system_prompts(report.examples, cfg.system_prompt_variants, cfg.seed)
    log(f"--system_prompt_variants {cfg.system_prompt_variants}: {shortened} examples keep only the first sentence of "
        f"their system prompt, {dropped} have none (the chat template's default applies)")
    return dataclasses.replace(report, examples=examples, turns=report.turns - dropped), extended_hash(data_hash, examples)


def extended_hash(data_hash: str, examples: list[dict]) -> str:
    """The data hash once the dataset's examples are added to or changed: a run on other data is not resumed."""
    return hashlib.sha256((data_hash + json.dumps([e["messages"] for e in examples])).encode()).hexdigest()


def training_rows(cfg: TrainConfig, report, tokenizer, log) -> list[dict]:
    """The method's rows, tokenized with the model's own chat template."""
    fmt = ChatFormat.of(tokenizer, log)
    if cfg.method != "sft":
        return pair_rows(report.pairs, fmt, report.path)
    rows, refused = tokenize_each(report.examples, fmt, report.path)
    if not refused:
        return rows
    if rows and (len(refused) > 1 or cfg.skip_invalid):  # some conversations only; all of them: the template, once
        for problem in refused.values():
            log(problem)
    if not (cfg.skip_invalid and rows):
        raise TemplateError(refusal_line(refused) + (f"; fix the example(s) or pass --skip_invalid to train on the "
                                                     f"other {len(rows)}" if rows else ""))
    log(f"--skip_invalid: dropped {len(refused)} example(s) the chat template refuses, training on {len(rows)}")
    report.refuse(refused)  # the data summary counts them
    return rows


def row_length(row: dict) -> int:
    return pair_length(row) if "prompt_ids" in row else len(row["input_ids"])


def describe(report, lengths: list[int], max_seq_length: int) -> str:
    """The data summary: examples or pairs, and their token lengths."""
    if hasattr(report, "pairs"):
        return "\n".join([summarize_pairs(report), *token_statistics(lengths, max_seq_length)])
    return summarize(report, lengths, max_seq_length)


def cut_rows(rows: list[dict], max_seq_length: int, log) -> list[dict]:
    if rows and "prompt_ids" in rows[0]:
        return truncate_pairs(rows, max_seq_length, log)
    return truncate_rows(rows, max_seq_length, log)


def sample(examples: list[dict], max_samples: int | None, seed: int, log) -> list[dict]:
    if max_samples is None or max_samples >= len(examples):
        return examples
    if max_samples < 1:
        raise DeepRedError(f"--max_samples must be at least 1 (got {max_samples})")
    chosen = sorted(random.Random(seed).sample(range(len(examples)), max_samples))
    log(f"--max_samples {max_samples}: training on a seeded sample of {max_samples} of {len(examples)} examples")
    return [examples[i] for i in chosen]


def truncate_rows(rows: list[dict], max_seq_length: int, log) -> list[dict]:
    """Cut tokenized rows to --max_seq_length, leaving out (and saying so) those whose whole reply is cut off: they
    carry no loss."""
    cut = [{key: value[:max_seq_length] for key, value in row.items()} for row in rows]
    kept = [row for row in cut if any(row["assistant_masks"])]
    if len(kept) < len(cut):
        log(f"{len(cut) - len(kept)} example(s) have no reply token within --max_seq_length {max_seq_length} and are "
            "left out of training; raise --max_seq_length to keep them")
    if not kept:
        raise DeepRedError(f"no example has a reply token within --max_seq_length {max_seq_length}; raise it")
    return kept


def split(rows: list[dict], val_split: float, seed: int):
    """Hold out a seeded validation split of tokenized rows (input_ids, assistant_masks): (train, eval or None)."""
    from datasets import Dataset

    dataset = Dataset.from_list(rows)
    n_val = math.ceil(len(rows) * val_split) if val_split > 0 else 0
    if n_val == 0 or len(rows) - n_val < 1:
        return dataset, None
    held_out = dataset.train_test_split(test_size=n_val, seed=seed, shuffle=True)
    return held_out["train"], held_out["test"]


def quiet_dataset_maps() -> None:
    """TRL's label/truncation passes over a few hundred rows take milliseconds; their progress bars are noise."""
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()


# ---------------------------------------------------------------------------------------------------------------
# preference pairs


def last_reply_span(mask: list[int]) -> tuple[int, int]:
    """[start, end) of the last run of supervised tokens: the final reply and its end-of-turn token."""
    end = max(i for i, m in enumerate(mask) if m) + 1
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return start, end


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def pair_row(pair: dict, fmt: ChatFormat) -> dict:
    """prompt_ids, chosen_ids, rejected_ids of one pair: prompt + completion is each conversation's rendering up to
    the end of its final reply's end-of-turn token."""
    prompt = pair["prompt"]
    rendered = []
    for side in ("chosen", "rejected"):
        tokens = fmt.tokenize(prompt + pair[side])
        start, end = last_reply_span(tokens["assistant_masks"])
        rendered.append((tokens["input_ids"][:end], start))
    (chosen, chosen_start), (rejected, rejected_start) = rendered
    # The prompt's tokens are the same on both sides unless a token merges across the reply's first character
    cut = min(chosen_start, rejected_start, common_prefix(chosen, rejected))
    return {"prompt_ids": chosen[:cut], "chosen_ids": chosen[cut:], "rejected_ids": rejected[cut:]}


def pair_rows(pairs: list[dict], fmt: ChatFormat, source: object) -> list[dict]:
    """Every pair tokenized; a template problem is reported as SOURCE:LINE of the pair."""
    rows = []
    for pair in pairs:
        try:
            rows.append(pair_row(pair, fmt))
        except TemplateError as exc:
            raise TemplateError(f"{source}:{pair.get('line', '?')}: {exc}") from exc
    return rows


def pair_length(row: dict) -> int:
    """Tokens of the longer of a pair's two sequences."""
    return len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"]))


def truncate_pairs(rows: list[dict], max_seq_length: int, log) -> list[dict]:
    """Cut completions so that prompt + completion fits --max_seq_length; pairs whose prompt alone fills it carry no
    completion and are left out (and said)."""
    kept = []
    for row in rows:
        room = max_seq_length - len(row["prompt_ids"])
        if room > 0:
            kept.append({**row, "chosen_ids": row["chosen_ids"][:room], "rejected_ids": row["rejected_ids"][:room]})
    if len(kept) < len(rows):
        log(f"{len(rows) - len(kept)} pair(s) have a prompt of --max_seq_length {max_seq_length} tokens or more and "
            "are left out; raise --max_seq_length to keep them")
    if not kept:
        raise DeepRedError(f"no pair has room for a completion within --max_seq_length {max_seq_length}; raise it")
    return kept
