"""Weight-only quantized linears: int8 or int4 weights with a scale (int4: and an offset) per group of 32
inputs, run by lemma::int8_linear / lemma::int4_linear (kernels/quant.py); activations are quantized per
block of 32 inside the CPU kernel's decode path only (quant_cpu.cpp says why), prefill and GPU multiply in
the compute dtype.

What is quantized: every projection of every decoder layer, and the output head in int8 (a tied head gets
an int8 copy of the embedding; the head is 21-27% of the demo models' weights and the most sensitive
product, so int4 mode keeps it int8 as llama.cpp's Q4 files keep theirs at 6-8 bits). The embedding stays
in the compute dtype: decode reads one row of it per token.

A checkpoint may hold these tensors already (a GGUF imported with --keep-quantized): `name.qweight`,
`name.scales` and, for int4, `name.offsets`; the kind and group follow from their dtypes and shapes.
"""

from __future__ import annotations

import torch
from torch import nn

from lemma.errors import LemmaError
from lemma.kernels import quant

QUANTIZE_CHOICES = ("int8", "int4")
GROUP = 32  # the scale group: 64 and 128 measured no faster here (bench/quant_products.py) and lose accuracy
QUANT_SUFFIXES = ("qweight", "scales", "offsets")


def check_quantize(value: str | None) -> str | None:
    if value is None or value in ("none", ""):
        return None
    if value not in QUANTIZE_CHOICES:
        raise LemmaError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {value!r}")
    return value


