"""Triton paged decode attention over the compacted cache (twin: reference.paged_decode_attention).

One program per (sequence, KV head, split of the slot list): it loads each listed K/V page once for
all query heads of the group (GQA-packed), keeps an online softmax in fp32, and writes its partial
accumulator; a small combine step merges the splits. With WITH_MASS it also writes each page's
log-sum-exp per query head, from which the combine step derives the per-page attention mass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, ids_ptr, fill_ptr, acc_ptr, m_ptr, l_ptr, lse_ptr,
    scale, num_slots, pages_per_split, num_kv_heads,
    stride_qb, stride_qh,
    stride_kp, stride_kh, stride_kt,
    stride_vp, stride_vh, stride_vt,
    stride_ib, stride_ih, stride_fb, stride_fh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr, UPCAST: tl.constexpr, WITH_MASS: tl.constexpr, IEEE: tl.constexpr,
):
    pid = tl.program_id(0)  # sequence * num_kv_heads + kv head
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    b = pid // num_kv_heads
    h = pid % num_kv_heads
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    t = tl.arange(0, PAGE)
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM

    q = tl.load(q_ptr + b * stride_qb + (h * GROUP + g)[:, None] * stride_qh + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:  # the interpreter computes bf16 wrongly; on GPU the dots stay in the cache dtype
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_G], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)

    for i in range(0, pages_per_split):
        s = split * pages_per_split + i
        in_range = s < num_slots
        page = tl.load(ids_ptr + b * stride_ib + h * stride_ih + s, mask=in_range, other=-1).to(tl.int64)
        n = tl.load(fill_ptr + b * stride_fb + h * stride_fh + s, mask=in_range, other=0)
        n = tl.where(page >= 0, n, 0)
        safe = tl.where(page >= 0, page, 0)
        rows = (t < n)[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + safe * stride_kp + h * stride_kh + t[:, None] * stride_kt + d[None, :], mask=rows, other=0.0)
        v = tl.load(v_ptr + safe * stride_vp + h * stride_vh + t[:, None] * stride_vt + d[None, :], mask=rows, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if IEEE:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        scores = tl.where((t < n)[None, :], scores * scale, float("-inf"))
        page_max = tl.max(scores, 1)
        m_new = tl.maximum(m_i, page_max)
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
        if WITH_MASS:
            lse = page_max + tl.log(tl.sum(tl.exp(scores - page_max[:, None]), 1))
            lse = tl.where(n > 0, lse, float("-inf"))
            tl.store(lse_ptr + (pid * BLOCK_G + g) * num_slots + s, lse, mask=in_range & g_ok)

    part = pid * num_splits + split
    tl.store(acc_ptr + (part * BLOCK_G + g)[:, None] * BLOCK_D + d[None, :], acc)
    tl.store(m_ptr + part * BLOCK_G + g, m_i)
    tl.store(l_ptr + part * BLOCK_G + g, l_i)


def _splits(programs: int, slots: int, pages_per_split: int | None, device: torch.device) -> int:
    if pages_per_split is not None:
        return max(1, pages_per_split)
    if device.type != "cuda":
        return max(1, slots)
    # split a long slot list so that the launch fills the GPU at least twice over
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    splits = min(slots, max(1, -(-target // programs)))
    return max(1, -(-slots // splits))


def decode_attention_launch_args(q, k_cache, v_cache, page_ids, fill, pages_per_split=None, return_mass=False):
    """Shapes, buffers and constexprs of one launch (shared by the wrapper and the compile test)."""
    batch, num_heads, dim = q.shape
    num_kv_heads, slots = page_ids.shape[1], page_ids.shape[2]
    group = num_heads // num_kv_heads
    block_g, block_d = max(16, triton.next_power_of_2(group)), max(16, triton.next_power_of_2(dim))
    per_split = _splits(batch * num_kv_heads, slots, pages_per_split, q.device)
    num_splits = max(1, -(-slots // per_split))
    programs = batch * num_kv_heads
    f32 = dict(dtype=torch.float32, device=q.device)
    acc = torch.empty(programs, num_splits, block_g, block_d, **f32)
    m = torch.empty(programs, num_splits, block_g, **f32)
    l = torch.empty(programs, num_splits, block_g, **f32)
    lse = torch.empty(programs, block_g, slots, **f32) if return_mass else torch.empty(1, **f32)
    constexprs = dict(GROUP=group, BLOCK_G=block_g, HEAD_DIM=dim, BLOCK_D=block_d, PAGE=k_cache.shape[2],
                      UPCAST=not q.is_cuda,
                      WITH_MASS=return_mass, IEEE=q.dtype == torch.float32)
    return (programs, num_splits), per_split, acc, m, l, lse, constexprs


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_ids: torch.Tensor,
                           fill: torch.Tensor, scale: float, return_mass: bool = False,
                           pages_per_split: int | None = None):
    """Same contract as reference.paged_decode_attention."""
    batch, num_heads, dim = q.shape
    num_kv_heads, slots = page_ids.shape[1], page_ids.shape[2]
    q, page_ids, fill = q.contiguous(), page_ids.contiguous(), fill.contiguous()
    grid, per_split, acc, m, l, lse, constexprs = decode_attention_launch_args(
        q, k_cache, v_cache, page_ids, fill, pages_per_split, return_mass)
    _decode_attention_kernel[grid](
        q, k_cache, v_cache, page_ids, fill, acc, m, l, lse,
        scale, slots, per_split, num_kv_heads,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        page_ids.stride(0), page_ids.stride(1), fill.stride(0), fill.stride(1),
        **constexprs,
    )
    group = num_heads // num_kv_heads
    top = m.amax(1, keepdim=True)
    weight = torch.exp(m - top)
    total = (l * weight).sum(1)  # [programs, BLOCK_G]
    out = (acc * weight[..., None]).sum(1) / total.clamp(min=1e-30)[..., None]
    out = out[:, :group, :dim].reshape(batch, num_heads, dim).to(q.dtype)
    if not return_mass:
        return out
    log_total = top[:, 0] + torch.log(total)  # [programs, BLOCK_G]
    mass = torch.exp(lse - log_total[..., None])[:, :group].nan_to_num(0.0).mean(1)
    return out, mass.view(batch, num_kv_heads, slots)
