"""The model's own chat template, read for training: which characters of a rendered conversation the model must
learn to write. Found by rendering with the tokenizer's template, never by hand-added markers, so any template
works (ChatML, Llama 3 headers, Gemma turns, Mistral [INST], ...) and the exported template stays the original.

For each assistant turn k of a conversation:
1. `prompt`: the conversation before turn k rendered with add_generation_prompt=True. That is what a runner
   (LM Studio, llama.cpp, transformers) sends before the model starts to write.
2. Where the reply sits: the whole conversation rendered again with turn k's text replaced by a marker. The text
   before the marker must start with `prompt`; the reply itself must appear there verbatim (or trimmed).
3. The end-of-turn token: the special token that follows the reply (whitespace may come between).
The model writes `rendering[len(prompt) : end of that token]`: the reply and the token that stops it. Tokens of the
whole rendering whose characters overlap that span carry the loss; system, user and template scaffolding do not.

Templates with no system role (Gemma 1/2, older Mistral raise on one; some drop it) get the system prompt at the
start of the first user message, separated by a blank line, as Gemma 3's own template does. Never dropped. Whatever
else renders a chat for the model (merge's verification, the GGUF check, evaluation, `deepred serve`) folds it the
same way through `template_messages` / `fold_system_prompt`, so the model is asked as it was trained.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from .errors import DeepRedError

# Private-use characters: no tokenizer normalises them away and no dataset contains them.
REPLY_MARKER = "\ue000deepred-reply\ue001"
SYSTEM_MARKER = "\ue000deepred-system\ue001"
LEADING_WHITESPACE = re.compile(r"\s*")


class TemplateError(DeepRedError):
    """The chat template cannot yield an assistant-only loss mask; the message names the template's problem."""


def has_system_role(render: Callable[[list[dict]], str]) -> bool:
    """Whether a template (given as a function that renders messages) keeps a system message: False when it raises
    on one (Gemma 1/2, Mistral v0.1) or silently drops it."""
    probe = [{"role": "system", "content": SYSTEM_MARKER}, {"role": "user", "content": "Hello."},
             {"role": "assistant", "content": "Hello, comrade."}]
    try:
        return SYSTEM_MARKER in render(probe)
    except Exception:  # noqa: BLE001 - jinja's raise_exception() and template bugs alike
        return False


def fold_system_prompt(messages: list[dict]) -> list[dict]:
    """The messages with a leading system prompt moved to the start of the first user message (blank line between),
    for a template with no system role. Copies; the caller's messages are left as they are."""
    messages = [dict(m) for m in messages]
    if not (messages and messages[0].get("role") == "system"):
        return messages
    system, rest = _text_of(messages[0].get("content")), messages[1:]
    for message in rest:
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):  # OpenAI content parts (text, images): the prompt goes first as text
                message["content"] = [{"type": "text", "text": f"{system}\n\n"}, *content]
            else:
                message["content"] = f"{system}\n\n{content or ''}"
            return rest
    raise TemplateError("this chat template has no system role and the conversation has no user turn to carry "
                        "the system prompt")


def _text_of(content) -> str:
    if isinstance(content, list):  # OpenAI content parts
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content or ""


def template_messages(tokenizer, messages: list[dict]) -> list[dict]:
    """The messages as a Hugging Face tokenizer's chat template takes them: the system prompt folded into the first
    user message where the template has no system role, as training does."""
    if has_system_role(lambda chat: tokenizer.apply_chat_template(chat, tokenize=False)):
        return messages
    return fold_system_prompt(messages)


