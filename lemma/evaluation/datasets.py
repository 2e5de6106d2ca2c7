"""Math problem sets as JSONL: GSM8K (question/answer with '#### n'), MATH500 and AIME (problem/answer)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lemma.errors import LemmaError
from lemma.evaluation.answers import gsm8k_gold
from lemma.evaluation.jsonl import BadLine, json_kind, parse_json_line

SYSTEM = "You are a careful mathematician. Reason step by step, then give the final answer as \\boxed{ANSWER}."


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    gold: str

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": self.question}]


def load_problems(path: str | Path, limit: int | None = None) -> list[Problem]:
    """The problems in a JSONL file (the first `limit`). Anything malformed raises LemmaError naming the
    file and line."""
    path = Path(path)
    if limit is not None and limit < 1:
        raise LemmaError(f"limit must be at least 1, got {limit}")
    problems: list[Problem] = []
    line_of_id: dict[str, int] = {}
    for line_no, where, row in json_rows(path):
        problem = _problem(row, line_no, where)
        if problem.id in line_of_id:
            raise LemmaError(f"{where}: id {problem.id!r} is already used on line {line_of_id[problem.id]}")
        line_of_id[problem.id] = line_no
        problems.append(problem)
        if limit is not None and len(problems) >= limit:
            break
    if not problems:
        raise LemmaError(f"{path}: no problems in the file")
    return problems


def json_rows(path: Path) -> Iterator[tuple[int, str, Any]]:
    """(line number, "file:line", parsed JSON) of each non-blank line; a line that is not JSON raises
    LemmaError naming file and line."""
    for line_no, raw in _lines(path):
        if not raw.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            yield line_no, where, parse_json_line(raw)
        except BadLine as exc:
            raise LemmaError(f"{where}: {exc}") from None


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of each line, split on newlines only (JSON strings may hold U+2028 and friends)."""
    if not path.exists():
        raise LemmaError(f"data file not found: {path}")
    if path.is_dir():
        raise LemmaError(f"data file {path} is a folder, not a JSONL file")
    if not path.is_file():
        raise LemmaError(f"data file {path} is not a regular file")
    try:
        with open(path, "rb") as f:
            yield from enumerate(f, 1)
    except OSError as exc:
        raise LemmaError(f"cannot read data file {path}: {exc.strerror or exc}") from None


def _problem(row: Any, line_no: int, where: str) -> Problem:
    if not isinstance(row, dict):
        raise LemmaError(f"{where}: expected a JSON object with 'question'/'answer' or 'problem'/'answer', got {json_kind(row)}")
    answer = row.get("answer")
    if "question" in row and isinstance(answer, str) and "####" in answer:  # GSM8K
        question, gold = _text(row, "question", where), gsm8k_gold(answer)
        if not gold:
            raise LemmaError(f"{where}: 'answer' has nothing after '####'")
    elif "problem" in row and "answer" in row:  # MATH500, AIME
        question, gold = _text(row, "problem", where), _math_gold(answer, where)
    elif "question" in row and "answer" in row:
        raise LemmaError(f"{where}: GSM8K 'answer' must be a string ending in '#### <answer>', got {_shown(answer)}")
    else:
        raise LemmaError(f"{where}: expected 'question'/'answer' (GSM8K) or 'problem'/'answer' fields")
    return Problem(_id(row, line_no, where), question, gold)


def _text(row: dict[str, Any], key: str, where: str) -> str:
    value = row[key]
    if not isinstance(value, str) or not value.strip():
        raise LemmaError(f"{where}: {key!r} must be a non-empty string, got {_shown(value)}")
    return value


def _math_gold(answer: Any, where: str) -> str:
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or not str(answer).strip():
        raise LemmaError(f"{where}: 'answer' must be a non-empty string or a number, got {_shown(answer)}")
    return str(answer)


def _id(row: dict[str, Any], line_no: int, where: str) -> str:
    key = "id" if "id" in row else "unique_id" if "unique_id" in row else None
    if key is None:
        return str(line_no)
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise LemmaError(f"{where}: {key!r} must be a non-empty string or an integer, got {_shown(value)}")
    return str(value)


def _shown(value: Any) -> str:
    return "a blank string" if isinstance(value, str) and not value.strip() else json_kind(value)
