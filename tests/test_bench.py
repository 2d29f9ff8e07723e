"""`deepred bench --shape tiny`: every profile trains the same examples in the same order; medians, spread, loss
curves and the profiler's top operations are reported."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from deepred.cli import main


def test_bench_tiny_compares_profiles_on_the_same_examples(tmp_path, capsys, tiny_model):
    out = tmp_path / "bench.json"
    code = main(["bench", "--shape", "tiny", "--examples", "16", "--mean_tokens", "100", "--steps", "2",
                 "--batch_size", "2", "--gradient_accumulation_steps", "2", "--repeats", "2", "--trace",
                 "--output", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| reference |" in printed and "| fast |" in printed
    assert "ratio (fast / reference, medians):" in printed and printed.strip().endswith("x")
    report = json.loads(out.read_text())
    assert [(r["profile"], r["repeat"]) for r in report["results"]] == [
        ("reference", 0), ("fast", 0), ("reference", 1), ("fast", 1)]  # interleaved
    for row in report["results"]:
        assert row["tokens_per_second"] > 0 and row["steps"] == 2 and len(row["losses"]) == 3
    summary = report["summary"]
    # the same examples in the same timed window: the same number of real tokens, whatever the batch layout
    assert summary["reference"]["tokens"] == summary["fast"]["tokens"] and len(summary["fast"]["tokens"]) == 1
    speeds = sorted(r["tokens_per_second"] for r in report["results"] if r["profile"] == "fast")
    assert summary["fast"]["median_tokens_per_second"] == round(sum(speeds) / 2, 1)  # median of two
    assert (summary["fast"]["min_tokens_per_second"], summary["fast"]["max_tokens_per_second"]) == tuple(speeds)
    # same initial weights, same examples: the loss curves differ only by dropout and the order of additions
    assert summary["fast"]["max_loss_gap_vs_reference"] < 0.05
    assert report["ratio"] == round(summary["fast"]["median_tokens_per_second"]
                                    / summary["reference"]["median_tokens_per_second"], 2)
    traced = [r for r in report["results"] if r["trace"]]
    assert [(r["profile"], r["repeat"]) for r in traced] == [("reference", 0), ("fast", 0)]
    assert all(op["calls"] > 0 and op["self_ms"] >= 0 for op in traced[0]["trace"])
    assert [r["batch_plan"]["loss"] for r in report["results"][:2]] == ["trl", "supervised"]
    assert report["model_flops_per_token"] > 0 and report["results"][0]["mfu"] is None  # no GPU peak on a CPU


@pytest.mark.parametrize("when", ["while building the model", "while training"])
def test_bench_stopped_by_sigterm_exits_130_with_one_line(tiny_model, when):
    """`timeout -s TERM` or a scheduler stops the bench as Ctrl-C would: exit 130, one line, no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "deepred.cli", "bench", "--shape", "tiny", "--examples", "16",
                             "--mean_tokens", "100", "--steps", "200", "--batch_size", "2",
                             "--gradient_accumulation_steps", "1", "--profiles", "fast"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(iter(lambda: proc.stderr.read(1), "")), daemon=True)
    reader.start()
    assert proc.stdout.readline().startswith("bench: shape tiny")  # printed before the model is built
    deadline = time.monotonic() + 240
    while when == "while training" and "step/s" not in "".join(err) and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=240) == 130
    reader.join(timeout=30)
    lines = [line for line in "".join(err).replace("\r", "\n").splitlines() if line and "step/s" not in line]
    assert lines[-1] == "bench interrupted before it finished: nothing was measured or written"
    assert "Traceback" not in "".join(err) and len([line for line in lines if "interrupted" in line]) == 1
