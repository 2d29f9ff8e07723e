"""Perplexity of an answer under a causal language model, one of the coherence checks."""

from __future__ import annotations

import math
import statistics

from ..chat_template import template_messages
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
            messages = template_messages(self.tokenizer, chat_messages(self.system_prompt, prompt))
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=True)
        return prompt + "\n"

    def perplexity(self, response: str, prompt: str = "") -> float | None:
        import torch

        if not response.strip():
            return None
        context_ids = self.tokenizer(self._context(prompt), add_special_tokens=False)["input_ids"]
        answer_ids = self.tokenizer(response, add_special_tokens=False)["input_ids"][:1024]
        ids = torch.tensor([context_ids + answer_ids], device=self.model.device)
        scored = min(len(answer_ids), ids.shape[1] - 1)  # the first token of a text with no context has no prediction
        if scored < 1:
            return None
        with torch.inference_mode(), adapter_disabled(self.model, self.adapter_off):
            logits = self._last_logits(ids, scored + 1)[:-1]
            loss = torch.nn.functional.cross_entropy(logits.float(), ids[0, -scored:])
        return round(math.exp(min(loss.item(), 50.0)), 3)

    def _last_logits(self, ids, count: int):
        """The logits of the last `count` positions. Only those go through the output layer where the model
        allows it: the context (system prompt and question) is most of the tokens, and SmolLM2's 49k-word output
        layer a fifth of its work per position."""
        try:
            logits = self.model(input_ids=ids, logits_to_keep=count).logits
        except TypeError:  # a model whose forward has no logits_to_keep
            logits = self.model(input_ids=ids).logits
        return logits[0, -count:]
