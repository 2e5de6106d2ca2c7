"""Import a GGUF file into a Hugging Face layout folder: config.json, model.safetensors (dequantized),
tokenizer.json (built with `tokenizers` from the GGUF vocabulary), tokenizer_config.json (chat
template) and generation_config.json (EOS ids)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lemma.errors import LemmaError

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3")

LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
               "output.weight": "lm_head.weight"}

GPT2_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
QWEN2_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
               r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
LLAMA3_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# tokenizer.ggml.pre -> (split regex or None for GPT-2's own, split digits one by one, NFC normalise)
PRE_TOKENIZERS = {
    "default": (None, False, False),
    "gpt-2": (None, False, False),
    "smollm": (None, True, False),
    "qwen2": (QWEN2_REGEX, False, True),
    "llama-bpe": (LLAMA3_REGEX, False, False),
}


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return value


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter interleaves the two RoPE halves of llama q/k rows; put them back."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_config(reader: Any) -> dict[str, Any]:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise LemmaError(f"GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHS)}")
    get = lambda key, default=None: _field(reader, f"{arch}.{key}", default)  # noqa: E731
    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    names = {t.name for t in reader.tensors}
    config: dict[str, Any] = {
        "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]],
        "model_type": arch,
        "vocab_size": int(get("vocab_size", len(tokens))),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in names
    scaling = get("rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise LemmaError(f"GGUF rope scaling {scaling!r} is not supported (only linear)")
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    return config


def gguf_tensors(reader: Any, config: dict[str, Any], dtype: torch.dtype,
                 progress: Callable[[int], None] | None = None) -> dict[str, torch.Tensor]:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    out: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            raise LemmaError("GGUF tensor rope_freqs.weight (llama3-style rope scaling factors) is not supported yet")
        name = TOP_TENSORS.get(t.name)
        if name is None:
            m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", t.name)
            if m is None or m.group(2) not in LAYER_TENSORS:
                raise LemmaError(f"GGUF tensor {t.name} has no Hugging Face counterpart")
            name = f"model.layers.{m.group(1)}.{LAYER_TENSORS[m.group(2)]}.{m.group(3)}"
        try:
            array = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            qtype = GGMLQuantizationType(t.tensor_type).name
            raise LemmaError(f"GGUF tensor {t.name}: quantization {qtype} cannot be dequantized by the gguf package") from None
        array = np.asarray(array, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))
        if config["model_type"] == "llama" and t.name.endswith(("attn_q.weight", "attn_q.bias")):
            array = _unpermute(array, config["num_attention_heads"])
        elif config["model_type"] == "llama" and t.name.endswith(("attn_k.weight", "attn_k.bias")):
            array = _unpermute(array, config["num_key_value_heads"])
        out[name] = torch.from_numpy(np.array(array, copy=True)).to(dtype)
        if progress:
            progress(1)
    return out


def gguf_tokenizer(reader: Any) -> tuple[Any, dict[str, Any], list[int]]:
    """-> (tokenizers.Tokenizer, tokenizer_config dict, eos ids)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise LemmaError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise LemmaError(f"GGUF pre-tokenizer {pre!r} is not supported; supported: {', '.join(PRE_TOKENIZERS)}")
    regex, split_digits, nfc = PRE_TOKENIZERS[pre]
    tokens: list[str] = list(_field(reader, "tokenizer.ggml.tokens"))
    types: list[int] = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    steps = []
    if split_digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if regex is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True))
    else:
        steps.append(pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False))
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    # control tokens (type 3) are special; user-defined ones (type 4) match whole but are kept when decoding
    tok.add_tokens([AddedToken(t, special=ty == 3, normalized=False) for t, ty in zip(tokens, types) if ty in (3, 4)])

    def token_at(key: str) -> str | None:
        index = _field(reader, key)
        return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None

    eos_ids = sorted({int(i) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
                      if (i := _field(reader, k)) is not None})
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token_at("tokenizer.ggml.bos_token_id"),
        "eos_token": token_at("tokenizer.ggml.eos_token_id"),
        "pad_token": token_at("tokenizer.ggml.padding_token_id"),
        "unk_token": token_at("tokenizer.ggml.unknown_token_id"),
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "chat_template": _field(reader, "tokenizer.chat_template"),
        "model_max_length": int(_field(reader, f"{_field(reader, 'general.architecture')}.context_length", 4096)),
    }
    return tok, tok_config, eos_ids


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32,
                 progress: Callable[[int, int], Callable[[int], None]] | None = None) -> Path:
    """Write the HF folder for `gguf_path` into out_dir (which must not exist yet or be empty).
    `progress(total, ...)` may return a callback advanced once per tensor."""
    from gguf import GGUFReader
    from safetensors.torch import save_file

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise LemmaError(f"GGUF file not found: {gguf_path}")
    try:
        reader = GGUFReader(str(gguf_path))
    except Exception as exc:  # the gguf package raises ValueError/struct errors on a bad file
        raise LemmaError(f"{gguf_path}: not a readable GGUF file ({exc})") from None
    config = gguf_config(reader)
    tokenizer, tok_config, eos_ids = gguf_tokenizer(reader)
    advance = progress(len(reader.tensors)) if progress else None
    tensors = gguf_tensors(reader, config, dtype, advance)
    config["torch_dtype"] = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    if eos_ids:
        config["eos_token_id"] = eos_ids if len(eos_ids) > 1 else eos_ids[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False))
    generation = {"bos_token_id": config.get("bos_token_id"), "eos_token_id": eos_ids or config.get("eos_token_id")}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return out_dir
