"""Training throughput: the specification's reference settings against the product's default, same data, same run.

A random-weight model with the exact shape of a named model (no download) trains on a synthetic ChatML set whose
lengths follow a realistic distribution, once per profile, through the same `train()` the product uses.
Throughput counts real (non-padding) tokens after a warm-up step; peak memory is the GPU's (or the process's RSS
on a CPU).
"""

from __future__ import annotations

import json
import random
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .config import TrainConfig
from .errors import DeepRedError
from .files import write_json

# Qwen2.5 shapes: hidden, layers, heads, kv heads, intermediate, tied embeddings.
SHAPES = {
    "tiny": (256, 2, 4, 2, 512, True),
    "qwen2.5-0.5b": (896, 24, 14, 2, 4864, True),
    "qwen2.5-1.5b": (1536, 28, 12, 2, 8960, True),
    "qwen2.5-7b": (3584, 28, 28, 4, 18944, False),
    "qwen2.5-14b": (5120, 48, 40, 8, 13824, False),
}
ALIASES = {"0.5b": "qwen2.5-0.5b", "1.5b": "qwen2.5-1.5b", "7b": "qwen2.5-7b", "14b": "qwen2.5-14b"}
# The same names as `deepred train --profile`; `fast` is the product's default.
PROFILES = ("reference", "fast", "lean")


@dataclass
class BenchResult:
    profile: str
    tokens_per_second: float
    peak_memory_gib: float | None
    steps: int
    tokens: int
    seconds: float
    mean_train_loss: float | None


