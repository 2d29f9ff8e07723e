"""Perplexity of an answer under a causal language model, one of the coherence checks."""

from __future__ import annotations

import math
import statistics

from .coherence import PPL_LIMIT
from .models import adapter_disabled, load_causal_lm
from ..persona import Persona, default_persona
from .text import chat_messages


class PerplexityScorer:
    """Perplexity of an answer under a causal LM, conditioned on the chat-formatted question.

    `informative` is False when fluent reference text (four persona and four generic anchors) already scores
    above PPL_LIMIT (an untrained or unrelated model): then perplexities are still reported but do not decide
    coherence.
    """

    def __init__(self, model, tokenizer, name: str, system_prompt: str | None = None, adapter_off: bool = False,
                 persona: Persona | None = None):
        persona = persona or default_persona()
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.system_prompt = system_prompt if system_prompt is not None else persona.evaluation_system_prompt
        self.adapter_off = adapter_off
        texts = persona.persona_anchors[:4] + persona.generic_anchors[:4]
        self.reference_perplexity = statistics.median(self.perplexity(text, "Tell me something.") for text in texts)
        self.informative = self.reference_perplexity <= PPL_LIMIT

    @classmethod
    def from_folder(cls, path: str, system_prompt: str | None = None,
                    persona: Persona | None = None) -> "PerplexityScorer":
        model, tokenizer = load_causal_lm(path)
        return cls(model, tokenizer, path, system_prompt, persona=persona)

    def _context(self, prompt: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(chat_messages(self.system_prompt, prompt), tokenize=False,
                                                      add_generation_prompt=True)
        return prompt + "\n"

    def perplexity(self, response: str, prompt: str = "") -> float | None:
        import torch

        if not response.strip():
            return None
        context_ids = self.tokenizer(self._context(prompt), add_special_tokens=False)["input_ids"]
        answer_ids = self.tokenizer(response, add_special_tokens=False)["input_ids"][:1024]
        ids = torch.tensor([context_ids + answer_ids], device=self.model.device)
        labels = ids.clone()
        labels[0, :len(context_ids)] = -100
        with torch.inference_mode(), adapter_disabled(self.model, self.adapter_off):
            loss = self.model(input_ids=ids, labels=labels).loss
        return round(math.exp(min(loss.item(), 50.0)), 3)

