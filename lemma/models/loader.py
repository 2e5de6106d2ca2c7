"""Load a Hugging Face model directory (config.json + one or sharded safetensors) onto a device."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from lemma.errors import LemmaError
from lemma.models.config import ModelConfig
from lemma.models.llama import CausalLM, rope_inv_freq

# Buffers some exporters write that the model recomputes.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise LemmaError(f"{index}: not a valid safetensors index (needs a 'weight_map')") from None
        files = sorted({model_dir / name for name in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise LemmaError(f"{index}: names shard {f.name}, which is missing")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise LemmaError(f"{model_dir}: no *.safetensors weights found (only safetensors checkpoints are supported)")
    return files


def load_model(model_dir: str | Path, device: torch.device, dtype: torch.dtype) -> CausalLM:
    """Build the decoder on `device` in `dtype` and fill it from the checkpoint, checking every tensor."""
    model_dir = Path(model_dir)
    config = ModelConfig.from_dir(model_dir)
    with torch.device("meta"):
        model = CausalLM(config)
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    loaded: dict[str, torch.Tensor] = {}
    for path in safetensors_files(model_dir):
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                for name in f.keys():
                    if name.endswith(IGNORED_SUFFIXES):
                        continue
                    if name == "lm_head.weight" and config.tie_word_embeddings:
                        continue
                    if name not in expected:
                        raise LemmaError(f"{path}: unexpected tensor {name} for model_type {config.model_type}")
                    tensor = f.get_tensor(name)
                    if tuple(tensor.shape) != expected[name]:
                        raise LemmaError(
                            f"{path}: tensor {name} has shape {tuple(tensor.shape)}, expected {expected[name]}"
                        )
                    loaded[name] = tensor.to(dtype)
        except SafetensorError as exc:
            raise LemmaError(f"{path}: corrupt or unreadable safetensors file ({exc})") from None
        except OSError as exc:
            raise LemmaError(f"{path}: cannot read ({exc.strerror or exc})") from None
    missing = sorted(set(expected) - set(loaded))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise LemmaError(f"{model_dir}: tensor {missing[0]} is missing from the checkpoint{more}")
    model.load_state_dict(loaded, strict=False, assign=True)
    model.inv_freq = rope_inv_freq(config).to(device)  # built on the meta device above
    return model.eval().requires_grad_(False)
