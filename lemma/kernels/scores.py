"""Triton page scores: Quest's upper bound of q·k per listed page (twin: reference.page_scores).

One program per (sequence, KV head, block of slots): bound = sum_d max(q_d M_d, q_d m_d), reduced
with a max over the query heads of the group; -inf on empty slots.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _page_scores_kernel(
    q_ptr, kmax_ptr, kmin_ptr, ids_ptr, out_ptr, num_slots, num_kv_heads,
    stride_qb, stride_qh, stride_mp, stride_mh, stride_ib, stride_ih, stride_ob, stride_oh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0)
    block = tl.program_id(1)
    b = pid // num_kv_heads
    h = pid % num_kv_heads
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    s = block * BLOCK_S + tl.arange(0, BLOCK_S)
    g_ok, d_ok, s_ok = g < GROUP, d < HEAD_DIM, s < num_slots
    page = tl.load(ids_ptr + b * stride_ib + h * stride_ih + s, mask=s_ok, other=-1).to(tl.int64)
    valid = page >= 0
    safe = tl.where(valid, page, 0)
    meta = safe[:, None] * stride_mp + h * stride_mh + d[None, :]
    hi = tl.load(kmax_ptr + meta, mask=valid[:, None] & d_ok[None, :], other=0.0)
    lo = tl.load(kmin_ptr + meta, mask=valid[:, None] & d_ok[None, :], other=0.0)
    q = tl.load(q_ptr + b * stride_qb + (h * GROUP + g)[:, None] * stride_qh + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    qb = q[:, None, :]
    bound = tl.sum(tl.maximum(qb * hi[None, :, :], qb * lo[None, :, :]), 2)  # [BLOCK_G, BLOCK_S]
    bound = tl.where(g_ok[:, None], bound, float("-inf"))
    best = tl.where(valid, tl.max(bound, 0), float("-inf"))
    tl.store(out_ptr + b * stride_ob + h * stride_oh + s, best, mask=s_ok)


BLOCK_S = 16


def page_scores_launch_args(q, page_ids):
    batch, num_heads, dim = q.shape
    num_kv_heads, slots = page_ids.shape[1], page_ids.shape[2]
    group = num_heads // num_kv_heads
    constexprs = dict(GROUP=group, BLOCK_G=triton.next_power_of_2(group), HEAD_DIM=dim,
                      BLOCK_D=triton.next_power_of_2(dim), BLOCK_S=BLOCK_S)
    return (batch * num_kv_heads, triton.cdiv(slots, BLOCK_S)), constexprs


def page_scores(q: torch.Tensor, key_max: torch.Tensor, key_min: torch.Tensor, page_ids: torch.Tensor) -> torch.Tensor:
    """Same contract as reference.page_scores."""
    q, page_ids = q.contiguous(), page_ids.contiguous()
    out = torch.empty(page_ids.shape, dtype=torch.float32, device=q.device)
    grid, constexprs = page_scores_launch_args(q, page_ids)
    _page_scores_kernel[grid](
        q, key_max, key_min, page_ids, out, page_ids.shape[2], page_ids.shape[1],
        q.stride(0), q.stride(1), key_max.stride(0), key_max.stride(1),
        page_ids.stride(0), page_ids.stride(1), out.stride(0), out.stride(1), **constexprs)
    return out
