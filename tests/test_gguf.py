"""GGUF import: a tiny model written the way llama.cpp writes it comes back with identical logits."""

import json

import gguf
import pytest
import torch
import transformers
from safetensors.torch import load_file

from ggufs import dequantized_state, write_gguf
from lemma import Engine, LemmaError
from lemma.models.gguf import convert_gguf


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
