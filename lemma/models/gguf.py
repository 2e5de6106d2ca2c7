"""Import a GGUF file into a Hugging Face layout folder: config.json, model.safetensors (dequantized, or with
`keep_quantized` the projections of the formats models/gguf_quant.py repacks kept quantized),
tokenizer.json (built with `tokenizers` from the GGUF vocabulary), tokenizer_config.json (chat
template) and generation_config.json (EOS ids)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lemma.errors import LemmaError
from lemma.models.config import CheckedFields, ModelConfig, shown
from lemma.models.gguf_quant import repack
from lemma.models.staging import check_new_folder, os_error_of, write_new_folder

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


def read_metadata(reader: Any, source: Path) -> CheckedFields:
    """The file's key/value metadata, for checked reads naming the file and the key."""
    values: dict[str, Any] = {}
    for key, field in reader.fields.items():
        try:
            values[key] = field.contents()
        except (UnicodeDecodeError, ValueError, IndexError) as exc:
            raise LemmaError(f"{source}: GGUF metadata {key}: unreadable ({exc})") from None
    return CheckedFields(values, str(source), prefix="GGUF metadata ")


def _unpermute(w: np.ndarray, heads: int, source: Path, name: str) -> np.ndarray:
    """llama.cpp's converter interleaves the two RoPE halves of llama q/k rows; put them back."""
    rows = w.shape[0]
    if rows % (2 * heads):
        raise LemmaError(f"{source}: GGUF tensor {name} has {rows} rows, which do not split into {heads} heads")
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_config(metadata: CheckedFields, tensor_names: set[str]) -> dict[str, Any]:
    """The config.json of the model, checked as ModelConfig checks a config.json."""
    arch = metadata.raw.get("general.architecture")
    if arch is None:
        raise metadata.error("general.architecture", "is missing")
    if arch not in SUPPORTED_ARCHS:
        raise LemmaError(f"{metadata.source}: GGUF architecture {shown(arch)} is not supported; "
                         f"supported: {', '.join(SUPPORTED_ARCHS)}")
    tokens = metadata.strings("tokenizer.ggml.tokens")
    heads = metadata.positive_int(f"{arch}.attention.head_count")
    config: dict[str, Any] = {
        "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]],
        "model_type": arch,
        "vocab_size": metadata.positive_int(f"{arch}.vocab_size", len(tokens)),
        "hidden_size": metadata.positive_int(f"{arch}.embedding_length"),
        "intermediate_size": metadata.positive_int(f"{arch}.feed_forward_length"),
        "num_hidden_layers": metadata.positive_int(f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": metadata.positive_int(f"{arch}.attention.head_count_kv", heads),
        "rms_norm_eps": metadata.positive_number(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": metadata.positive_number(f"{arch}.rope.freq_base", 10000.0),
        "max_position_embeddings": metadata.positive_int(f"{arch}.context_length", 4096),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": metadata.optional_token_id("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.optional_token_id("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    head_dim = metadata.optional_positive_int(f"{arch}.attention.key_length")
    if head_dim is not None:  # else hidden_size // num_attention_heads, as in a config.json
        config["head_dim"] = head_dim
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    scaling = metadata.optional_str(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise metadata.error(f"{arch}.rope.scaling.type", f"{scaling!r} is not supported (only linear)")
        config["rope_scaling"] = {"rope_type": "linear", "factor": metadata.positive_number(f"{arch}.rope.scaling.factor")}
    ModelConfig.from_dict(config, source=metadata.source)  # the checks across fields (heads, head_dim)
    return config


def _unpermuted(config: dict[str, Any], gguf_name: str, array: Any, source: Path) -> Any:
    """A llama q/k tensor's rows (float, or quantized rows with their scales) in Hugging Face order."""
    if config["model_type"] == "llama" and gguf_name.endswith(("attn_q.weight", "attn_q.bias")):
        return _unpermute(array, config["num_attention_heads"], source, gguf_name)
    if config["model_type"] == "llama" and gguf_name.endswith(("attn_k.weight", "attn_k.bias")):
        return _unpermute(array, config["num_key_value_heads"], source, gguf_name)
    return array


def _kept_quantized(t: Any, name: str, config: dict[str, Any], source: Path) -> dict[str, torch.Tensor] | None:
    """The projection `name` as quantized tensors (name.qweight, ...) if its type is one lemma runs as is."""
    from gguf import GGMLQuantizationType

    if not name.endswith(("_proj.weight", "lm_head.weight", "embed_tokens.weight")) or len(t.shape) != 2:
        return None
    qtype = GGMLQuantizationType(t.tensor_type).name
    cols, rows = int(t.shape[0]), int(t.shape[1])
    parts = repack(qtype, t.data, rows, cols) if cols % 32 == 0 else None
    if parts is None:
        return None
    base = name.removesuffix(".weight")
    return {f"{base}.{key}": torch.from_numpy(np.ascontiguousarray(_unpermuted(config, t.name, value.numpy(), source)))
            for key, value in parts.items()}


def gguf_tensors(reader: Any, config: dict[str, Any], dtype: torch.dtype, source: Path,
                 progress: Callable[[int], None] | None = None, keep_quantized: bool = False) -> dict[str, torch.Tensor]:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    out: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            raise LemmaError(f"{source}: GGUF tensor rope_freqs.weight (llama3-style rope scaling factors) "
                             "is not supported yet")
        name = TOP_TENSORS.get(t.name)
        if name is None:
            m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", t.name)
            if m is None or m.group(2) not in LAYER_TENSORS:
                raise LemmaError(f"{source}: GGUF tensor {t.name} has no Hugging Face counterpart")
            name = f"model.layers.{m.group(1)}.{LAYER_TENSORS[m.group(2)]}.{m.group(3)}"
        kept = _kept_quantized(t, name, config, source) if keep_quantized else None
        if kept is not None and name == "model.embed_tokens.weight":
            # the embedding stays float (a lookup); a tied head runs on its blocks as stored
            if config["tie_word_embeddings"]:
                out.update({key.replace("model.embed_tokens", "lm_head"): value for key, value in kept.items()})
        elif kept is not None:
            out.update(kept)
            if progress:
                progress(1)
            continue
        try:
            array = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            qtype = GGMLQuantizationType(t.tensor_type).name
            raise LemmaError(f"{source}: GGUF tensor {t.name}: quantization {qtype} cannot be dequantized "
                             "by the gguf package") from None
        array = np.asarray(array, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))
        array = _unpermuted(config, t.name, array, source)
        out[name] = torch.from_numpy(np.array(array, copy=True)).to(dtype)
        if progress:
            progress(1)
    return out


def gguf_tokenizer(metadata: CheckedFields) -> tuple[Any, dict[str, Any], list[int]]:
    """-> (tokenizers.Tokenizer, tokenizer_config dict, eos ids)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    kind = metadata.raw.get("tokenizer.ggml.model")
    if kind is None:
        raise metadata.error("tokenizer.ggml.model", "is missing")
    if kind != "gpt2":
        raise LemmaError(f"{metadata.source}: GGUF tokenizer model {shown(kind)} is not supported "
                         "(only byte-level BPE, 'gpt2')")
    pre = metadata.optional_str("tokenizer.ggml.pre") or "default"
    if pre not in PRE_TOKENIZERS:
        raise LemmaError(f"{metadata.source}: GGUF pre-tokenizer {pre!r} is not supported; "
                         f"supported: {', '.join(PRE_TOKENIZERS)}")
    regex, split_digits, nfc = PRE_TOKENIZERS[pre]
    tokens = metadata.strings("tokenizer.ggml.tokens")
    types = metadata.raw.get("tokenizer.ggml.token_type", [1] * len(tokens))
    if not isinstance(types, list) or len(types) != len(tokens):
        raise metadata.error("tokenizer.ggml.token_type", f"must hold one type per token ({len(tokens)}), got {shown(types)}")
    merges = [tuple(m.split(" ", 1)) for m in metadata.strings("tokenizer.ggml.merges")]
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
        index = metadata.optional_token_id(key)
        return tokens[index] if index is not None and index < len(tokens) else None

    eos_ids = sorted({i for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
                      if (i := metadata.optional_token_id(k)) is not None})
    arch = metadata.raw["general.architecture"]
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token_at("tokenizer.ggml.bos_token_id"),
        "eos_token": token_at("tokenizer.ggml.eos_token_id"),
        "pad_token": token_at("tokenizer.ggml.padding_token_id"),
        "unk_token": token_at("tokenizer.ggml.unknown_token_id"),
        "add_bos_token": metadata.flag("tokenizer.ggml.add_bos_token"),
        "chat_template": metadata.optional_str("tokenizer.chat_template"),
        "model_max_length": metadata.positive_int(f"{arch}.context_length", 4096),
    }
    return tok, tok_config, eos_ids


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32,
                 progress: Callable[[int, int], Callable[[int], None]] | None = None, keep_quantized: bool = False) -> Path:
    """Write the HF folder for `gguf_path` at out_dir, which must not exist yet or be an empty folder.
    Everything is read and checked before anything is written, and the folder appears whole or not at all.
    `progress(total, ...)` may return a callback advanced once per tensor. With `keep_quantized`, projections
    in Q8_0/Q5_0/Q4_0/Q4_1/Q4_K stay quantized (models/gguf_quant.py); the rest is dequantized to `dtype`."""
    from gguf import GGUFReader

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise LemmaError(f"GGUF file not found: {gguf_path}")
    check_new_folder(out_dir)
    try:
        reader = GGUFReader(str(gguf_path))
    except Exception as exc:  # the gguf package raises ValueError/struct errors on a bad file
        raise LemmaError(f"{gguf_path}: not a readable GGUF file ({exc})") from None
    metadata = read_metadata(reader, gguf_path)
    config = gguf_config(metadata, {t.name for t in reader.tensors})
    tokenizer, tok_config, eos_ids = gguf_tokenizer(metadata)
    advance = progress(len(reader.tensors)) if progress else None
    tensors = gguf_tensors(reader, config, dtype, gguf_path, advance, keep_quantized)
    config["torch_dtype"] = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    if eos_ids:
        config["eos_token_id"] = eos_ids if len(eos_ids) > 1 else eos_ids[0]
    generation = {"bos_token_id": config.get("bos_token_id"), "eos_token_id": eos_ids or config.get("eos_token_id")}

    def write(folder: Path) -> None:
        from safetensors.torch import save_file

        with _io_errors_as_oserror():  # a full disk inside safetensors or tokenizers is an OSError too
            save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
            tokenizer.save(str(folder / "tokenizer.json"))
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False))
        (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))

    return write_new_folder(out_dir, write)


@contextmanager
def _io_errors_as_oserror() -> Iterator[None]:
    """safetensors and tokenizers report a failed write (ENOSPC, EIO, ...) as their own exception types;
    raise it as the OSError it is, so the caller's one-line message and clean-up apply."""
    try:
        yield
    except OSError:
        raise
    except Exception as exc:
        error = os_error_of(exc)
        if error is None:
            raise
        raise error from None
