"""Files the measuring commands write, checked before a run starts: a bad path fails in one line up front,
and an existing file that lemma did not write is never replaced."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lemma.errors import LemmaError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_writable(path: Path, label: str) -> None:
    """`path` can be written: not a folder or a special file, and its folder exists and is writable or
    can be created. `label` names the option or file in the error ("--out", "results file")."""
    try:
        if path.is_dir():
            raise LemmaError(f"{label} {path} is a folder; give a file name")
        if path.exists():
            if not path.is_file():
                raise LemmaError(f"{label} {path} is not a regular file")
            if not os.access(path, os.W_OK):
                raise LemmaError(f"{label} {path} is not writable")
            return
        folder = _nearest_existing(path.parent)
        if not folder.is_dir():
            raise LemmaError(f"{label} {path} cannot be created: {folder} is not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise LemmaError(f"{label} {path} cannot be created: folder {folder} is not writable")
    except OSError as exc:  # a name too long, a loop of links, ...
        raise LemmaError(f"{label} {path}: {exc.strerror or exc}") from None


def check_replaceable(path: Path, label: str, is_ours: Callable[[Path], bool], kind: str) -> None:
    """check_writable, and an existing non-empty file at `path` must be `kind` (what lemma writes there)."""
    check_writable(path, label)
    if path.is_file() and path.stat().st_size and not is_ours(path):
        raise LemmaError(f"{label} {path} exists and is not {kind}; refusing to overwrite it (move it or pick another path)")


def check_png(path: Path, label: str) -> None:
    check_replaceable(path, label, _is_png, "a PNG image")


def plot_next_to(out: Path, label: str) -> Path:
    """The PNG written next to a results file, both checked."""
    check_writable(out, label)
    png = out.with_suffix(".png")
    if png == out:
        raise LemmaError(f"{label} {out} ends in .png, which is where the plot goes; give the results another suffix")
    check_png(png, f"{label} plot")
    return png


def is_json_object_with(path: Path, keys: tuple[str, ...]) -> bool:
    """Whether the file is one JSON object holding all of `keys` (how a lemma JSON output is recognised)."""
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and all(key in data for key in keys)


@contextmanager
def writing(path: Path, label: str) -> Iterator[None]:
    """Create the folder of `path`; an OSError while writing it becomes one line naming the file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield
    except OSError as exc:
        raise LemmaError(f"cannot write {label} {path}: {exc.strerror or exc}") from None


def _nearest_existing(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _is_png(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE
    except OSError:
        return False


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """A markdown table: columns are (key, header, format)."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [format(r[k], f) if r.get(k) is not None else "n/a" for k, _, f in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
