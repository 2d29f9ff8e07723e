"""`deepred bench --shape tiny`: both profiles train on the same data and the ratio is reported."""

from __future__ import annotations

import json

from deepred.cli import main


def test_bench_tiny_prints_both_profiles_and_the_ratio(tmp_path, capsys, tiny_model):
    out = tmp_path / "bench.json"
    code = main(["bench", "--shape", "tiny", "--examples", "16", "--mean_tokens", "100", "--steps", "1",
                 "--batch_size", "1", "--gradient_accumulation_steps", "2", "--output", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| reference |" in printed and "| fast |" in printed
    assert "ratio (fast / reference):" in printed and printed.strip().endswith("x")
    report = json.loads(out.read_text())
    assert [r["profile"] for r in report["results"]] == ["reference", "fast"]
    for row in report["results"]:
        assert row["tokens_per_second"] > 0 and row["steps"] == 1 and row["tokens"] > 0
    assert report["ratio"] == round(report["results"][1]["tokens_per_second"]
                                    / report["results"][0]["tokens_per_second"], 2)