def make_shape_model(shape: str, out_dir: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from .tinymodel import QWEN25_VOCAB_SIZE, cached_qwen25_tokenizer_dir

    hidden, layers, heads, kv_heads, intermediate, tied = SHAPES[shape]
    config = Qwen2Config(vocab_size=QWEN25_VOCAB_SIZE, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         tie_word_embeddings=tied, max_position_embeddings=32768, rope_theta=1_000_000.0,
                         bos_token_id=151643, eos_token_id=151645, initializer_range=0.02)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(config).to(dtype)
    model.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(cached_qwen25_tokenizer_dir()).save_pretrained(out_dir)
    del model
    return out_dir


def synthetic_chatml(path: Path, examples: int, mean_tokens: int, seed: int = 0) -> Path:
    """ChatML examples built from the bundled data's words, lengths log-normal around `mean_tokens`."""
    from .data import bundled_dataset_path

    rng = random.Random(seed)
    rows = [json.loads(line) for line in bundled_dataset_path().read_text().splitlines() if line.strip()]
    words = " ".join(m["content"] for r in rows for m in r["messages"] if m["role"] == "assistant").split()
    system = rows[0]["messages"][0]["content"]
    with open(path, "w") as fh:
        for _ in range(examples):
            # ~1.3 tokens a word; the system prompt and template take ~70 tokens
            n_words = max(8, int(rng.lognormvariate(0, 0.45) * max(10, mean_tokens - 70) / 1.3))
            user = " ".join(rng.choices(words, k=max(4, n_words // 5))) + "?"
            reply = " ".join(rng.choices(words, k=n_words))
            fh.write(json.dumps({"messages": [{"role": "system", "content": system}, {"role": "user", "content": user},
                                              {"role": "assistant", "content": reply}]}) + "\n")
    return path


def _timing_callback(warmup_steps: int):
    from transformers import TrainerCallback

    class Timing(TrainerCallback):
        def __init__(self):
            self.start_time = self.start_tokens = None
            self.end_time = self.end_tokens = None
            self.steps = 0

        def on_step_end(self, args, state, control, **kwargs):
            _sync()
            if state.global_step == warmup_steps:
                self.start_time, self.start_tokens = time.perf_counter(), state.num_input_tokens_seen
            elif state.global_step > warmup_steps:
                self.end_time, self.end_tokens = time.perf_counter(), state.num_input_tokens_seen
                self.steps = state.global_step - warmup_steps

    return Timing()


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_memory_gib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux; process-wide peak


def run_profile(name: str, model_dir: Path, dataset: Path, work: Path, steps: int, batch_size: int,
                accumulation: int, max_seq_length: int, log=print) -> BenchResult:
    from .train import train

    timing = _timing_callback(warmup_steps=1)
    cfg = TrainConfig(base_model=str(model_dir), dataset=str(dataset), output_dir=str(work / name),
                      profile=name, max_steps=steps + 1, batch_size=batch_size,
                      gradient_accumulation_steps=accumulation, max_seq_length=max_seq_length, val_split=0,
                      save_steps=10**9, logging_steps=1, lora_r=32, lora_alpha=64, learning_rate=5e-5)
    _reset_peak_memory()
    result = train(cfg, log=lambda *a, **k: None, callbacks=(timing,))
    seconds = timing.end_time - timing.start_time
    tokens = timing.end_tokens - timing.start_tokens
    loss = result.metrics.get("train_loss")
    out = BenchResult(name, round(tokens / seconds, 1), round(_peak_memory_gib(), 2), timing.steps, int(tokens),
                      round(seconds, 2), loss)
    log(f"  {name}: {out.tokens_per_second:,.0f} tokens/s over {out.steps} steps, peak memory {out.peak_memory_gib} GiB")
    return out


def bench(shape: str = "tiny", profiles: tuple[str, ...] = ("reference", "fast"), examples: int = 256,
          steps: int = 4, batch_size: int = 4, accumulation: int = 4, mean_tokens: int = 268,
          max_seq_length: int = 1024, output: str | None = None, log=print) -> dict:
    import torch

    shape = ALIASES.get(shape.lower(), shape.lower())
    if shape not in SHAPES:
        raise DeepRedError(f"unknown --shape {shape}; choose one of {', '.join(SHAPES)}")
    unknown = [p for p in profiles if p not in PROFILES]
    if unknown:
        raise DeepRedError(f"unknown profile(s) {', '.join(unknown)}; choose from {', '.join(PROFILES)}")
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    work = Path(tempfile.mkdtemp(prefix="deepred-bench-"))
    try:
        log(f"bench: shape {shape} on {device}; {examples} synthetic examples, mean {mean_tokens} tokens; "
            f"effective batch {batch_size} x {accumulation}; {steps} timed steps per profile after 1 warm-up")
        model_dir = make_shape_model(shape, work / "model")
        dataset = synthetic_chatml(work / "data.jsonl", examples, mean_tokens)
        results = [run_profile(p, model_dir, dataset, work, steps, batch_size, accumulation, max_seq_length, log)
                   for p in profiles]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    by_name = {r.profile: r for r in results}
    report = {"shape": shape, "device": device, "date": time.strftime("%Y-%m-%d"), "examples": examples,
              "mean_tokens": mean_tokens, "effective_batch": batch_size * accumulation, "timed_steps": steps,
              "results": [r.__dict__ for r in results]}
    if "reference" in by_name and "fast" in by_name:
        report["ratio"] = round(by_name["fast"].tokens_per_second / by_name["reference"].tokens_per_second, 2)
    log(format_table(report))
    if output:
        write_json(Path(output), report)
    return report


def format_table(report: dict) -> str:
    memory_label = "peak GPU GiB" if report["device"] != "CPU" else "peak RSS GiB"
    lines = [f"| profile | tokens/s | {memory_label} | mean train loss |", "| --- | --- | --- | --- |"]
    for r in report["results"]:
        loss = f"{r['mean_train_loss']:.3f}" if r["mean_train_loss"] is not None else "-"
        lines.append(f"| {r['profile']} | {r['tokens_per_second']:,.0f} | {r['peak_memory_gib']} | {loss} |")
    if "ratio" in report:
        lines.append(f"ratio (fast / reference): {report['ratio']:.1f}x")
    return "\n".join(lines)
