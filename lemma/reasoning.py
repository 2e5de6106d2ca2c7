"""Reasoning text: split a reply into its <think> reasoning and its answer, as it streams.

Used by `lemma chat`/`lemma run` (reasoning shown dimmed) and by the server (reasoning in
`reasoning_content`, the answer in `content`, as vLLM's and SGLang's reasoning parsers do).
"""

from __future__ import annotations

from lemma.engine.sequence import suffix_overlap

OPEN, CLOSE = "<think>", "</think>"


class ThinkSplitter:
    """Splits streamed text into (text, thinking) runs at <think> and </think>, markers split across
    pieces included."""

    def __init__(self, thinking: bool = False) -> None:
        self.thinking, self.buffer = thinking, ""  # thinking=True: the prompt already opened <think>

    def feed(self, piece: str, final: bool = False) -> list[tuple[str, bool]]:
        self.buffer += piece
        runs: list[tuple[str, bool]] = []
        while True:
            marker = CLOSE if self.thinking else OPEN
            at = self.buffer.find(marker)
            if at < 0:
                break
            runs.append((self.buffer[:at], self.thinking))
            self.buffer, self.thinking = self.buffer[at + len(marker):], not self.thinking
        keep = 0 if final else suffix_overlap(self.buffer, marker)
        runs.append((self.buffer[: len(self.buffer) - keep], self.thinking))
        self.buffer = self.buffer[len(self.buffer) - keep:]
        return [(text, thinking) for text, thinking in runs if text]


def opens_thinking(prompt_text: str) -> bool:
    """The rendered prompt ends inside a <think> block (templates that open it for the model)."""
    return prompt_text.rfind(OPEN) > prompt_text.rfind(CLOSE)


def split_reasoning(text: str, thinking: bool = False) -> tuple[str | None, str]:
    """(reasoning or None, answer) of a whole reply."""
    runs = ThinkSplitter(thinking).feed(text, final=True)
    reasoning = "".join(t for t, inside in runs if inside)
    return (reasoning if reasoning or thinking or OPEN in text else None), "".join(t for t, inside in runs if not inside)
