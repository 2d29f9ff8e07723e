"""What a run leaves for the user and the later stages: run_config.json, the results, the loss curve, and the
commands that come next."""

from __future__ import annotations

import dataclasses
import shlex
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from ..config import TrainConfig
from ..files import write_json
from ..records import EVAL_RESULTS, RUN_CONFIG, TRAIN_RESULTS, with_absolute_paths
from .hardware import Hardware
from .plan import BatchPlan


@dataclass
class RunRecord:
    """Writes run_config.json for a batch plan: every resolved setting, the data, the plan, the hardware and the
    LoRA targets (again when the memory probe sets the token budget). Rank 0 only. `report` is the dataset's
    (SFT) or the preference pairs' (DPO)."""

    output_dir: Path
    cfg: TrainConfig
    base_model: str
    report: object
    data_hash: str
    lengths: list[int]
    hw: Hardware
    examples_used: int
    main_process: bool
    row_tokens_p95: int | None = None  # the plan's row length (plan_batches); its kernel choice follows from it
    lora_targets: list[str] | str = "all-linear"
    validation_examples: int = 0  # of examples_used, held out by --val_split

    def write(self, plan: BatchPlan) -> None:
        if not self.main_process:
            return
        targets = self.lora_targets
        rows = getattr(self.report, "pairs", None)
        write_json(self.output_dir / RUN_CONFIG, {
            "config": with_absolute_paths(dataclasses.asdict(self.cfg)),
            "base_model": self.base_model,
            "dataset": str(Path(self.report.path).absolute()),  # trained on (ChatML set or pairs); absolute, so a
            # resume from another folder finds it
            "dataset_sha256": self.data_hash,
            "examples": len(rows if rows is not None else self.report.examples),
            "examples_used": self.examples_used,  # fewer with --max_samples
            "examples_trained": self.examples_used - self.validation_examples,
            "examples_validation": self.validation_examples,
            **({"examples_from_horizon": added} if (added := horizon_rows(self.report)) else {}),
            **({"pairs_by_source": dict(Counter(p.get("source") or "unnamed" for p in rows))} if rows else {}),
            "invalid_lines_skipped": self.report.invalid_lines,
            "truncated_examples": sum(1 for n in self.lengths if n > self.cfg.max_seq_length),
            "row_tokens_p95": self.row_tokens_p95,
            "tokens_total": sum(self.lengths),
            "effective_batch": self.cfg.batch_size * self.cfg.gradient_accumulation_steps,
            "batch_plan": dataclasses.asdict(plan),
            "hardware": dataclasses.asdict(self.hw),
            "lora_target_modules": targets if isinstance(targets, str) else sorted(targets),
            "started": datetime.now().isoformat(timespec="seconds"),
        })


def horizon_rows(report) -> int:
    """How many of the examples --horizon_examples made from the persona file (train.examples.with_horizon)."""
    return sum(1 for e in getattr(report, "examples", None) or [] if str(e.get("line", "")).startswith("horizon-"))


def train_metrics(outcome, trainer, started: float) -> dict:
    """The Trainer's metrics with the wall time and, where tokens were counted, tokens per second."""
    metrics = dict(outcome.metrics)
    metrics["train_wall_seconds"] = round(time.time() - started, 2)
    tokens = metrics.get("num_input_tokens_seen") or trainer.state.num_input_tokens_seen
    if tokens and metrics.get("train_runtime"):
        metrics["train_tokens_per_second"] = round(tokens / metrics["train_runtime"], 1)
    return metrics


def write_results(output_dir: Path, metrics: dict, eval_metrics: dict, log_history: list[dict]) -> None:
    write_json(output_dir / TRAIN_RESULTS, metrics)
    write_json(output_dir / EVAL_RESULTS, eval_metrics)
    plot_loss_curve(log_history, output_dir / "loss_curve.png")


def plot_loss_curve(log_history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="training loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_title("Persona fine-tuning")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def next_commands(base_model: str, final_dir: Path, quant_type: str = "q4_k_m") -> str:
    """The deepred commands that take this adapter to a deployed GGUF, with this run's paths (shell-quoted)."""
    run_dir = final_dir.parent
    merged = run_dir / "merged"
    gguf = run_dir / f"{run_dir.name}-{quant_type}.gguf"
    return "\n".join([
        f"\nadapter saved to {final_dir}. Next:",
        "  " + shlex.join(["deepred", "merge", "--base_model", base_model, "--lora_path", str(final_dir),
                           "--output_path", str(merged), "--verify"]),
        "  " + shlex.join(["deepred", "convert", "--model_path", str(merged), "--output_path", str(gguf),
                           "--quant_type", quant_type]),
        "  " + shlex.join(["deepred", "deploy", str(gguf), "--name", run_dir.name]),
    ])
