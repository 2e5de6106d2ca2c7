"""Bad input gives one clear line naming the thing at fault."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lemma import Engine, LemmaError, SamplingParams


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def error_of(fn) -> str:
    with pytest.raises(LemmaError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_model_dir(tmp_path):
    assert error_of(lambda: Engine(tmp_path / "nope")) == f"model directory not found: {tmp_path / 'nope'}"


def test_missing_config(tmp_path):
    assert "config.json is missing" in error_of(lambda: Engine(tmp_path))


def test_unsupported_model_type(tiny_dir, tmp_path):
    d = copy_model(tiny_dir, tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    config["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(config))
    message = error_of(lambda: Engine(d))
    assert "unsupported model_type 'gpt2'" in message and "llama, mistral, qwen2, qwen3" in message


def _rewrite_weights(d, edit):
    path = d / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)
    return path


def test_missing_tensor(tiny_dir, tmp_path):
    d = copy_model(tiny_dir, tmp_path / "m")
    _rewrite_weights(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    assert "tensor model.layers.1.mlp.up_proj.weight is missing" in error_of(lambda: Engine(d))


def test_unexpected_tensor(tiny_dir, tmp_path):
    d = copy_model(tiny_dir, tmp_path / "m")
    path = _rewrite_weights(d, lambda t: t.update({"model.layers.0.extra.weight": torch.ones(2)}))
    assert error_of(lambda: Engine(d)) == f"{path}: unexpected tensor model.layers.0.extra.weight for model_type llama"


def test_wrongly_shaped_tensor(tiny_dir, tmp_path):
    d = copy_model(tiny_dir, tmp_path / "m")
    path = _rewrite_weights(d, lambda t: t.update({"model.norm.weight": torch.ones(7)}))
    assert error_of(lambda: Engine(d)) == f"{path}: tensor model.norm.weight has shape (7,), expected (64,)"


def test_corrupt_safetensors(tiny_dir, tmp_path):
    d = copy_model(tiny_dir, tmp_path / "m")
    path = d / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    assert error_of(lambda: Engine(d)).startswith(f"{path}: corrupt or unreadable safetensors file")


def test_no_weights(tiny_dir, tmp_path):
    d = copy_model(tiny_dir, tmp_path / "m")
    (d / "model.safetensors").unlink()
    assert "no *.safetensors weights found" in error_of(lambda: Engine(d))


def test_missing_tokenizer(tiny_dir, tmp_path):
    d = copy_model(tiny_dir, tmp_path / "m")
    (d / "tokenizer.json").unlink()
    assert "tokenizer.json is missing" in error_of(lambda: Engine(d))


def test_bad_dtype(tiny_dir):
    assert "unknown dtype 'float8'" in error_of(lambda: Engine(tiny_dir, dtype="float8"))


def test_empty_prompt_and_oversized_request_raise_in_stream_and_chat(tiny_dir):
    engine = Engine(tiny_dir, kv_cache_tokens=64)
    assert error_of(lambda: list(engine.stream(""))) == "prompt is empty"
    message = error_of(lambda: list(engine.stream("hello", SamplingParams(max_tokens=100))))
    assert message.startswith("request needs") and "the whole pool holds 64" in message
    assert "lower max_tokens" in message
    assert "prompt is empty" in engine.generate([""], SamplingParams(max_tokens=4))[0].error
    assert engine.pages.all_free


def test_bad_chat_messages(tiny_dir):
    engine = Engine(tiny_dir, kv_cache_tokens=64)
    assert "messages[0] must be a dict with 'role' and 'content'" in error_of(lambda: engine.chat([{"text": "hi"}]))
