"""GGUF import: a tiny model written the way llama.cpp writes it comes back with identical logits; bad
metadata and unwritable or full output folders are one line and leave nothing behind."""

import errno
import json
import os
from pathlib import Path
from unittest import mock

import gguf
import pytest
import torch
import transformers
from safetensors.torch import load_file

from ggufs import dequantized_state, tree, write_gguf
from lemma import Engine, LemmaError
from lemma.models.config import ModelConfig
from lemma.models.gguf import convert_gguf
from test_cli import assert_one_line_error, invoke


@pytest.mark.parametrize("kind", ["llama-mha-untied", "qwen2", "qwen3"])
def test_f32_gguf_round_trip_gives_the_same_logits(kind, tiny_models, tmp_path):
    src = tiny_models[kind]
    out = convert_gguf(write_gguf(src, tmp_path / "m.gguf"), tmp_path / "imported")
    ids = list(range(4, 60))
    hf = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0]
    ours = Engine(out, kv_cache_tokens=256).logits(ids)
    assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-5
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] == hf.config.tie_word_embeddings


@pytest.mark.parametrize("quant", [gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0])
def test_quantized_tensors_are_dequantized(quant, tiny_models, tmp_path):
    src = tiny_models["qwen2"]
    out = convert_gguf(write_gguf(src, tmp_path / "m.gguf", quant=quant), tmp_path / "imported")
    imported = load_file(out / "model.safetensors")
    for name, expected in dequantized_state(src, quant).items():
        assert torch.equal(imported[name], expected), name


def test_tokenizer_and_template_survive_the_import(tiny_dir, tmp_path):
    from lemma.models.tokenizer import Tokenizer

    out = convert_gguf(write_gguf(tiny_dir, tmp_path / "m.gguf"), tmp_path / "imported")
    before, after = Tokenizer(tiny_dir), Tokenizer(out)
    for text in ["The quick brown fox", "def add(a, b):\n    return a+b", "東京 🙂 café", "<|im_start|>user\nhi<|im_end|>"]:
        assert after.encode(text) == before.encode(text)
        assert after.decode(after.encode(text), skip_special_tokens=False) == text
    messages = [{"role": "user", "content": "hi"}]
    assert after.apply_chat_template(messages) == before.apply_chat_template(messages)
    assert after.eos_ids == [before.token_id("<|im_end|>")]


def test_unsupported_architecture(tiny_dir, tmp_path):
    path = write_gguf(tiny_dir, tmp_path / "m.gguf", arch="falcon")
    with pytest.raises(LemmaError, match="GGUF architecture 'falcon' is not supported; supported: llama, qwen2, qwen3"):
        convert_gguf(path, tmp_path / "out")


def test_unsupported_pre_tokenizer(tiny_dir, tmp_path):
    path = write_gguf(tiny_dir, tmp_path / "m.gguf", pre="made-up")
    with pytest.raises(LemmaError, match="GGUF pre-tokenizer 'made-up' is not supported"):
        convert_gguf(path, tmp_path / "out")


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(LemmaError, match="not a readable GGUF file"):
        convert_gguf(bad, tmp_path / "out")


# ---- bad metadata and convert's output folder: one line, nothing of the user's changed ----------------

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


def _half_then_full(real):
    """`real` write that writes half of what it is given, then fails as a full disk does."""
    def write(path, data, *args, **kwargs):
        real(path, data[: len(data) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return write


DISK_FULL = "No space left on device (os error 28)"


@pytest.mark.parametrize("where", ["safetensors", "tokenizer.json", "config.json"])
def test_a_full_disk_while_converting_is_one_line_and_leaves_nothing(tiny_gguf, tmp_path, monkeypatch, where):
    """safetensors and tokenizers raise their own exception types on a failed write (with "os error 28"
    in the message, as they do for real); a config file's write fails half-way. Each is the same line."""
    import safetensors
    import safetensors.torch
    import tokenizers

    if where == "safetensors":
        def save_file(tensors, filename, metadata=None):
            Path(filename).write_bytes(b"half a tensor")
            raise safetensors.SafetensorError(f"Error while serializing: I/O error: {DISK_FULL}")
        monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    elif where == "tokenizer.json":
        def save(self, path, pretty=True):
            Path(path).write_text('{"half": ')
            raise Exception(DISK_FULL)
        monkeypatch.setattr(tokenizers.Tokenizer, "save", save)
    else:
        real = Path.write_text
        monkeypatch.setattr(Path, "write_text", lambda self, data, *a, **k: (
            _half_then_full(real)(self, data, *a, **k) if self.name == "config.json" else real(self, data, *a, **k)))
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "a" / "out", tmp_path / "empty"):
        assert_one_line_error(invoke("convert", tiny_gguf, out), f"{out}: cannot write (No space left on device)")
    assert tree(tmp_path) == {"empty": None}


def test_an_error_of_the_writers_that_is_no_io_error_is_not_hidden(tiny_gguf, tmp_path, monkeypatch):
    import safetensors
    import safetensors.torch

    def save_file(*args, **kwargs):
        raise safetensors.SafetensorError("tensors share memory")

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    with pytest.raises(safetensors.SafetensorError, match="share memory"):
        convert_gguf(tiny_gguf, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_convert_into_new_nested_or_empty_folders(tiny_gguf, tmp_path):
    assert invoke("convert", tiny_gguf, tmp_path / "a" / "b" / "out").exit_code == 0
    (tmp_path / "empty").mkdir()
    assert invoke("convert", tiny_gguf, tmp_path / "empty").exit_code == 0
    assert ModelConfig.from_dir(tmp_path / "empty").num_layers == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
