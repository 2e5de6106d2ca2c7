"""Tokenizer: chat template vs transformers (and hostile templates failing fast), EOS gathering,
streaming detokenizer on byte-level splits."""

import json
import time

import pytest
import transformers

from lemma import Engine, LemmaError
from lemma.models.tokenizer import StreamingDetokenizer, Tokenizer
from test_errors import one_line

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


def with_tokenizer_files(tiny_dir, tmp_path, **files):
    """A copy of the tiny model's tokenizer files with some JSON files replaced (name without .json)."""
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json"):
        if (tiny_dir / name).is_file():
            shutil.copy(tiny_dir / name, tmp_path / name)
    for name, content in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(content))
    return tmp_path


@pytest.mark.parametrize("template, expected", [
    (42, "chat_template: must be a string, got 42"),
    ({"default": "{{ x }}"}, "chat_template: must be a string, got {'default': '{{ x }}'}"),
    (True, "chat_template: must be a string, got True"),
    (["{{ x }}"], "chat_template: a list must hold {'name', 'template'} objects with string templates, got ['{{ x }}']"),
    ([{"name": "default", "template": 7}], "chat_template: a list must hold {'name', 'template'} objects with string "
                                            "templates, got [{'name': 'default', 'template': 7}]"),
])
def test_a_chat_template_that_is_not_a_string_is_refused(tiny_dir, tmp_path, template, expected):
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    folder = with_tokenizer_files(tiny_dir, tmp_path, tokenizer_config={**config, "chat_template": template})
    with pytest.raises(LemmaError) as info:
        Tokenizer(folder)
    assert str(info.value) == f"{folder / 'tokenizer_config.json'}: {expected}"
    tok = Tokenizer(tiny_dir)
    tok.chat_template = ["set", "at run time"]
    with pytest.raises(LemmaError, match="^chat_template must be a string, got list$"):
        tok.apply_chat_template(MESSAGES)


def test_named_chat_templates_pick_the_default(tiny_dir, tmp_path):
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": config["chat_template"]}]
    folder = with_tokenizer_files(tiny_dir, tmp_path, tokenizer_config={**config, "chat_template": named})
    assert Tokenizer(folder).chat_template == config["chat_template"]


@pytest.mark.parametrize("files, expected", [
    ({"generation_config": {"eos_token_id": True}}, "generation_config.json: eos_token_id: must be a token id or a list "
                                                    "of token ids, got True"),
    ({"generation_config": {"eos_token_id": [2, False]}}, "generation_config.json: eos_token_id: must be a token id or "
                                                          "a list of token ids, got [2, False]"),
    ({"generation_config": {"eos_token_id": "</s>"}}, "generation_config.json: eos_token_id: must be a token id or a "
                                                      "list of token ids, got '</s>'"),
    ({"generation_config": [2]}, "generation_config.json: must be a JSON object, got list"),
    ({"tokenizer_config": "x"}, "tokenizer_config.json: must be a JSON object, got str"),
])
def test_stop_token_ids_that_are_not_ids_are_refused(tiny_dir, tmp_path, files, expected):
    folder = with_tokenizer_files(tiny_dir, tmp_path, **files)
    with pytest.raises(LemmaError) as info:
        Tokenizer(folder)
    assert str(info.value) == f"{folder}/{expected}"


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


@pytest.mark.parametrize("template, fragment", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "took longer than"),
    ("{{ 'ab' * 10**9 }}", "builds a value over"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}", "over"),
    ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "RecursionError"),
])
def test_hostile_chat_templates_fail_fast(tiny_dir, template, fragment):
    engine = Engine(tiny_dir, kv_cache_tokens=256)
    engine.tokenizer.chat_template = template
    start = time.monotonic()
    with pytest.raises(LemmaError) as info:
        engine.chat([{"role": "user", "content": "hi"}])
    assert fragment in str(info.value) and one_line(str(info.value))
    assert time.monotonic() - start < 10 and engine.pages.all_free
