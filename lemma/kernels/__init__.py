"""Attention kernels. `kernel_ops("torch")` is the reference twin (CPU path, test oracle);
`kernel_ops("triton")` swaps in the Triton kernels for the decode step (store, page scores,
attention). Prefill stays on torch SDPA either way."""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch

from lemma.errors import LemmaError
from lemma.kernels import reference

ATTENTION_ENV = "LEMMA_ATTENTION"
CHOICES = ("torch", "triton")


def resolve_attention(choice: str | None, device: torch.device) -> str:
    """Explicit choice, else $LEMMA_ATTENTION, else triton on CUDA and torch elsewhere."""
    choice = choice or os.environ.get(ATTENTION_ENV) or ("triton" if device.type == "cuda" else "torch")
    if choice not in CHOICES:
        raise LemmaError(f"attention must be one of {', '.join(CHOICES)}, got {choice!r}")
    if choice == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise LemmaError(f"attention 'triton' needs a CUDA GPU (or TRITON_INTERPRET=1 to interpret the kernels on "
                         f"CPU); unset {ATTENTION_ENV} or set it to torch")
    return choice


def kernel_ops(choice: str) -> SimpleNamespace:
    """The decode step's kernels; `skips_tail`: whether attention skips a row's slots past `listed`
    (worth passing it) rather than masking them."""
    ops = SimpleNamespace(store_decode=reference.store_decode, page_scores=reference.page_scores,
                          paged_decode_attention=reference.paged_decode_attention, skips_tail=False)
    if choice == "triton":
        try:
            from lemma.kernels import triton_ops
        except ImportError as exc:
            raise LemmaError(f"attention='triton' needs triton installed ({exc})") from None
        ops = SimpleNamespace(store_decode=triton_ops.store_decode, page_scores=triton_ops.page_scores,
                              paged_decode_attention=triton_ops.paged_decode_attention, skips_tail=True)
    return ops
