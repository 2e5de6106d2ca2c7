"""Final-answer extraction and equivalence for GSM8K, MATH500 and AIME style answers."""

from __future__ import annotations

import re
from fractions import Fraction

NUMBER = r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+"


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces matched; also `\\boxed 5`."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start:].split("x", 1)[1].lstrip() if text[start + 1] == "f" else text[start + len("\\boxed"):].lstrip()
    if not rest.startswith("{"):
        simple = re.match(r"([^\s$]+)", rest)
        return simple.group(1) if simple else None
    depth = 0
    for i, ch in enumerate(rest):
        depth += (ch == "{") - (ch == "}")
        if depth == 0:
            return rest[1:i]
    return None


def extract_answer(text: str, complete: bool = True) -> str | None:
    """The model's final answer: last \\boxed{}, else after '####', else after 'answer is', else the last
    number. For an incomplete output (cut off by max_tokens) only an explicit \\boxed{} or '####' counts:
    a number mid-thought is not an answer."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        return tail.splitlines()[0].strip() if tail else None
    if not complete:
        return None
    said = re.findall(r"answer is[:\s]*\$?([^\n$]+)", text, flags=re.IGNORECASE)
    if said:
        return said[-1].strip().rstrip(".")
    numbers = re.findall(NUMBER, text)
    return numbers[-1] if numbers else None


def gsm8k_gold(answer: str) -> str:
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


_REMOVE = ["\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\$", "$", "\\displaystyle", "^\\circ", "^{\\circ}",
           "\\circ", "\\%", "%", "°"]


def normalize(answer: str) -> str:
    s = str(answer).strip()
    s = re.sub(r"\\text\{\s*([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\(?:mbox|mathrm|textbf)\{([^{}]*)\}", r"\1", s)
    for token in _REMOVE:
        s = s.replace(token, "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\(", "").replace("\\)", "")
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)  # \frac12
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s)  # x = 5
    s = re.sub(r"\s*(?:units?|degrees?|dollars?|cents?|cm|meters?|inches|feet|hours?|minutes?|days?)\s*$", "", s)
    s = s.replace(" ", "").rstrip(".")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):  # 1,000 is a number, (1,2) is not
        s = s.replace(",", "")
    return s


def to_number(s: str) -> Fraction | float | None:
    s = normalize(s)
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", s)
    if m:
        value = Fraction(int(m.group(2)), int(m.group(3))) if int(m.group(3)) else None
        return -value if m.group(1) and value is not None else value
    m = re.fullmatch(r"(-?\d+)/(-?\d+)", s)
    if m and int(m.group(2)):
        return Fraction(int(m.group(1)), int(m.group(2)))
    if re.fullmatch(r"-?(\d+\.?\d*|\.\d+)(e-?\d+)?", s):
        try:
            return Fraction(s) if "e" not in s else float(s)
        except ValueError:
            return None
    return None


def _split_top_level(s: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def equivalent(prediction: str | None, gold: str | int | float) -> bool:
    """Numbers (ints, decimals, fractions, LaTeX fractions, thousands separators, percent and degree
    signs, leading zeros), lists and tuples element-wise, and otherwise normalised LaTeX strings."""
    if prediction is None:
        return False
    a, b = normalize(prediction), normalize(str(gold))
    if a == b:
        return True
    x, y = to_number(a), to_number(b)
    if x is not None and y is not None:
        if isinstance(x, Fraction) and isinstance(y, Fraction):
            return x == y  # decimals parse exactly: 5.5 == 11/2, but 1000001 != 1000000
        return abs(float(x) - float(y)) <= 1e-9 * max(1.0, abs(float(y)))
    opens, closes = "([", ")]"
    if a[:1] in opens or b[:1] in opens:  # tuples and intervals: the same brackets, then element-wise
        if (a[:1], a[-1:]) != (b[:1], b[-1:]) or a[-1:] not in closes:
            return False
        a, b = a[1:-1], b[1:-1]
    pa, pb = _split_top_level(a), _split_top_level(b)
    if len(pa) > 1 and len(pa) == len(pb):
        return all(equivalent(p, q) for p, q in zip(pa, pb))
    return False