@dataclass
class ChatFormat:
    """A tokenizer's chat template, with what training needs to know about it."""

    tokenizer: object
    fold_system: bool  # the template has no system role: the system prompt goes into the first user message
    special_tokens: tuple[str, ...]  # longest first, so "<|im_end|>" is matched before any shorter prefix

    @classmethod
    def of(cls, tokenizer, log=print) -> "ChatFormat":
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError("the tokenizer has no chat template; use an instruct/chat model")
        if not getattr(tokenizer, "is_fast", False):
            raise TemplateError("the tokenizer is not a fast (Rust) tokenizer, so token offsets are unknown and the "
                                "assistant tokens cannot be located; use a model that ships tokenizer.json")
        special = {str(t) for t in tokenizer.all_special_tokens}
        special |= {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
        fmt = cls(tokenizer, False, tuple(sorted((t for t in special if t), key=len, reverse=True)))
        fmt.fold_system = not has_system_role(fmt.render)
        if fmt.fold_system:
            log("chat template: no system role; the system prompt is put at the start of the first user message "
                "(separated by a blank line), as templates without one expect")
        return fmt

    def conversation(self, messages: list[dict]) -> list[dict]:
        """The messages as this template takes them (system prompt folded in where it has no system role)."""
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        return fold_system_prompt(messages) if self.fold_system else messages

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except Exception as exc:  # noqa: BLE001 - jinja raise_exception() and template bugs alike
            raise TemplateError(f"the chat template refused the conversation: {exc}") from exc

    def reply_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The whole conversation rendered, and per assistant turn the characters the model must write."""
        messages = self.conversation(messages)
        text = self.render(messages)
        spans = [self._reply_span(messages, k, text) for k, m in enumerate(messages) if m["role"] == "assistant"]
        return text, spans

    def _reply_span(self, messages: list[dict], k: int, text: str) -> tuple[int, int]:
        turn = sum(m["role"] == "assistant" for m in messages[:k + 1])
        prompt = self.render(messages[:k], add_generation_prompt=True)
        marked = self.render([*messages[:k], {"role": "assistant", "content": REPLY_MARKER}, *messages[k + 1:]])
        at = marked.find(REPLY_MARKER)
        if at < 0:
            raise TemplateError(f"the chat template does not write assistant turn {turn}'s text into the prompt")
        before, after = marked[:at], marked[at + len(REPLY_MARKER):]
        if not before.startswith(prompt) or not text.startswith(before):
            raise TemplateError(f"the chat template renders assistant turn {turn} differently from its generation "
                                "prompt (add_generation_prompt=True is not a prefix of the rendered turn), so what "
                                "the model would learn to write does not follow what a runner sends")
        reply = messages[k]["content"]
        written = next((r for r in (reply, reply.strip(), reply.rstrip(), reply.lstrip()) if text.startswith(r, at)),
                       None)
        if written is None or text[at + len(written):] != after:
            raise TemplateError(f"the chat template changes the text of assistant turn {turn} (it is not written "
                                "verbatim or trimmed), so the reply's tokens cannot be located")
        reply_end = at + len(written)
        end = LEADING_WHITESPACE.match(text, reply_end).end()
        token = next((t for t in self.special_tokens if text.startswith(t, end)), None)
        if token is None:
            follows = repr(text[reply_end:reply_end + 20]) if reply_end < len(text) else "nothing"
            raise TemplateError(f"the chat template ends assistant turn {turn} with {follows}, not a special "
                                "end-of-turn token, so the model could not learn to stop")
        return len(prompt), end + len(token)

    def tokenize(self, messages: list[dict]) -> dict:
        """input_ids of the rendered conversation and assistant_masks (1 = the model learns to write this token)."""
        text, spans = self.reply_spans(messages)
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        mask = [int(any(_overlaps(start, stop, a, b) for a, b in spans)) for start, stop in encoding["offset_mapping"]]
        return {"input_ids": encoding["input_ids"], "assistant_masks": mask}


def _overlaps(start: int, stop: int, a: int, b: int) -> bool:
    if start == stop:  # a token with no characters of its own
        return a <= start < b
    return start < b and stop > a


def tokenize_each(examples: list[dict], fmt: ChatFormat, source: object = "dataset") -> tuple[list[dict], dict[int, str]]:
    """The examples the template takes, tokenized with their masks; and {index: "SOURCE:LINE: problem"} for each
    example it refuses (a template without a system role may refuse only some conversations, e.g. two replies in a
    row)."""
    rows, refused = [], {}
    for index, example in enumerate(examples):
        try:
            rows.append(fmt.tokenize(example["messages"]))
        except TemplateError as exc:
            refused[index] = f"{source}:{example.get('line', '?')}: {exc}"
    return rows, refused


def tokenize_examples(examples: list[dict], fmt: ChatFormat, source: object = "dataset") -> list[dict]:
    """Every example tokenized with its mask; a template problem is reported as SOURCE:LINE of the first example
    (and how many more share it)."""
    rows, refused = tokenize_each(examples, fmt, source)
    if refused:
        raise TemplateError(refusal_line(refused))
    return rows


def refusal_line(refused: dict[int, str]) -> str:
    first = next(iter(refused.values()))
    others = len(refused) - 1
    return first + (f" (and {others} more example{'s' if others > 1 else ''} the template refuses)" if others else "")
