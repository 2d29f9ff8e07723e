"""A long fluent answer is not a loop for its length. The share of distinct words falls as any text grows (the
bundled replies run together: about 80 % over 100 words, under 40 % over 2,000), so a 2,000-word answer written at
--max_new_tokens 4096 was 'incoherent' and out of style (a QA pass). The rule now looks at windows of words."""

from __future__ import annotations

import json

from deepred.data import bundled_dataset_path
from deepred.evaluate import score_response
from deepred.evaluate.coherence import coherence_stats
from deepred.evaluate.text import words


def _replies() -> list[str]:
    rows = [json.loads(line) for line in bundled_dataset_path().read_text().splitlines() if line.strip()]
    return [m["content"] for row in rows for m in row["messages"] if m["role"] == "assistant"]


def _first_words(replies: list[str], n: int) -> str:
    taken, count = [], 0
    for reply in replies:  # whole replies, so each sentence stays grammatical
        taken.append(reply)
        count += len(reply.split())
        if count >= n:
            break
    return " ".join(taken)


def test_a_long_fluent_answer_is_coherent_and_in_style():
    text = _first_words(_replies(), 2000)
    lowered = [w.lower() for w in words(text)]
    assert len(set(lowered)) / len(lowered) < 0.4  # the whole text's share: what the rule used to read
    entry = score_response(text, "Tell me everything about our mission, comrade.", "mission")
    assert entry["coherent"] and entry["in_style"], entry


def test_a_long_loop_still_fails_however_long():
    sentence = _replies()[0].split()[:20]  # 20 words said 100 times: at most 20 distinct in any 100
    stats = coherence_stats(" ".join(sentence * 100))
    assert stats["distinct_word_ratio"] <= 20 / 100
    assert not score_response(" ".join(sentence * 100), "What is our mission?", "mission")["coherent"]


def test_a_short_answer_is_one_window():
    text = "The board is set and every piece has its square, comrade; the board rewards patience."
    lowered = [w.lower() for w in words(text)]
    assert len(lowered) == 15 and coherence_stats(text)["distinct_word_ratio"] == round(13 / 15, 4)  # "the", "board" twice
