"""Tokenizer: tokenizer.json via `tokenizers`, the chat template in a sandboxed jinja2, EOS ids,
and a streaming detokenizer that never emits half a UTF-8 character."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from lemma.errors import LemmaError


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise LemmaError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise LemmaError(f"{model_dir}: tokenizer.json is missing (lemma needs a fast-tokenizer file)")
        try:
            self.hf = HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise LemmaError(f"{path}: cannot load tokenizer ({str(exc).splitlines()[0]})") from None
        config = _read_json(model_dir / "tokenizer_config.json")
        self.chat_template: str | None = config.get("chat_template")
        if isinstance(self.chat_template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in self.chat_template}
            self.chat_template = named.get("default") or next(iter(named.values()), None)
        template_file = model_dir / "chat_template.jinja"
        if self.chat_template is None and template_file.is_file():
            self.chat_template = template_file.read_text()
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.add_bos = bool(config.get("add_bos_token", False)) and self.bos_token is not None
        self.eos_ids = self._gather_eos_ids(model_dir)

    def _gather_eos_ids(self, model_dir: Path) -> list[int]:
        ids: list[int] = []
        for name in ("generation_config.json", "config.json"):
            value = _read_json(model_dir / name).get("eos_token_id")
            ids += [value] if isinstance(value, int) else list(value or [])
        if self.eos_token is not None and (tid := self.hf.token_to_id(self.eos_token)) is not None:
            ids.append(tid)
        return sorted(set(ids))

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def token_id(self, text: str) -> int | None:
        return self.hf.token_to_id(text)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and (bos := self.hf.token_to_id(self.bos_token)) is not None:
            if not ids or ids[0] != bos:
                ids = [bos] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any) -> str:
        if not self.chat_template:
            raise LemmaError("this model's tokenizer_config.json has no chat_template; pass a plain prompt instead")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise LemmaError(f"messages[{i}] must be a dict with 'role' and 'content', got {message!r}")
        try:
            return _template_env().from_string(self.chat_template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **extra,
            )
        except TemplateError as exc:
            raise LemmaError(f"chat template failed to render: {exc}") from None


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _template_env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda value, indent=None, ensure_ascii=False: json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class StreamingDetokenizer:
    """Turns a growing list of token ids into text pieces. A piece is released only once it no longer
    ends in an incomplete UTF-8 sequence (decoded as U+FFFD), so a byte-level token split never shows."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # tokens before this are settled; decoding restarts here for context
        self.read_offset = 0  # tokens before this have been emitted
        self.text = ""

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)  # noqa: E731
        prefix = decode(self.ids[self.prefix_offset : self.read_offset])
        full = decode(self.ids[self.prefix_offset :])
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""
        piece = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += piece
        return piece

    def flush(self) -> str:
        """At the end of generation release whatever is left, replacement characters included."""
        full = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special)
        piece = full[len(self.text) :] if full.startswith(self.text) else ""
        self.text += piece
        self.read_offset = len(self.ids)
        return piece
