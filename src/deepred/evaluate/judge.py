"""The optional judge: a stronger model on an OpenAI-compatible endpoint grades style and voice from 1 to 5,
with a rubric built from the persona file (its title, description and style traits)."""

from __future__ import annotations

import json
import re

from ..config import EvalConfig
from .endpoint import chat_with_retries, openai_client, resolve_model_name
from ..persona import Persona
from .stats import mean, rate, rounded
from .text import chat_messages

JUDGE_RUBRIC = """You grade answers written by "{title}", {description}

Grade two things from 1 to 5:
style: 5 = unmistakably {title} ({traits});
       3 = some persona flavour in an otherwise neutral answer; 1 = a generic modern assistant answer.
voice: 5 = fully in character throughout; 3 = mostly in character with a slip (modern phrasing, lists);
       1 = breaks character (calls itself an AI language model, names another assistant or company,
       mentions roleplay, or uses chatty assistant phrases, markdown or emojis).
Reply with JSON only: {{"style": <1-5>, "voice": <1-5>, "reason": "<one short sentence>"}}"""


def judge_rubric(persona: Persona) -> str:
    return JUDGE_RUBRIC.format(title=persona.title, description=persona.description, traits=persona.judge_traits)


def judge_answers(entries: list[dict], cfg: EvalConfig, persona: Persona, log=print) -> dict:
    """Grades from a stronger model, added to each entry as entry['judge']; returns the aggregate."""
    client = openai_client(cfg.judge_endpoint, cfg.api_key, cfg.timeout)
    model = resolve_model_name(client, cfg.judge_endpoint, cfg.judge_model)
    rubric = judge_rubric(persona)
    log(f"judging {len(entries)} answers with {model}")
    for entry in entries:
        if entry.get("error"):
            entry["judge"] = {"error": "no answer to grade (request failed)"}
            continue
        question = f"Question: {entry['prompt']}\n\nAnswer: {entry['response']}"
        answer = chat_with_retries(client, model, chat_messages(rubric, question), max_tokens=200,
                                   temperature=0.0, retries=cfg.retries)
        entry["judge"] = {"error": answer.error} if answer.error else _parse_grades(answer.response)
    graded = [e["judge"] for e in entries if "style" in e["judge"]]
    return {"model": model, "endpoint": cfg.judge_endpoint, "graded": len(graded), "count": len(entries),
            "style_mean": rounded(mean(g["style"] for g in graded)),
            "voice_mean": rounded(mean(g["voice"] for g in graded)),
            "style_share_4_or_more": rate([g["style"] >= 4 for g in graded]),
            "voice_share_4_or_more": rate([g["voice"] >= 4 for g in graded])}


def _parse_grades(text: str) -> dict:
    match = re.search(r"\{.*\}", text, re.DOTALL)
    try:
        data = json.loads(match.group(0)) if match else {}
        grades = {k: int(data[k]) for k in ("style", "voice")}
    except (ValueError, KeyError, TypeError):
        return {"error": f"unreadable grade: {text[:200]}"}
    if not all(1 <= v <= 5 for v in grades.values()):
        return {"error": f"grade out of range: {text[:200]}"}
    return {**grades, "reason": str(data.get("reason", ""))[:300]}
