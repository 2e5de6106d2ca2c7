"""Linear layers in the form the CPU's matmul paths run fastest.

Compiled, a product of one row with a weight (batch-1 decode) is written as a multiply and a sum,
which inductor fuses into one vectorized, threaded reduction that streams the weight at 2.6-2.8x the
bandwidth of MKL's sgemv and oneDNN here (30.1 vs 11.6 GB/s fp32, 28.0 vs 10.0 bf16: SmolLM2's 30
layers, 2 threads, AMD EPYC, 2026-12-06, bench/row_products.py); eager and with more rows it stays F.linear.

A bf16 nn.Linear on CPU hands its weight to oneDNN in the plain layout on every call, and oneDNN
reorders it each time: at decode sizes that costs about half the matmul. `pack_linears` reorders every
projection (and the output head) once, at load. The packed weight is an opaque oneDNN tensor that
inductor cannot lower, so the matmul is a custom op: eager, compiled and replayed paths all call it.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T + b; under torch.compile, for a single row, as a reduction inductor generates itself."""
    if torch.compiler.is_compiling() and x.dim() == 2 and x.device.type == "cpu" and x.shape[0] == 1:
        out = (x[:, None, :].float() * weight[None].float()).sum(-1)
        return (out if bias is None else out + bias.float()).to(x.dtype)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear whose product goes through `project`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return project(x, self.weight, self.bias)


@torch.library.custom_op("lemma::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    out = torch.ops.mkldnn._linear_pointwise(rows.contiguous(), packed, bias, "none", [], "")
    return out.view(*x.shape[:-1], out_features)


@packed_linear.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


class PackedLinear(nn.Module):
    """y = x W^T + b with W reordered once for oneDNN (CPU). Holds no plain copy of W."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        self.bias = None if bias is None else bias.detach()
        self.weight_element_size = weight.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed, self.bias, self.out_features)


def packs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether linears are packed for this device and dtype: bf16 on CPU, where oneDNN is built in and the
    CPU has its bf16 reorder (AVX512BW/VL/DQ or AVX-NE-CONVERT; an AVX2-only CPU refuses it).
    fp32 is left plain: at batch 1 MKL's sgemv on the plain layout measured as fast or faster."""
    return (device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and _bf16_reorder_works())


@functools.cache
def _bf16_reorder_works() -> bool:
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=torch.bfloat16), None)
        return True
    except RuntimeError:
        return False


@torch.no_grad()
def pack_linears(model: nn.Module) -> int:
    """Replace every nn.Linear of `model` by a PackedLinear (in place); returns how many were packed."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, PackedLinear(child.weight, child.bias))
                count += 1
    return count


def packed_bytes(model: nn.Module) -> int:
    """Weight bytes held by the PackedLinear modules of `model` (not among its parameters)."""
    return sum(m.out_features * m.in_features * m.weight_element_size for m in model.modules() if isinstance(m, PackedLinear))
