"""ModelConfig: the decoder's hyper-parameters, read from config.json in transformers 4.x or 5.x form.

Every field is checked before any tensor is read; a wrong type or value is one line,
`<source>: <field>: <what is wrong>`."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lemma.errors import LemmaError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_ACTIVATIONS = ("silu", "swish")  # the same function; the decoder's MLP is SwiGLU
KNOWN_DTYPES = ("float32", "bfloat16", "float16", "float64")  # what checkpoints say they were saved in
REQUIRED = object()  # default of a field that must be present


def shown(value: Any, limit: int = 40) -> str:
    """A short one-line repr of a JSON value for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def finite_float(value: Any) -> float | None:
    """A JSON number as a finite float, else None (strings, bools, nan, inf, ints beyond float range)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


class CheckedFields:
    """Checked reads from one JSON object (or a GGUF file's metadata); `prefix` goes before a key in
    messages ("rope_scaling." for a nested object)."""

    def __init__(self, raw: dict[str, Any], source: str, prefix: str = ""):
        self.raw, self.source, self.prefix = raw, source, prefix

    def error(self, key: str, problem: str) -> LemmaError:
        return LemmaError(f"{self.source}: {self.prefix}{key}: {problem}")

    def _present(self, key: str, default: Any) -> Any:
        value = self.raw.get(key, default)
        if value is REQUIRED:
            raise self.error(key, "is missing")
        return value

    def positive_int(self, key: str, default: Any = REQUIRED) -> int:
        value = self._present(key, default)
        if not is_int(value) or value <= 0:
            raise self.error(key, f"must be a positive integer, got {shown(value)}")
        return value

    def optional_positive_int(self, key: str) -> int | None:
        """Absent and null (the transformers way of saying "derive it") both give None."""
        return None if self.raw.get(key) is None else self.positive_int(key)

    def positive_number(self, key: str, default: Any = REQUIRED) -> float:
        value = self._present(key, default)
        number = finite_float(value)
        if number is None or number <= 0:
            raise self.error(key, f"must be a positive number, got {shown(value)}")
        return number

    def flag(self, key: str, default: bool = False) -> bool:
        value = self.raw.get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {shown(value)}")
        return value

    def optional_str(self, key: str) -> str | None:
        value = self.raw.get(key)
        if value is not None and not isinstance(value, str):
            raise self.error(key, f"must be a string, got {shown(value)}")
        return value

    def optional_choice(self, key: str, choices: tuple[str, ...], what: str) -> str | None:
        """Absent or null gives None; else one of `choices` (`what` names the kind in the message)."""
        value = self.raw.get(key)
        if value is not None and (not isinstance(value, str) or value not in choices):
            raise self.error(key, f"unsupported {what} {shown(value)}; supported: {', '.join(choices)}")
        return value

    def optional_object(self, key: str) -> dict[str, Any] | None:
        value = self.raw.get(key)
        if value is not None and not isinstance(value, dict):
            raise self.error(key, f"must be an object, got {shown(value)}")
        return value

    def optional_token_id(self, key: str) -> int | None:
        value = self.raw.get(key)
        if value is not None and (not is_int(value) or value < 0):
            raise self.error(key, f"must be a token id (an integer >= 0), got {shown(value)}")
        return value

    def strings(self, key: str) -> list[str]:
        """A required, non-empty list of strings."""
        value = self._present(key, REQUIRED)
        if not isinstance(value, list) or not value or not all(isinstance(item, str) for item in value):
            raise self.error(key, f"must be a non-empty list of strings, got {shown(value)}")
        return value

    def token_ids(self, key: str) -> list[int]:
        """An id or a list of ids; absent or null is no ids."""
        value = self.raw.get(key)
        ids = [] if value is None else value if isinstance(value, list) else [value]
        if not all(is_int(i) and i >= 0 for i in ids):
            raise self.error(key, f"must be a token id or a list of token ids, got {shown(value)}")
        return ids


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] = field(default_factory=dict)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 4096
    torch_dtype: str | None = None
    eos_token_id: list[int] = field(default_factory=list)
    bos_token_id: int | None = None

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_dict(cls, raw: Any, source: str = "config.json") -> "ModelConfig":
        if not isinstance(raw, dict):
            raise LemmaError(f"{source}: must be a JSON object with the model's fields, got {type(raw).__name__}")
        fields = CheckedFields(raw, source)
        model_type = raw.get("model_type")
        if not isinstance(model_type, str) or model_type not in SUPPORTED_MODEL_TYPES:
            raise LemmaError(
                f"{source}: unsupported model_type {shown(model_type)}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        hidden_size = fields.positive_int("hidden_size")
        num_heads, num_kv_heads, head_dim = _attention_shape(fields, hidden_size)
        rope_theta, rope_scaling = _rope(fields)
        attention_bias = fields.flag("attention_bias")
        fields.optional_choice("hidden_act", SUPPORTED_ACTIVATIONS, "activation")
        dtypes = [fields.optional_choice(key, KNOWN_DTYPES, "dtype") for key in ("dtype", "torch_dtype")]
        vocab_size = fields.positive_int("vocab_size")
        eos_ids = fields.token_ids("eos_token_id")
        if any(i >= vocab_size for i in eos_ids):  # an EOS the model can never produce: replies never stop
            raise fields.error("eos_token_id", f"{max(eos_ids)} is outside the vocabulary (vocab_size {vocab_size})")
        return cls(
            model_type=model_type,
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=fields.positive_int("intermediate_size"),
            num_layers=fields.positive_int("num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=fields.positive_number("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=fields.flag("tie_word_embeddings"),
            # Qwen2 always has q/k/v bias and no o bias; the others put attention_bias on all four.
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type != "qwen2" and attention_bias,
            mlp_bias=fields.flag("mlp_bias"),
            qk_norm=model_type == "qwen3",
            max_position_embeddings=fields.positive_int("max_position_embeddings", 4096),
            torch_dtype=dtypes[0] or dtypes[1],
            eos_token_id=eos_ids,
            bos_token_id=fields.optional_token_id("bos_token_id"),
        )

    @classmethod
    def from_dir(cls, model_dir: Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not Path(model_dir).is_dir():
            raise LemmaError(f"model directory not found: {model_dir}")
        if not path.is_file():
            raise LemmaError(f"{path}: config.json is missing")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise LemmaError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        except ValueError as exc:  # e.g. an integer longer than Python's int/str conversion limit
            raise LemmaError(f"{path}: not valid JSON ({exc})") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise LemmaError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
        return cls.from_dict(raw, source=str(path))


def _attention_shape(fields: CheckedFields, hidden_size: int) -> tuple[int, int, int]:
    """-> (num_heads, num_kv_heads, head_dim)."""
    num_heads = fields.positive_int("num_attention_heads")
    num_kv_heads = fields.optional_positive_int("num_key_value_heads") or num_heads
    if num_heads % num_kv_heads:
        raise fields.error("num_key_value_heads", f"{num_kv_heads} does not divide num_attention_heads {num_heads}")
    head_dim = fields.optional_positive_int("head_dim")
    derived = ""
    if head_dim is None:
        head_dim, derived = hidden_size // num_heads, f" (hidden_size {hidden_size} // num_attention_heads {num_heads})"
        if head_dim == 0:
            raise fields.error("num_attention_heads", f"{num_heads} is more than hidden_size {hidden_size}")
    if head_dim % 2:
        raise fields.error("head_dim", f"must be even for rotary position embeddings, got {head_dim}{derived}")
    return num_heads, num_kv_heads, head_dim


def _rope(fields: CheckedFields) -> tuple[float, dict[str, Any]]:
    """-> (rope_theta, the scaling dict with a checked rope_type and the numbers that type needs)."""
    # transformers 5.x folds rope_theta and rope_scaling into rope_parameters; a file may hold both.
    given = {key: fields.optional_object(key) for key in ("rope_parameters", "rope_scaling")}
    key = "rope_parameters" if given["rope_parameters"] else "rope_scaling"
    rope = dict(given[key] or {})
    nested = CheckedFields(rope, fields.source, prefix=f"{key}.")
    rope_theta = nested.positive_number("rope_theta") if "rope_theta" in rope else fields.positive_number("rope_theta", 10000.0)
    rope.pop("rope_theta", None)
    rope_type = _rope_type(nested)
    if given["rope_parameters"] and given["rope_scaling"]:
        other = _rope_type(CheckedFields(given["rope_scaling"], fields.source, prefix="rope_scaling."))
        if other != rope_type:
            raise fields.error("rope_scaling", f"says rope type {other!r} but rope_parameters says {rope_type!r}")
    rope.pop("type", None)
    rope["rope_type"] = rope_type
    if rope_type in ("linear", "llama3"):
        rope["factor"] = nested.positive_number("factor")
    if rope_type == "llama3":
        rope["original_max_position_embeddings"] = nested.positive_int("original_max_position_embeddings")
        low, high = nested.positive_number("low_freq_factor"), nested.positive_number("high_freq_factor")
        if high <= low:
            raise nested.error("high_freq_factor", f"must be more than low_freq_factor {low}, got {high}")
        rope.update(low_freq_factor=low, high_freq_factor=high)
    return rope_theta, rope


def _rope_type(rope: CheckedFields) -> str:
    """The rope type of a rope_scaling/rope_parameters object: "rope_type" (or the older "type"; both
    must agree when both are given), "default" when neither is."""
    types = {key: rope.raw[key] for key in ("rope_type", "type") if key in rope.raw}
    for key, value in types.items():
        if not isinstance(value, str) or value not in SUPPORTED_ROPE_TYPES:
            raise rope.error(key, f"unsupported rope type {shown(value)}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if len(set(types.values())) > 1:
        raise rope.error("type", f"{types['type']!r} disagrees with rope_type {types['rope_type']!r}")
    return next(iter(types.values()), "default")
