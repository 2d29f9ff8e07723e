"""Does a base model know when things happened? The ceiling on "date first, then decide" (README, Teaching the
horizon): a model that deflects by the year it writes can do no better than the years it knows.

For every dated subject of a persona file's horizon (its later topics and its period facts) the model is asked,
through its chat template, "In what year did SUBJECT begin or first happen? Answer with the year only." (greedy,
24 tokens); the first year in the answer is its guess. Printed: how many guesses fall on the right side of the
cutoff, later and period subjects apart, and how many lie within 2 years of the persona file's year.

    python benchmarks/date_probe.py                       # SmolLM2-135M-Instruct, Deep Red's horizon
    python benchmarks/date_probe.py --model PATH --persona my_persona.yaml --out guesses.json
"""

from __future__ import annotations

import argparse
import json
import re

YEAR = re.compile(r"\b(1[0-9]\d\d|20\d\d)\b")


def dated_subjects(persona) -> list[tuple[str, int]]:
    horizon = persona.horizon
    later = [(topic, year) for topic, year in horizon.topic_years.items()]
    period = [(fact["subject"], fact["year"]) for fact in horizon.facts if fact.get("subject") and fact.get("year")]
    return later + period


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deepred.models.registry import local_model_dir
    from deepred.persona import load_persona

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="a model folder or a built-in name")
    parser.add_argument("--persona", default=None, help="persona file (default: the bundled Deep Red)")
    parser.add_argument("--out", default=None, help="write every subject, its year and the model's answer here")
    args = parser.parse_args()

    persona = load_persona(args.persona)
    folder = local_model_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    rows = []
    for subject, year in dated_subjects(persona):
        chat = [{"role": "user", "content": f"In what year did {subject} begin or first happen? "
                                            "Answer with the year only."}]
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=24, do_sample=False)
        text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        found = YEAR.search(text)
        rows.append({"subject": subject, "year": year, "later": year > persona.cutoff,
                     "guess": int(found.group(1)) if found else None, "answer": text})
    report(rows, persona.cutoff)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1, ensure_ascii=False)


def report(rows: list[dict], cutoff: int) -> None:
    for later, name in ((True, f"after {cutoff}"), (False, f"up to {cutoff}")):
        group = [r for r in rows if r["later"] == later]
        guessed = [r for r in group if r["guess"] is not None]
        right_side = sum((r["guess"] > cutoff) == later for r in guessed)
        close = sum(abs(r["guess"] - r["year"]) <= 2 for r in guessed)
        print(f"subjects {name}: {len(group)}, a year given for {len(guessed)}; on the right side of {cutoff}: "
              f"{right_side} of {len(guessed)}; within 2 years: {close}")


if __name__ == "__main__":
    main()
