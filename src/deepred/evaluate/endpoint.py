"""Model clients, remote: any OpenAI-compatible endpoint (LM Studio, `deepred serve`, vLLM), with retries."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

from ..config import EvalConfig
from ..errors import DeepRedError
from .text import chat_messages

RETRY_BASE_DELAY = 1.0         # seconds; doubled after each failed attempt
RETRY_MAX_DELAY = 30.0


@dataclass
class Answer:
    response: str
    error: str | None = None
    attempts: int = 1


def openai_client(endpoint: str, api_key: str | None, timeout: float):
    try:
        from openai import OpenAI
    except ImportError as exc:
        raise DeepRedError("the 'openai' package is missing: run `pip install openai`") from exc
    key = api_key or os.environ.get("OPENAI_API_KEY") or "not-needed"
    return OpenAI(base_url=endpoint.rstrip("/"), api_key=key, timeout=timeout, max_retries=0)


def resolve_model_name(client, endpoint: str, model: str | None) -> str:
    """Check the endpoint answers; the model defaults to the first one it lists."""
    import openai

    try:
        listed = [m.id for m in client.models.list()]
    except (openai.APIConnectionError, openai.APITimeoutError) as exc:
        raise DeepRedError(f"cannot reach {endpoint} ({exc.__class__.__name__}); start the server "
                           "(LM Studio, `deepred serve`, llama.cpp) or fix --endpoint") from exc
    except openai.APIStatusError as exc:
        if model:
            return model
        raise DeepRedError(f"{endpoint} did not list its models (HTTP {exc.status_code}); pass --model NAME") from exc
    if model and listed and model not in listed:  # never score another model under this name
        raise DeepRedError(f"model {model!r} is not served at {endpoint}; it serves {', '.join(listed)}: pass one of "
                           "those as --model (or --base_model_name)")
    if model:
        return model
    if not listed:
        raise DeepRedError(f"{endpoint} lists no models; load one (e.g. `lms load`) or pass --model NAME")
    return listed[0]


def _retryable(exc: Exception) -> bool:
    import openai

    if isinstance(exc, (openai.APITimeoutError, openai.APIConnectionError)):
        return True
    return isinstance(exc, openai.APIStatusError) and (exc.status_code >= 500 or exc.status_code == 429)


def _describe(exc: Exception) -> str:
    import openai

    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code}: {str(exc)[:300]}"
    return f"{exc.__class__.__name__}: {str(exc)[:300]}"


def chat_with_retries(client, model: str, messages: list[dict], *, max_tokens: int, temperature: float,
                      retries: int, sleep: Callable[[float], None] = time.sleep) -> Answer:
    """One chat completion; server errors and timeouts are retried with exponential backoff."""
    last_error = ""
    for attempt in range(retries + 1):
        if attempt:
            sleep(min(RETRY_BASE_DELAY * 2 ** (attempt - 1), RETRY_MAX_DELAY))
        try:
            reply = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                   temperature=temperature)
            return Answer(_reply_text(reply), attempts=attempt + 1)
        except Exception as exc:  # noqa: BLE001 - every failure is recorded, the run goes on
            last_error = _describe(exc)
            if not _retryable(exc):
                return Answer("", error=last_error, attempts=attempt + 1)
    return Answer("", error=f"failed after {retries + 1} attempts: {last_error}", attempts=retries + 1)


def _reply_text(reply) -> str:
    choices = getattr(reply, "choices", None) or []
    if not choices:
        raise ValueError("the server returned no choices")
    return choices[0].message.content or ""


def answers_from_endpoint(prompts: list[dict], cfg: EvalConfig, endpoint: str, model: str | None,
                          system_prompt: str, log=print) -> tuple[list[dict], str]:
    client = openai_client(endpoint, cfg.api_key, cfg.timeout)
    model = resolve_model_name(client, endpoint, model)
    log(f"asking {model} at {endpoint} ({len(prompts)} prompts)")
    rows = []
    for index, prompt in enumerate(prompts, 1):
        answer = chat_with_retries(client, model, chat_messages(system_prompt, prompt["prompt"]),
                                   max_tokens=cfg.max_tokens, temperature=cfg.temperature, retries=cfg.retries)
        if answer.error:
            log(f"  [{index}/{len(prompts)}] {prompt['id']}: FAILED ({answer.error})")
        elif index % 10 == 0 or index == len(prompts):
            log(f"  [{index}/{len(prompts)}] answered")
        rows.append({**prompt, "response": answer.response, "error": answer.error, "attempts": answer.attempts})
    return rows, model


