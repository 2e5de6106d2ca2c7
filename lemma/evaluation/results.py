"""An append-only JSONL results file that survives interruption: each record is one line, written and
flushed whole. Reading it back drops only a torn last line (a kill mid-write leaves it without its
newline); any other line that is not a lemma record is an error naming the file and line, with the file
left unchanged, so a file that lemma did not write is never rewritten. Reads and appends hold an
exclusive lock on the file, so several processes may append to one file (each must write records the
others do not, as `lemma eval --traces --shard` does); each reads the others' records only when it opens
the file."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

from lemma.errors import LemmaError
from lemma.evaluation.jsonl import BadLine, json_kind, parse_json_line
from lemma.evaluation.outputs import check_writable, writing

RECORD_START = b'{"kind": '  # how every record begins as json.dumps writes it ("kind" is its first key)
NUMBER = (int, float)
NONE = type(None)
FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "accuracy": {"config": (str,), "policy": (str,), "budget": (int, NONE), "id": (str,), "correct": (bool,),
                 "finish_reason": (str,), "generated_tokens": (int,), "jct_seconds": NUMBER, "peak_kv_bytes": (int,)},
    "trace": {"config": (str,), "id": (str,)},
    "fidelity": {"config": (str,), "policy": (str,), "budget": (int, NONE), "id": (str,), "error": (str, NONE)},
}
TRACE_LISTS: dict[str, tuple[type, ...]] = {"prompt_ids": (int,), "tokens": (int,), "logprobs": NUMBER, "predicted": (int,)}
FIDELITY_SUMS = ("n", "nll_sum", "agree_sum", "n_last", "nll_last_sum", "agree_last_sum")


def record_problem(record: Any) -> str | None:
    """What keeps `record` from being a lemma results record, or None if it is one."""
    if not isinstance(record, dict):
        return f"{json_kind(record)}, not a JSON object"
    kind = record.get("kind")
    if not isinstance(kind, str) or kind not in FIELDS:
        shown = repr(kind[:40]) if isinstance(kind, str) else json_kind(kind)
        return f"'kind' is {shown}, not one of {', '.join(FIELDS)}"
    fields = dict(FIELDS[kind])
    if kind == "trace" and "tokens" not in record:
        fields["error"] = (str, NONE)  # a Dense trace that failed
    if kind == "fidelity" and record.get("error") is None:
        fields.update((key, NUMBER) for key in FIDELITY_SUMS)
    for key, types in fields.items():
        if key not in record:
            return f"{kind} record without {key!r}"
        if not _is(record[key], types):
            return f"{kind} record with a bad {key!r} ({json_kind(record[key])})"
    if kind == "trace" and "tokens" in record:
        for key, types in TRACE_LISTS.items():
            value = record.get(key)
            if not isinstance(value, list) or not all(_is(x, types) for x in value):
                return f"trace record whose {key!r} is not a list of numbers"
    return None


def _is(value: Any, types: tuple[type, ...]) -> bool:
    """isinstance, except that a JSON boolean is not a number and an integer must fit 64 bits."""
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        return False
    return isinstance(value, types)


def _is_torn_record(tail: bytes) -> bool:
    """Whether an unterminated last line is the start of a record cut short by a kill."""
    return tail.startswith(RECORD_START) or RECORD_START.startswith(tail)


class ResultsFile:
    """Records of one results file. `label` names the file in errors (the CLI passes "--out")."""

    def __init__(self, path: str | Path, label: str = "results file", run: dict[str, Any] | None = None):
        """`run` describes the settings the records come from (data, model, max_tokens, ...): it is stored
        in every record appended, and a file holding records of other settings is refused, so a resume
        never mixes two runs' results."""
        self.path, self.label, self.run = Path(path), label, run
        self.records: list[dict[str, Any]] = []
        check_writable(self.path, label)
        if self.path.is_file():
            self._load()
            self._check_same_run()

    def _check_same_run(self) -> None:
        other = next((r["run"] for r in self.records if self.run is not None and r.get("run", self.run) != self.run), None)
        if other is not None:
            describe = lambda run: ", ".join(f"{k} {v}" for k, v in run.items()) if isinstance(run, dict) else repr(run)  # noqa: E731
            raise LemmaError(f"{self.label} {self.path} holds results of another run ({describe(other)}), not of this one "
                             f"({describe(self.run)}); pass another {self.label} or the same settings to resume")

    def _load(self) -> None:
        try:
            with open(self.path, "rb") as f:
                fcntl.flock(f, fcntl.LOCK_EX)  # no other writer mid-append: a torn last line is a killed one
                data = f.read()
                self._parse(data)
        except OSError as exc:
            raise LemmaError(f"cannot read {self.label} {self.path}: {exc.strerror or exc}") from None

    def _parse(self, data: bytes) -> None:
        *lines, tail = data.split(b"\n")  # tail: whatever follows the last newline
        for line_no, raw in enumerate(lines, 1):
            if raw.strip():
                self.records.append(self._checked(raw, line_no))
        if not tail.strip():
            return
        try:
            self.records.append(self._checked(tail, len(lines) + 1))
        except LemmaError:
            if not _is_torn_record(tail):
                raise
            with writing(self.path, self.label):
                os.truncate(self.path, len(data) - len(tail))  # the only thing ever dropped

    def _checked(self, raw: bytes, line_no: int) -> dict[str, Any]:
        try:
            record = parse_json_line(raw)
            problem = record_problem(record)
        except BadLine as exc:
            problem = str(exc)
        if problem is not None:
            raise LemmaError(f"{self.label} {self.path}:{line_no} is not a lemma results record: {problem}; "
                             f"the file was left unchanged (fix that line or pick another file)")
        return record

    def done(self, kind: str) -> set[tuple[str, str]]:
        return {(r["config"], r["id"]) for r in self.records if r.get("kind") == kind}

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("kind") == kind]

    def append(self, records: list[dict[str, Any]]) -> None:
        if self.run is not None:
            records = [{**r, "run": self.run} for r in records]
        data = "".join(json.dumps(r) + "\n" for r in records).encode()
        # unbuffered: bytes a failed write left in a buffer would land, torn, when the file closes
        with writing(self.path, self.label), open(self.path, "a+b", buffering=0) as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            end = f.seek(0, os.SEEK_END)
            if end and os.pread(f.fileno(), 1, end - 1) != b"\n":  # a whole last record without its newline
                data = b"\n" + data
            try:
                written = 0
                while written < len(data):
                    written += os.write(f.fileno(), data[written:])
                os.fsync(f.fileno())
            except OSError:  # a full disk mid-write: no half record stays for a later append to bury
                os.ftruncate(f.fileno(), end)
                raise
        self.records += records
