"""Triton KV store for a decode step (twin: reference.store_decode): writes each new token's k/v
into its page and keeps the page's channel-wise key max/min and fill count up to date.

One program per (token, KV head). Each (page, head) receives at most one token per call, so the
read-modify-write of the bounds needs no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_decode_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, ids_ptr, off_ptr, kmax_ptr, kmin_ptr, fill_ptr,
    stride_kn, stride_kh, stride_vn, stride_vh,
    stride_cp, stride_ch, stride_ct, stride_dp, stride_dh, stride_dt,
    stride_in, stride_ih, stride_mp, stride_mh, stride_fp, stride_fh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, UPDATE_BOUNDS: tl.constexpr,
):
    n = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    page = tl.load(ids_ptr + n * stride_in + h * stride_ih).to(tl.int64)
    off = tl.load(off_ptr + n).to(tl.int64)
    k = tl.load(k_ptr + n * stride_kn + h * stride_kh + d, mask=d_ok).to(kc_ptr.dtype.element_ty)
    v = tl.load(v_ptr + n * stride_vn + h * stride_vh + d, mask=d_ok).to(vc_ptr.dtype.element_ty)
    tl.store(kc_ptr + page * stride_cp + h * stride_ch + off * stride_ct + d, k, mask=d_ok)
    tl.store(vc_ptr + page * stride_dp + h * stride_dh + off * stride_dt + d, v, mask=d_ok)
    if UPDATE_BOUNDS:
        key = k.to(tl.float32)  # the bound covers the key as stored
        meta = page * stride_mp + h * stride_mh + d
        old_hi = tl.load(kmax_ptr + meta, mask=d_ok)
        old_lo = tl.load(kmin_ptr + meta, mask=d_ok)
        fresh = off == 0  # the first row of a page starts its bounds afresh
        tl.store(kmax_ptr + meta, tl.where(fresh, key, tl.maximum(old_hi, key)), mask=d_ok)
        tl.store(kmin_ptr + meta, tl.where(fresh, key, tl.minimum(old_lo, key)), mask=d_ok)
    tl.store(fill_ptr + page * stride_fp + h * stride_fh, (off + 1).to(fill_ptr.dtype.element_ty))


def store_decode(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 page_ids: torch.Tensor, offsets: torch.Tensor, key_max: torch.Tensor | None,
                 key_min: torch.Tensor | None, fill: torch.Tensor) -> None:
    """Same contract as reference.store_decode."""
    tokens, heads, dim = k.shape
    page_ids = page_ids.contiguous()
    bounds = key_max is not None
    if not bounds:  # the pointers are not read; any float tensor with the right strides will do
        key_max = key_min = torch.empty(1, 1, 1, dtype=torch.float32, device=k.device)
    _store_decode_kernel[(tokens, heads)](
        k, v, k_cache, v_cache, page_ids, offsets, key_max, key_min, fill,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        page_ids.stride(0), page_ids.stride(1), key_max.stride(0), key_max.stride(1), fill.stride(0), fill.stride(1),
        HEAD_DIM=dim, BLOCK_D=triton.next_power_of_2(dim), UPDATE_BOUNDS=bounds)
