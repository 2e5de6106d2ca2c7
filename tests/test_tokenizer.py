"""Tokenizer: chat template vs transformers, EOS gathering, streaming detokenizer on byte-level splits."""

import json

import transformers

from lemma.models.tokenizer import StreamingDetokenizer, Tokenizer

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 17*23?"},
    {"role": "assistant", "content": "391"},
    {"role": "user", "content": "And 東京 🙂?"},
]


def test_chat_template_renders_as_transformers(tiny_dir):
    ours = Tokenizer(tiny_dir)
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tiny_dir / "tokenizer.json"))
    theirs.chat_template = json.loads((tiny_dir / "tokenizer_config.json").read_text())["chat_template"]
    for gen in (True, False):
        expected = theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen)
        assert ours.apply_chat_template(MESSAGES, add_generation_prompt=gen) == expected


def test_template_cannot_escape_the_sandbox(tiny_dir, tmp_path):
    import pytest

    from lemma import LemmaError

    tok = Tokenizer(tiny_dir)
    tok.chat_template = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(LemmaError, match="chat template failed to render"):
        tok.apply_chat_template(MESSAGES)


def test_eos_ids_gathered_from_all_sources(tiny_dir):
    tok = Tokenizer(tiny_dir)
    im_end = tok.token_id("<|im_end|>")
    # config.json and generation_config.json say 2; tokenizer_config.json's eos_token is <|im_end|>
    assert tok.eos_ids == sorted({2, im_end})


def test_streaming_detokenizer_never_emits_broken_utf8(tiny_dir):
    tok = Tokenizer(tiny_dir)
    text = "naïve café 東京 🙂 emoji 🤖 and code: def f(x): return x**2"
    ids = tok.encode(text)
    # force byte-level splits of multi-byte characters: encode each byte as its own token
    byte_ids = [tid for ch in text for tid in tok.encode(ch)]
    for seq in (ids, byte_ids):
        detok = StreamingDetokenizer(tok)
        pieces = [detok.add(t) for t in seq]
        pieces.append(detok.flush())
        assert "".join(pieces) == text
        assert all("\ufffd" not in p for p in pieces)
