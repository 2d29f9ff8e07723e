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
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .config import TrainConfig
from .data import bundled_dataset_path
from .errors import DeepRedError, sigterm_as_interrupt
from .files import write_json
from .models.tiny import QWEN25_VOCAB_SIZE, cached_qwen25_tokenizer_dir
from .train import train

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


# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, for model FLOPs utilisation; matched in order.
PEAK_BF16_FLOPS = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12),
                   ("A100", 312e12), ("L40S", 362e12), ("RTX 4090", 165e12))


@dataclass
class BenchResult:
    profile: str
    repeat: int
    tokens_per_second: float
    peak_memory_gib: float | None
    steps: int
    tokens: int
    seconds: float
    mean_train_loss: float | None
    losses: list[float]  # per optimizer step, warm-up included
    batch_plan: dict
    mfu: float | None = None
    trace: list[dict] | None = None


def make_shape_model(shape: str, out_dir: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

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


def _timing_callback(warmup_steps: int, trace: bool):
    from transformers import TrainerCallback

    class Timing(TrainerCallback):
        """Real tokens and wall time after the warm-up step; with `trace`, the PyTorch profiler over the first two
        timed steps (where the time of a step goes)."""

        def __init__(self):
            self.start_time = self.start_tokens = None
            self.end_time = self.end_tokens = None
            self.steps = 0
            self.profiler = None
            self.trace = None
            self.losses = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(round(logs["loss"], 5))

        def on_step_begin(self, args, state, control, **kwargs):
            if trace and state.global_step == warmup_steps and self.profiler is None:
                import torch

                activities = [torch.profiler.ProfilerActivity.CPU]
                if torch.cuda.is_available():
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                self.profiler = torch.profiler.profile(activities=activities)
                self.profiler.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            _sync()
            if state.global_step == warmup_steps:
                self.start_time, self.start_tokens = time.perf_counter(), state.num_input_tokens_seen
            elif state.global_step > warmup_steps:
                self.end_time, self.end_tokens = time.perf_counter(), state.num_input_tokens_seen
                self.steps = state.global_step - warmup_steps
            if self.profiler is not None and self.trace is None and state.global_step == warmup_steps + 2:
                self.profiler.__exit__(None, None, None)
                self.trace = top_operations(self.profiler)

    return Timing()


def top_operations(profiler, rows: int = 15) -> list[dict]:
    """The operations that took the most time (self time: device time on a GPU, else CPU) with their call counts:
    many short calls of one kernel is launch overhead, few long ones is compute."""
    import torch

    device = torch.cuda.is_available()
    key = "self_device_time_total" if device else "self_cpu_time_total"
    events = sorted(profiler.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)[:rows]
    return [{"name": e.key, "calls": e.count, "self_ms": round(getattr(e, key, 0) / 1000, 2)} for e in events]


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
                accumulation: int, max_seq_length: int, repeat: int = 0, trace: bool = False,
                flops_per_token: float | None = None, attn_implementation: str = "auto", log=print) -> BenchResult:
    timing = _timing_callback(warmup_steps=1, trace=trace)
    out_dir = work / f"{name}-{repeat}"
    cfg = TrainConfig(base_model=str(model_dir), dataset=str(dataset), output_dir=str(out_dir),
                      profile=name, max_steps=steps + 1, batch_size=batch_size,
                      gradient_accumulation_steps=accumulation, max_seq_length=max_seq_length, val_split=0,
                      save_steps=10**9, logging_steps=1, lora_r=32, lora_alpha=64, learning_rate=5e-5,
                      attn_implementation=attn_implementation)
    _reset_peak_memory()
    result = train(cfg, log=lambda *a, **k: None, callbacks=(timing,))
    if result.interrupted or timing.end_time is None:  # stopped by a signal before the timed steps ended
        raise KeyboardInterrupt
    seconds = timing.end_time - timing.start_time
    tokens = timing.end_tokens - timing.start_tokens
    run_config = json.loads((out_dir / "run_config.json").read_text())
    speed, peak = tokens / seconds, _peak_flops()
    out = BenchResult(name, repeat, round(speed, 1), round(_peak_memory_gib(), 2), timing.steps, int(tokens),
                      round(seconds, 2), result.metrics.get("train_loss"), timing.losses, run_config["batch_plan"],
                      round(speed * flops_per_token / peak, 4) if flops_per_token and peak else None, timing.trace)
    log(f"  {name} (repeat {repeat + 1}): {out.tokens_per_second:,.0f} tokens/s over {out.steps} steps, "
        f"peak memory {out.peak_memory_gib} GiB" + (f", MFU {out.mfu:.1%}" if out.mfu is not None else ""))
    shutil.rmtree(out_dir, ignore_errors=True)
    return out