def quantize_int8(weight: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per group: -> (q int8 [N, K], scales fp16 [N, K/group])."""
    n, k = weight.shape
    blocks = weight.float().reshape(n, k // group, group)
    scales = (blocks.abs().amax(-1) / 127).half()
    safe = torch.where(scales.float() > 0, scales.float(), 1.0)
    q = (blocks / safe[..., None]).round().clamp(-127, 127).to(torch.int8)
    return q.reshape(n, k).contiguous(), scales.contiguous()


def quantize_int4(weight: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit per group (min..max in 16 steps): -> (packed uint8 [N, K/2], scales, offsets fp16)."""
    n, k = weight.shape
    blocks = weight.float().reshape(n, k // group, group)
    low, high = blocks.amin(-1), blocks.amax(-1)
    scales = ((high - low) / 15).half()
    offsets = low.half()
    safe = torch.where(scales.float() > 0, scales.float(), 1.0)
    values = ((blocks - offsets.float()[..., None]) / safe[..., None]).round().clamp(0, 15)
    return quant.pack_int4(values.reshape(n, k), group), scales.contiguous(), offsets.contiguous()


class QuantLinear(nn.Module):
    """y = x W^T + b with W int8 or int4 (group-wise scales). Buffers move with .to() and save in state_dict."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
                 bias: torch.Tensor | None, name: str = "linear"):
        super().__init__()
        self.kind = "int8" if qweight.dtype == torch.int8 else "int4"
        rows, cols = qweight.shape
        self.out_features, self.in_features = rows, cols * (1 if self.kind == "int8" else 2)
        if qweight.dtype not in (torch.int8, torch.uint8) or scales.dim() != 2 or scales.shape[0] != rows \
                or scales.shape[1] == 0 or self.in_features % scales.shape[1]:
            raise LemmaError(f"{name}: quantized weight {tuple(qweight.shape)} {qweight.dtype} and scales "
                             f"{tuple(scales.shape)} do not fit together")
        self.group = self.in_features // scales.shape[1]
        if self.group % 32 or (self.kind == "int4" and (offsets is None or offsets.shape != scales.shape)):
            raise LemmaError(f"{name}: {self.kind} group {self.group} is not supported (a multiple of 32, "
                             "int4 with offsets shaped like its scales)")
        if scales.dtype not in (torch.float16, torch.float32):
            raise LemmaError(f"{name}: scales must be float16 or float32, got {scales.dtype}")
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scales", scales.contiguous())
        self.register_buffer("offsets", None if offsets is None else offsets.to(scales.dtype).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach())

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, kind: str, group: int = GROUP,
                   name: str = "linear") -> "QuantLinear":
        if weight.shape[1] % group:
            raise LemmaError(f"{name}: {weight.shape[1]} inputs do not split into groups of {group}")
        if kind == "int8":
            return cls(*quantize_int8(weight, group), None, bias, name)
        return cls(*quantize_int4(weight, group), bias, name)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.kind == "int8":
            return quant.dequantize_int8(self.qweight, self.scales, self.group, dtype)
        return quant.dequantize_int4(self.qweight, self.scales, self.offsets, self.group, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "int8":
            out = quant.int8_linear(x, self.qweight, self.scales, self.group)
        else:
            out = quant.int4_linear(x, self.qweight, self.scales, self.offsets, self.group)
        return out if self.bias is None else out + self.bias

    def weight_bytes(self) -> int:
        return sum(t.nbytes for t in (self.qweight, self.scales, self.offsets) if t is not None)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.kind}, group {self.group}"


def concatenated(layers: list["QuantLinear"]) -> "QuantLinear | None":
    """One QuantLinear computing `layers` side by side (their rows stacked), or None when their kinds,
    groups, scale dtypes or biases differ."""
    first = layers[0]
    if any((m.kind, m.group, m.scales.dtype, m.in_features, m.bias is None) !=
           (first.kind, first.group, first.scales.dtype, first.in_features, first.bias is None) for m in layers):
        return None
    cat = lambda name: None if getattr(first, name) is None else torch.cat([getattr(m, name) for m in layers])  # noqa: E731
    return QuantLinear(cat("qweight"), cat("scales"), cat("offsets"), cat("bias"))


def fuse_projections(model: nn.Module) -> int:
    """Where a layer's q/k/v (and gate/up) are QuantLinears of one layout, run each group as one product:
    3 and 2 kernel calls become 1 and 1, and the small k/v rows share their call's threads. -> fused groups."""
    count = 0
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        parts = [attn.q_proj, attn.k_proj, attn.v_proj]
        if all(isinstance(m, QuantLinear) for m in parts) and (fused := concatenated(parts)) is not None:
            attn.qkv_proj, count = fused, count + 1
            del attn.q_proj, attn.k_proj, attn.v_proj
        parts = [mlp.gate_proj, mlp.up_proj]
        if all(isinstance(m, QuantLinear) for m in parts) and (fused := concatenated(parts)) is not None:
            mlp.gate_up_proj, count = fused, count + 1
            del mlp.gate_proj, mlp.up_proj
    return count


def _projections(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if isinstance(child, nn.Linear)]


@torch.no_grad()
def quantize_model(model: nn.Module, kind: str, group: int = GROUP) -> int:
    """Replace the decoder's float linears by QuantLinear (in place): layers in `kind`, the head in int8.
    Layers a checkpoint already held quantized are left as they are. -> how many were quantized."""
    quant.prepare(next(model.buffers()).device)
    count = 0
    for parent, name, child in _projections(model.model):
        setattr(parent, name, QuantLinear.from_float(child.weight, child.bias, kind, group, name))
        count += 1
    if isinstance(model.lm_head, nn.Linear):
        model.lm_head = QuantLinear.from_float(model.lm_head.weight, None, "int8", group, "lm_head")
        count += 1
    elif model.lm_head is None and model.tied_head is None:
        model.tied_head = QuantLinear.from_float(model.model.embed_tokens.weight, None, "int8", group, "lm_head")
        count += 1
    return count


def quantized_bytes(model: nn.Module) -> int:
    """Bytes held by the QuantLinear modules of `model` (buffers, not parameters)."""
    return sum(m.weight_bytes() for m in model.modules() if isinstance(m, QuantLinear))


def quantized_kinds(model: nn.Module) -> dict[str, int]:
    """How many linears of each kind ("int8", "int4") the model runs."""
    kinds: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, QuantLinear):
            kinds[m.kind] = kinds.get(m.kind, 0) + 1
    return kinds
