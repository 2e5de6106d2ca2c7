"""The real demo models, imported from their GGUF files: logits, greedy generation, tokenizer and chat
template against transformers. SmolLM2 runs by default (pulled on first use, then reused); the 490 MB
Qwen2.5-Coder import runs with LEMMA_SLOW=1."""

import os
import unicodedata

import pytest
import torch
import transformers
from gguf import GGUFReader
from transformers import GenerationConfig

from lemma import Engine, SamplingParams
from lemma.models.store import SOURCE_GGUF, pull

MODELS = [
    pytest.param("smollm2-135m-instruct", id="smollm2"),
    pytest.param("qwen2.5-coder-0.5b-instruct", id="qwen2.5-coder",
                 marks=pytest.mark.skipif(not os.environ.get("LEMMA_SLOW"), reason="490 MB download; set LEMMA_SLOW=1")),
]
STRINGS = [
    "Hello world, how are you?", "   leading spaces", "trailing spaces   ", "tabs\tand\nnewlines\n\n\n",
    "1234567890", "3.14159 + 2.71828 = 5.85987", "phone 555-0123, year 2024", "x = 10**12 // 7",
    "naïve café résumé", "Ünïcödé façade", "東京は日本の首都です", "Привет, мир!", "مرحبا بالعالم", "🙂🤖👍🏽 emoji",
    "def add(a, b):\n    return a + b\n", "for (int i = 0; i < n; ++i) { sum += a[i]; }", "<div class=\"x\">&amp;</div>",
    "SELECT * FROM users WHERE id = 42;", "She said 'hello' and he'd say \"bye\".", "It's, we're, they'll, I'd",
    "CamelCaseIdentifier snake_case_name", "https://example.com/path?q=1&r=2", "\\frac{1}{2} + \\sqrt{x^2}",
    "$$\\boxed{42}$$", "a\u0301 e\u0301 combining accents", "!!!???...---", "     ", "\n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|>",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "Name three primes."}],
    [{"role": "user", "content": "Write a haiku about the sea."}, {"role": "assistant", "content": "Waves fold into foam."},
     {"role": "user", "content": "Another one, about mountains."}],
]


@pytest.fixture(scope="module", params=MODELS)
def demo(request):
    folder = pull(request.param, keep_gguf=True, quiet=True)
    engine = Engine(folder, kv_cache_tokens=4096)
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=SOURCE_GGUF)
    if not hf_tok.chat_template:  # transformers' GGUF import does not always carry the template over
        hf_tok.chat_template = GGUFReader(folder / SOURCE_GGUF).fields["tokenizer.chat_template"].contents()
    return request.param, engine, hf_tok


def test_logits_match_transformers_on_the_imported_folder(demo):
    _, engine, _ = demo
    hf = transformers.AutoModelForCausalLM.from_pretrained(engine.model_dir, dtype=torch.float32).eval()
    ids = engine.chat_prompt(CHATS[1]) + engine.tokenizer.encode(" 2, 3 and 5 are primes; so is 7.")
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0]
    ours = engine.logits(ids)
    assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-4


def test_greedy_generation_matches_transformers(demo):
    _, engine, _ = demo
    hf = transformers.AutoModelForCausalLM.from_pretrained(engine.model_dir, dtype=torch.float32).eval()
    prompts = [engine.chat_prompt(m) for m in CHATS]
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    hf.generation_config.eos_token_id = None  # run all 32 tokens, as ignore_eos does
    config = GenerationConfig(max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    for ids, out in zip(prompts, outs):
        expected = hf.generate(torch.tensor([ids]), generation_config=config)[0, len(ids):].tolist()
        assert out.token_ids == expected


def test_tokenizer_matches_the_original(demo):
    name, engine, hf_tok = demo
    for text in STRINGS:
        ours = engine.tokenizer.encode(text)
        # transformers' GGUF tokenizer lacks Qwen2's NFC normaliser; normalising its input restores the original
        oracle_input = unicodedata.normalize("NFC", text) if name.startswith("qwen") else text
        assert ours == hf_tok.encode(oracle_input, add_special_tokens=False), text
        assert engine.tokenizer.decode(ours, skip_special_tokens=False) == oracle_input
    if name.startswith("smollm"):  # SmolLM2 splits every digit on its own
        assert engine.tokenizer.encode("1234567890") == [engine.tokenizer.token_id(d) for d in "1234567890"]


def test_chat_template_renders_as_transformers(demo):
    _, engine, hf_tok = demo
    for messages in CHATS:
        expected = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert engine.tokenizer.apply_chat_template(messages) == expected


def test_the_demo_model_answers(demo):
    name, engine, _ = demo
    out = engine.chat(CHATS[0], SamplingParams(temperature=0, max_tokens=24))
    assert "Paris" in out.text
    assert out.finish_reason == "stop"  # ends with its own EOS well before max_tokens
