"""Math problem sets as JSONL: GSM8K (question/answer with '#### n'), MATH500 and AIME (problem/answer)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lemma.errors import LemmaError
from lemma.evaluation.answers import gsm8k_gold

SYSTEM = "You are a careful mathematician. Reason step by step, then give the final answer as \\boxed{ANSWER}."


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    gold: str

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": self.question}]


def load_problems(path: str | Path, limit: int | None = None) -> list[Problem]:
    path = Path(path)
    if not path.is_file():
        raise LemmaError(f"data file not found: {path}")
    problems = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise LemmaError(f"{path}:{line_no}: not valid JSON") from None
            if "question" in row and "answer" in row and "####" in str(row["answer"]):  # GSM8K
                question, gold = row["question"], gsm8k_gold(row["answer"])
            elif "problem" in row and "answer" in row:  # MATH500, AIME
                question, gold = row["problem"], str(row["answer"])
            else:
                raise LemmaError(f"{path}:{line_no}: expected 'question'/'answer' (GSM8K) or 'problem'/'answer' fields")
            problems.append(Problem(str(row.get("id", row.get("unique_id", line_no))), question, gold))
            if limit is not None and len(problems) >= limit:
                break
    if not problems:
        raise LemmaError(f"{path}: no problems in the file")
    return problems
