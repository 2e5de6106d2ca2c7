"""A request's prompt as token ids: text (tokenized with the model's special tokens), token ids, or a
conversation (a list of {"role", "content"} messages, rendered with the model's chat template)."""

from __future__ import annotations

from typing import Any

from lemma.errors import LemmaError
from lemma.models.tokenizer import Tokenizer

Prompt = str | list[int] | list[dict[str, Any]]


def is_conversation(prompt: object) -> bool:
    return isinstance(prompt, (list, tuple)) and bool(prompt) and all(isinstance(m, dict) for m in prompt)


def chat_ids(tokenizer: Tokenizer, messages: list[dict[str, Any]]) -> list[int]:
    """A conversation rendered with the chat template, ready for the assistant's reply."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise LemmaError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r}")
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def prompt_ids(tokenizer: Tokenizer, prompt: Prompt, vocab_size: int) -> list[int]:
    if isinstance(prompt, str):
        if not prompt:
            raise LemmaError("prompt is empty")
        ids = tokenizer.encode(prompt, add_special_tokens=True)
    elif is_conversation(prompt):
        ids = chat_ids(tokenizer, prompt)
    elif isinstance(prompt, (list, tuple)):
        ids = list(prompt)
        bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size]
        if bad:
            raise LemmaError(f"prompt token id {bad[0]!r} is outside the vocabulary [0, {vocab_size})")
    else:
        raise LemmaError(f"a prompt must be text, a list of token ids or a list of chat messages, got {type(prompt).__name__}")
    if not ids:
        raise LemmaError("prompt is empty (no tokens)")
    return ids
