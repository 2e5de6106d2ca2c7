import os

import torch

if not torch.cuda.is_available():  # Triton kernels run in the interpreter; must precede any triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("LEMMA_COMPILE", "0")  # the CLI compiles by default; the suite asks for it where it tests it

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. 17 * 23 = 391.",
    "Name three primes: 2, 3, 5, 7, 11, 13. Tell me a story about a robot.",
    "def add(a, b):\n    return a + b\n# comments and code, café, naïve, 東京, emoji 🙂",
    "Once upon a time there was a tiny model that answered every question with numbers.",
]

# Tiny random-init configs covering what the decoder must get right (transformers 5.x field names).
TINY_CONFIGS = {
    "llama": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                  rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "llama-mha-untied": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                             attention_bias=True, rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0}),
    "qwen2": dict(model_type="qwen2", num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "qwen3": dict(model_type="qwen3", num_attention_heads=4, num_key_value_heads=1, head_dim=32, tie_word_embeddings=True,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
}


def build_tokenizer(out: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": None, "add_bos_token": False}))
    return tok.get_vocab_size()


def make_tiny_model(out: Path, kind: str, seed: int = 0) -> Path:
    """A random-init transformers model of `kind` saved as a Hugging Face directory with a tokenizer."""
    import transformers

    out.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(out)
    spec = dict(TINY_CONFIGS[kind])
    model_type = spec.pop("model_type")
    config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[model_type]
    config = config_cls(vocab_size=vocab, hidden_size=96 if "6" in str(spec["num_attention_heads"]) else 64,
                        intermediate_size=128, num_hidden_layers=2, max_position_embeddings=1024,
                        initializer_range=0.1, eos_token_id=2, bos_token_id=None, **spec)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {kind: make_tiny_model(root / kind, kind) for kind in TINY_CONFIGS}


@pytest.fixture(scope="session")
def tiny_dir(tiny_models) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def tiny_gguf(tiny_dir, tmp_path_factory) -> Path:
    """The tiny llama written as a GGUF file (tests/ggufs.py)."""
    from ggufs import write_gguf

    return write_gguf(tiny_dir, tmp_path_factory.mktemp("gguf") / "m.gguf")
