"""Tokenizer: tokenizer.json via `tokenizers`, the chat template in a sandboxed jinja2, EOS ids,
and a streaming detokenizer that never emits half a UTF-8 character."""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from lemma.errors import LemmaError
from lemma.models.config import CheckedFields, shown


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object file; {} when the file is absent."""
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise LemmaError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise LemmaError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise LemmaError(f"{path}: must be a JSON object, got {type(raw).__name__}")
    return raw


def _chat_template(config: dict[str, Any], source: Path) -> str | None:
    """tokenizer_config.json's chat_template: a string, or a list of {"name", "template"} (the "default"
    one, else the first); anything else is refused, naming the file."""
    value = config.get("chat_template")
    if isinstance(value, list):
        if not all(isinstance(t, dict) and isinstance(t.get("template"), str) for t in value):
            raise LemmaError(f"{source}: chat_template: a list must hold {{'name', 'template'}} objects with string "
                             f"templates, got {shown(value)}")
        named = {t.get("name"): t["template"] for t in value}
        value = named.get("default") or next(iter(named.values()), None)
    if value is not None and not isinstance(value, str):
        raise LemmaError(f"{source}: chat_template: must be a string, got {shown(value)}")
    return value


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
        self.chat_template = _chat_template(config, model_dir / "tokenizer_config.json")
        template_file = model_dir / "chat_template.jinja"
        if self.chat_template is None and template_file.is_file():
            try:
                self.chat_template = template_file.read_text()
            except (OSError, UnicodeDecodeError) as exc:
                raise LemmaError(f"{template_file}: cannot read the chat template ({exc})") from None
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.add_bos = bool(config.get("add_bos_token", False)) and self.bos_token is not None
        self.eos_ids = self._gather_eos_ids(model_dir)

    def _gather_eos_ids(self, model_dir: Path) -> list[int]:
        ids: list[int] = []
        for name in ("generation_config.json", "config.json"):
            path = model_dir / name
            ids += CheckedFields(_read_json(path), str(path)).token_ids("eos_token_id")
        if self.eos_token is not None and (tid := self.hf.token_to_id(self.eos_token)) is not None:
            ids.append(tid)
        return sorted(set(ids))

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def token_id(self, text: str) -> int | None:
        return self.hf.token_to_id(text)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise LemmaError(f"text to tokenize must be a str, got {type(text).__name__}")
        try:
            ids = self.hf.encode(text, add_special_tokens=False).ids
        except Exception as exc:  # e.g. lone surrogates from undecodable bytes
            raise LemmaError(f"text cannot be tokenized ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                             f"is it valid UTF-8?") from None
        if add_special_tokens and self.add_bos and (bos := self.hf.token_to_id(self.bos_token)) is not None:
            if not ids or ids[0] != bos:
                ids = [bos] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any) -> str:
        if not self.chat_template:
            raise LemmaError("this model's tokenizer_config.json has no chat_template; pass a plain prompt instead")
        if not isinstance(self.chat_template, str):
            raise LemmaError(f"chat_template must be a string, got {type(self.chat_template).__name__}")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise LemmaError(f"messages[{i}] must be a dict with 'role' and 'content', got {message!r}")
            if not isinstance(message["role"], str) or not isinstance(message["content"], str):
                raise LemmaError(f"messages[{i}]: role and content must be strings, got "
                                 f"{type(message['role']).__name__} and {type(message['content']).__name__}")
        context = dict(messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or "",
                       eos_token=self.eos_token or "", **extra)
        return render_template(self.chat_template, context)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


TEMPLATE_SECONDS = 2.0  # a chat template is data from a downloaded model: it gets this long ...
TEMPLATE_CHARS = 4_000_000  # ... and may write this much


class _Budget(ImmutableSandboxedEnvironment):
    """The sandbox, plus a deadline checked at every call and attribute lookup, and string or list
    products capped in size, so a hostile template fails instead of hanging."""

    deadline = 0.0
    intercepted_binops = frozenset(["*", "**"])

    def _tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateError(f"took longer than {TEMPLATE_SECONDS:g} s")

    def call(self, context, obj, *args, **kwargs):  # noqa: ANN001
        self._tick()
        return super().call(context, obj, *args, **kwargs)

    def getattr(self, obj, attribute):  # noqa: ANN001
        self._tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):  # noqa: ANN001
        self._tick()
        return super().getitem(obj, argument)

    def call_binop(self, context, operator, left, right):  # noqa: ANN001
        self._tick()
        if operator == "*" and isinstance(left, (str, list)) and isinstance(right, int) and len(left) * right > TEMPLATE_CHARS:
            raise TemplateError(f"builds a value over {TEMPLATE_CHARS} long")
        if operator == "*" and isinstance(right, (str, list)) and isinstance(left, int) and len(right) * left > TEMPLATE_CHARS:
            raise TemplateError(f"builds a value over {TEMPLATE_CHARS} long")
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 256:
            raise TemplateError("raises to a power over 256")
        return super().call_binop(context, operator, left, right)


def render_template(source: str, context: dict[str, Any]) -> str:
    """Render a chat template in the sandbox within TEMPLATE_SECONDS and TEMPLATE_CHARS."""
    env = _template_env()
    try:
        template = env.from_string(source)
        env.deadline = time.monotonic() + TEMPLATE_SECONDS
        parts, size = [], 0
        for part in template.generate(**context):
            size += len(part)
            if size > TEMPLATE_CHARS:
                raise TemplateError(f"wrote over {TEMPLATE_CHARS} characters")
            env._tick()
            parts.append(part)
        return "".join(parts)
    except TemplateError as exc:
        raise LemmaError(f"chat template failed to render: {exc}") from None
    except (RecursionError, MemoryError, OverflowError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise LemmaError(f"chat template failed to render: {type(exc).__name__}: {exc}") from None


def _template_env() -> _Budget:
    env = _Budget(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
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