def model_flops_per_token(model_dir: Path, mean_tokens: float) -> float:
    """The work any LoRA trainer must do per token: the body's forward pass and its input-gradient pass (frozen
    weights need no weight gradients), attention over the mean context included; not the output layer (the fast
    profiles score only reply tokens), not checkpointing's recomputation. About 4 x body parameters."""
    config = json.loads((model_dir / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    kv = hidden * config["num_key_value_heads"] // config["num_attention_heads"]
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * config["intermediate_size"]
    forward = 2 * layers * per_layer + 2 * layers * hidden * mean_tokens  # matmuls + causal attention (QK^T, AV)
    return 2 * forward


def _peak_flops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def bench(shape: str = "tiny", profiles: tuple[str, ...] = ("reference", "fast"), examples: int = 256,
          steps: int = 4, batch_size: int = 4, accumulation: int = 4, mean_tokens: int = 268,
          max_seq_length: int = 1024, repeats: int = 1, trace: bool = False, attn_implementation: str = "auto",
          output: str | None = None, log=print) -> dict:
    import torch
    # Imported before SIGTERM may interrupt (transformers imports lazily): an import cut midway is left half-done.
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM  # noqa: F401

    shape = ALIASES.get(shape.lower(), shape.lower())
    if shape not in SHAPES:
        raise DeepRedError(f"unknown --shape {shape}; choose one of {', '.join(SHAPES)}")
    unknown = [p for p in profiles if p not in PROFILES]
    if unknown:
        raise DeepRedError(f"unknown profile(s) {', '.join(unknown)}; choose from {', '.join(PROFILES)}")
    if repeats < 1 or steps < 1:
        raise DeepRedError("--repeats and --steps must be at least 1")
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    work = Path(tempfile.mkdtemp(prefix="deepred-bench-"))
    try:
        with sigterm_as_interrupt():  # a `timeout` or a job scheduler stops the bench as Ctrl-C would
            log(f"bench: shape {shape} on {device}; {examples} synthetic examples, mean {mean_tokens} tokens; "
                f"effective batch {batch_size} x {accumulation}; {steps} timed steps per profile after 1 warm-up, "
                f"{repeats} repeat(s), profiles interleaved")
            model_dir = make_shape_model(shape, work / "model")
            dataset = synthetic_chatml(work / "data.jsonl", examples, mean_tokens)
            flops = model_flops_per_token(model_dir, mean_tokens)
            results = [run_profile(p, model_dir, dataset, work, steps, batch_size, accumulation, max_seq_length, r,
                                   trace and r == 0, flops, attn_implementation, log)
                       for r in range(repeats) for p in profiles]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {"shape": shape, "device": device, "date": time.strftime("%Y-%m-%d"), "examples": examples,
              "mean_tokens": mean_tokens, "effective_batch": batch_size * accumulation, "timed_steps": steps,
              "repeats": repeats, "attn_implementation": attn_implementation,
              "model_flops_per_token": round(flops), "peak_bf16_flops": _peak_flops(),
              "summary": summarize_profiles(results), "results": [r.__dict__ for r in results]}
    summary = report["summary"]
    if "reference" in summary and "fast" in summary:
        report["ratio"] = round(summary["fast"]["median_tokens_per_second"]
                                / summary["reference"]["median_tokens_per_second"], 2)
    log(format_table(report))
    if output:
        write_json(Path(output), report)
    return report


def summarize_profiles(results: list[BenchResult]) -> dict:
    """Per profile: median tokens/s with its spread over repeats, peak memory, MFU, the real tokens of the timed
    window (equal across profiles: they train the same examples in the same order) and the largest gap of its
    per-step losses from the first profile's."""
    first = results[0].profile
    reference_losses = [r.losses for r in results if r.profile == first]
    summary = {}
    for name in dict.fromkeys(r.profile for r in results):
        runs = [r for r in results if r.profile == name]
        speeds = [r.tokens_per_second for r in runs]
        gaps = [max((abs(a - b) for a, b in zip(r.losses, ref)), default=0.0)
                for r, ref in zip(runs, reference_losses)]
        summary[name] = {
            "median_tokens_per_second": round(statistics.median(speeds), 1),
            "min_tokens_per_second": min(speeds), "max_tokens_per_second": max(speeds),
            "peak_memory_gib": max(r.peak_memory_gib for r in runs),
            "median_mfu": statistics.median(r.mfu for r in runs) if runs[0].mfu is not None else None,
            "tokens": sorted({r.tokens for r in runs}),
            "max_loss_gap_vs_" + first: round(max(gaps), 5),
        }
    return summary


def format_table(report: dict) -> str:
    memory_label = "peak GPU GiB" if report["device"] != "CPU" else "peak RSS GiB"
    first = next(iter(report["summary"]))
    lines = [f"| profile | median tokens/s (min-max) | MFU | {memory_label} | tokens timed | max loss gap vs {first} |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, row in report["summary"].items():
        mfu = f"{row['median_mfu']:.1%}" if row["median_mfu"] is not None else "-"
        lines.append(f"| {name} | {row['median_tokens_per_second']:,.0f} ({row['min_tokens_per_second']:,.0f}-"
                     f"{row['max_tokens_per_second']:,.0f}) | {mfu} | {row['peak_memory_gib']} | "
                     f"{', '.join(f'{t:,}' for t in row['tokens'])} | {row['max_loss_gap_vs_' + first]} |")
    if "ratio" in report:
        lines.append(f"ratio (fast / reference, medians): {report['ratio']:.1f}x")
    return "\n".join(lines)
