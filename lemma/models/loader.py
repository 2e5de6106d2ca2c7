"""Load a Hugging Face model directory (config.json + one or sharded safetensors) onto a device."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from lemma.errors import LemmaError
from lemma.models.config import ModelConfig, shown
from lemma.models.llama import CausalLM, rope_inv_freq
from lemma.models.quantized import QUANT_SUFFIXES, QuantLinear, check_quantize, fuse_projections, quantize_model
from lemma.models.shard import Shard

# Buffers some exporters write that the model recomputes.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({model_dir / name for name in _weight_map(index).values()})
        for f in files:
            if not f.is_file():
                raise LemmaError(f"{index}: names shard {f.name}, which is missing")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise LemmaError(f"{model_dir}: no *.safetensors weights found (only safetensors checkpoints are supported)")
    return files


def _weight_map(index: Path) -> dict[str, str]:
    """The index's weight_map (tensor name -> shard file name), checked: a non-empty object of names, each
    shard a plain *.safetensors file name in the model folder."""
    try:
        raw = json.loads(index.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise LemmaError(f"{index}: not valid JSON ({getattr(exc, 'msg', exc)})") from None
    except OSError as exc:
        raise LemmaError(f"{index}: cannot read ({exc.strerror or exc})") from None
    if not isinstance(raw, dict) or "weight_map" not in raw:
        raise LemmaError(f"{index}: not a valid safetensors index (needs a 'weight_map')")
    weight_map = raw["weight_map"]
    if not isinstance(weight_map, dict) or not weight_map:
        raise LemmaError(f"{index}: weight_map: must be a non-empty object of tensor name -> shard file, "
                         f"got {shown(weight_map)}")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or Path(shard).name != shard or not shard.endswith(".safetensors"):
            raise LemmaError(f"{index}: weight_map: {name} must name a .safetensors file in the model folder, "
                             f"got {shown(shard)}")
    return weight_map


def shard_slice(name: str, config: ModelConfig, shard: Shard | None) -> tuple[int, tuple[int, int]] | None:
    """(dim, [start, stop)) of checkpoint tensor `name` that `shard` holds; None = the whole tensor."""
    if shard is None:
        return None
    d = config.head_dim
    heads = lambda n: tuple(d * i for i in shard.part(n))  # noqa: E731
    if name.endswith(("q_proj.weight", "q_proj.bias")):
        return 0, heads(config.num_heads)
    if name.endswith(("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias")):
        return 0, heads(config.num_kv_heads)
    if name.endswith("o_proj.weight"):
        return 1, heads(config.num_heads)
    if name.endswith(("gate_proj.weight", "gate_proj.bias", "up_proj.weight", "up_proj.bias")):
        return 0, shard.part(config.intermediate_size)
    if name.endswith("down_proj.weight"):
        return 1, shard.part(config.intermediate_size)
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return 0, shard.part(config.vocab_size)
    return None  # norms, and the biases of row-parallel projections (added once, by rank 0)


def _read(f, name: str, config: ModelConfig, shard: Shard | None, full_shape: tuple[int, ...]) -> torch.Tensor:
    """The tensor, or only this shard's slice of it (read from the file without the rest)."""
    spec = shard_slice(name, config, shard)
    if spec is None:
        tensor = f.get_tensor(name)
        if shard is not None and shard.rank > 0 and name.endswith(("o_proj.bias", "down_proj.bias")):
            tensor = torch.zeros_like(tensor)  # summed over ranks by the all-reduce: only rank 0 adds it
        return tensor
    dim, (start, stop) = spec
    sliced = f.get_slice(name)
    if list(sliced.get_shape()) != list(full_shape):
        return f.get_tensor(name)  # a wrong shape: the caller reports it
    return sliced[start:stop] if dim == 0 else sliced[:, start:stop]


def _quantized_name(name: str) -> tuple[str, str] | None:
    """"model.layers.0.mlp.up_proj.qweight" -> ("model.layers.0.mlp.up_proj", "qweight")."""
    module, _, suffix = name.rpartition(".")
    return (module, suffix) if suffix in QUANT_SUFFIXES else None


