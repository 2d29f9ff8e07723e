"""The training examples: tokenized with the model's own chat template (loss on the replies), sampled, cut to the
longest length, and split into training and validation sets."""

from __future__ import annotations

import math
import random

from ..chat_template import ChatFormat, tokenize_examples
from ..data import DatasetReport
from ..errors import DeepRedError


def tokenized_rows(report: DatasetReport, tokenizer, log) -> list[dict]:
    """input_ids and assistant_masks per example: loss on what the model writes (replies and their end-of-turn
    token), located with its own chat template."""
    return tokenize_examples(report.examples, ChatFormat.of(tokenizer, log), report.path)


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
