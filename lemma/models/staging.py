"""Writing model folders and output files so that they appear whole or not at all: a folder is built in a
`.NAME.partial-*` folder next to where it goes, a file in a temporary file beside it, and renamed into
place; a failure (a full disk among them) is one LemmaError naming what was being written."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lemma.errors import LemmaError


def describe(exc: OSError) -> str:
    return exc.strerror or str(exc)


class WriteFailed(LemmaError):
    """Writing a new folder failed (`reason`: the OS's words, e.g. "No space left on device")."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def os_error_of(exc: Exception) -> OSError | None:
    """The OSError behind an I/O failure of a Rust-backed library (safetensors, tokenizers), which raise
    their own exception types with "... (os error N) ..." in the message; None when it is no I/O error."""
    if isinstance(exc, OSError):
        return exc
    found = re.search(r"\(os error (\d+)\)", str(exc))
    return None if found is None else OSError(int(found[1]), os.strerror(int(found[1])))


def partial_prefix(name: str) -> str:
    return f".{name}.partial-"


@contextmanager
def staging_dir(parent: Path, name: str) -> Iterator[Path]:
    """A fresh `.NAME.partial-*` folder in `parent`, deleted with whatever it still holds on the way out."""
    with tempfile.TemporaryDirectory(prefix=partial_prefix(name), dir=parent) as tmp:
        yield Path(tmp)


def partial_folders(parent: Path, name: str) -> list[Path]:
    """The folders staging_dir(parent, name) made (tempfile adds 8 of [a-z0-9_]), and nothing else."""
    own_name = re.compile(re.escape(partial_prefix(name)) + r"[a-z0-9_]{8}")
    return sorted(p for p in parent.iterdir() if own_name.fullmatch(p.name) and p.is_dir() and not p.is_symlink())


def _require_writable(folder: Path, hint: str = "") -> None:
    if not folder.is_dir():
        raise LemmaError(f"{folder}: is not a folder{hint}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise LemmaError(f"{folder}: folder is not writable{hint}")


def ensure_writable_dir(folder: Path, hint: str = "") -> None:
    """Create `folder` if needed; a LemmaError naming it when it cannot be created or written to."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _require_writable(folder, hint)
    except OSError as exc:
        raise LemmaError(f"{folder}: cannot create this folder ({describe(exc)}){hint}") from None


def check_new_folder(target: Path) -> Path:
    """Check that `target` can be created: it is absent or an empty folder, and the closest existing folder
    above it is writable. -> that folder (where to stage the new one)."""
    try:
        if target.exists() and not target.is_dir():
            raise LemmaError(f"{target}: exists and is not a folder")
        if target.is_dir() and any(target.iterdir()):
            raise LemmaError(f"{target}: already exists and is not empty")
        above = target.absolute().parent
        while not above.exists():
            above = above.parent
        _require_writable(above, f" (cannot create {target} in it)")
    except OSError as exc:
        raise LemmaError(f"{target}: cannot create this folder ({describe(exc)})") from None
    return above


def write_new_folder(target: Path, write: Callable[[Path], None]) -> Path:
    """Create `target` (absent or an empty folder) holding what `write(folder)` puts in a new folder."""
    above = check_new_folder(target)
    try:
        with staging_dir(above, target.name) as staging:
            folder = staging / "new"
            folder.mkdir()
            write(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.is_dir():
                target.rmdir()  # empty (checked above); rmdir refuses otherwise, so nothing of the user's goes
            os.rename(folder, target)  # fails rather than overwrites if a file appeared there meanwhile
    except OSError as exc:
        raise WriteFailed(f"{target}: cannot write ({describe(exc)})", describe(exc)) from None
    return target


def replace_file(path: Path, data: bytes) -> None:
    """Write `data` to `path` whole or not at all: into a temporary file in the same folder, flushed to
    disk, then renamed over `path`. On an OSError (ENOSPC included) the temporary file is removed and
    `path` is as it was; the caller names the file in its message."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(name, path.stat().st_mode & 0o7777 if path.exists() else 0o644)
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
