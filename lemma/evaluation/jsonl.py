"""One line of a JSON Lines file parsed, or the reason it cannot be, for errors that name the file and line."""

from __future__ import annotations

import json
from typing import Any


class BadLine(Exception):
    """A line that is not one JSON value; str() says what is wrong with it."""


def parse_json_line(raw: bytes) -> Any:
    """The JSON value on one line (a leading byte-order mark is ignored)."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BadLine(f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadLine(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    except (ValueError, RecursionError):  # an integer past Python's digit limit, or nesting past the recursion limit
        raise BadLine("not valid JSON (a number too long or nesting too deep)") from None


def json_kind(value: Any) -> str:
    """What a JSON value is, in words: 'null', 'a number', 'an array', ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
