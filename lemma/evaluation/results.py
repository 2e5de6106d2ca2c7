"""An append-only JSONL results file that survives interruption: each record is one line, written and
flushed whole; a torn last line (a kill mid-write) is dropped when the file is read back."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class ResultsFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.records: list[dict[str, Any]] = []
        if self.path.is_file():
            good, text = [], self.path.read_text()
            for line in text.splitlines():
                try:
                    good.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a torn write: everything before it is intact
            self.records = good
            intact = "".join(json.dumps(r) + "\n" for r in good)
            if intact != text:
                self.path.write_text(intact)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def done(self, kind: str) -> set[tuple[str, str]]:
        return {(r["config"], r["id"]) for r in self.records if r.get("kind") == kind}

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("kind") == kind]

    def append(self, records: list[dict[str, Any]]) -> None:
        with open(self.path, "a") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records += records