def _install_quantized(model: CausalLM, parts: dict[str, dict[str, torch.Tensor]], loaded: dict[str, torch.Tensor],
                       expected: dict[str, tuple[int, ...]], model_dir: Path, dtype: torch.dtype) -> None:
    """Put a QuantLinear wherever the checkpoint holds `module.qweight`; its float weight is then not expected.
    A tied model's `lm_head.*` becomes its output head beside the float embedding."""
    for module, tensors in parts.items():
        if module == "lm_head" and model.config.tie_word_embeddings and "qweight" in tensors and "scales" in tensors:
            head = QuantLinear(tensors["qweight"], tensors["scales"], tensors.get("offsets"), None, module)
            vocab, hidden = expected["model.embed_tokens.weight"]
            if (head.out_features, head.in_features) != (vocab, hidden):
                raise LemmaError(f"{model_dir}: quantized lm_head is {head.out_features}x{head.in_features}, "
                                 f"expected {vocab}x{hidden}")
            model.tied_head = head
            continue
        if f"{module}.weight" not in expected or "qweight" not in tensors or "scales" not in tensors:
            raise LemmaError(f"{model_dir}: quantized tensors of {module} are incomplete or have no place in the model")
        bias = loaded.pop(f"{module}.bias", None)
        layer = QuantLinear(tensors["qweight"], tensors["scales"], tensors.get("offsets"),
                            None if bias is None else bias.to(dtype), module)
        shape = expected.pop(f"{module}.weight")
        expected.pop(f"{module}.bias", None)
        if (layer.out_features, layer.in_features) != shape:
            raise LemmaError(f"{model_dir}: quantized {module} is {layer.out_features}x{layer.in_features}, expected "
                             f"{shape[0]}x{shape[1]}")
        parent_name, _, child = module.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)


def load_model(model_dir: str | Path, device: torch.device, dtype: torch.dtype, shard: Shard | None = None,
               quantize: str | None = None) -> CausalLM:
    """Build the decoder on `device` in `dtype` and fill it from the checkpoint, checking every tensor.
    With a shard, only that tensor-parallel rank's slices are read. Layers the checkpoint holds quantized
    run as stored; with `quantize` ("int8" or "int4") the float ones are quantized too (models/quantized.py)."""
    quantize = check_quantize(quantize)
    model_dir = Path(model_dir)
    config = ModelConfig.from_dir(model_dir)
    with torch.device("meta"):
        full = CausalLM(config)
        model = CausalLM(config, shard) if shard is not None else full
    full_shapes = {name: tuple(p.shape) for name, p in full.named_parameters()}
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    loaded: dict[str, torch.Tensor] = {}
    quantized: dict[str, dict[str, torch.Tensor]] = {}
    for path in safetensors_files(model_dir):
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                for name in f.keys():
                    if name.endswith(IGNORED_SUFFIXES):
                        continue
                    if name == "lm_head.weight" and config.tie_word_embeddings:
                        continue  # (a tied model's quantized lm_head.* is its head: _install_quantized)
                    part = _quantized_name(name)
                    if part is not None and shard is None:
                        quantized.setdefault(part[0], {})[part[1]] = f.get_tensor(name)
                        continue
                    if part is not None:
                        raise LemmaError(f"{path}: holds quantized tensors ({name}); tensor parallel needs float weights")
                    if name not in expected:
                        raise LemmaError(f"{path}: unexpected tensor {name} for model_type {config.model_type}")
                    tensor = _read(f, name, config, shard, full_shapes[name])
                    if tuple(tensor.shape) != expected[name]:
                        raise LemmaError(
                            f"{path}: tensor {name} has shape {tuple(tensor.shape)}, expected {expected[name]}"
                        )
                    loaded[name] = tensor.to(dtype)
        except SafetensorError as exc:
            raise LemmaError(f"{path}: corrupt or unreadable safetensors file ({exc})") from None
        except OSError as exc:
            raise LemmaError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if quantized:
        _install_quantized(model, quantized, loaded, expected, model_dir, dtype)
    missing = sorted(set(expected) - set(loaded))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise LemmaError(f"{model_dir}: tensor {missing[0]} is missing from the checkpoint{more}")
    model.load_state_dict(loaded, strict=False, assign=True)
    model.inv_freq = rope_inv_freq(config).to(device)  # built on the meta device above
    model = model.to(device)  # quantized buffers from the file, if any, are on the CPU
    if quantize is not None:
        quantize_model(model, quantize)
    elif quantized:
        from lemma.kernels.quant import prepare

        prepare(device)
    fuse_projections(model)
    return model.eval().requires_grad_(False)
