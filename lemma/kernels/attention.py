"""Triton paged decode attention over the compacted cache (twin: reference.paged_decode_attention).

One program per (sequence, KV head, split of the slot list): it loads each listed K/V page once for
all query heads of the group (GQA-packed), PAGES_PER_BLOCK pages per iteration (one [rows, D] tile
gathered from several pages: fewer dependent page-id -> K/V round trips and larger dots), keeps an
online softmax in fp32, and writes its partial accumulator; a combine kernel merges the splits into
the output. With WITH_MASS it also writes each page's log-sum-exp per query head, from which a mass
kernel derives the per-page attention mass: two launches, three with the mass.

With `listed` [B] (a row's slots at and past listed[b] are empty), the splits share the listed slots
rather than the table's width, at least one tile each, and the combine reads only the splits used: a
table as wide as the pool (one captured CUDA graph for every context) costs a short sequence what its
pages cost, not what the pool's width does.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl


@triton.jit
def _row_split(listed_ptr, b, num_slots, num_splits, PAGES_PER_BLOCK: tl.constexpr, HAS_LISTED: tl.constexpr):
    """(slots row b lists, pages each of its splits walks, splits that walk any). With `listed` a row's
    splits share its own slots, at least one tile each, so a short row in a wide table fills a few
    splits whole rather than every split with a mostly masked tile (and the combine reads only those)."""
    if HAS_LISTED:
        slots_here = tl.minimum(tl.load(listed_ptr + b).to(tl.int32), num_slots)
        pages_per_split = tl.maximum(tl.cdiv(slots_here, num_splits), PAGES_PER_BLOCK)
        return slots_here, pages_per_split, tl.cdiv(slots_here, pages_per_split)
    else:
        return num_slots, tl.cdiv(num_slots, num_splits), num_splits


@triton.jit
def _decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, ids_ptr, fill_ptr, listed_ptr, acc_ptr, m_ptr, l_ptr, lse_ptr,
    scale, num_slots, num_kv_heads,
    stride_qb, stride_qh,
    stride_kp, stride_kh, stride_kt,
    stride_vp, stride_vh, stride_vt,
    stride_ib, stride_ih, stride_fb, stride_fh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr, PAGES_PER_BLOCK: tl.constexpr, UPCAST: tl.constexpr, WITH_MASS: tl.constexpr,
    IEEE: tl.constexpr, HAS_LISTED: tl.constexpr,
):
    pid = tl.program_id(0)  # sequence * num_kv_heads + kv head
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    b = pid // num_kv_heads
    h = pid % num_kv_heads
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    t = tl.arange(0, PAGES_PER_BLOCK * PAGE) % PAGE  # a tile's row r is row r % PAGE of its page r // PAGE
    pj = tl.arange(0, PAGES_PER_BLOCK)
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM

    q = tl.load(q_ptr + b * stride_qb + (h * GROUP + g)[:, None] * stride_qh + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:  # the interpreter computes bf16 wrongly; on GPU the dots stay in the cache dtype
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_G], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    # this row's share: splits past its pages walk none
    slots_here, pages_per_split, _ = _row_split(listed_ptr, b, num_slots, num_splits, PAGES_PER_BLOCK, HAS_LISTED)

    for i in range(0, pages_per_split, PAGES_PER_BLOCK):
        slot = split * pages_per_split + i + pj  # one load per page, broadcast to its rows
        in_split = (i + pj < pages_per_split) & (slot < slots_here)
        page = tl.load(ids_ptr + b * stride_ib + h * stride_ih + slot, mask=in_split, other=-1).to(tl.int64)
        n = tl.load(fill_ptr + b * stride_fb + h * stride_fh + slot, mask=in_split, other=0)
        page = tl.reshape(tl.broadcast_to(page[:, None], (PAGES_PER_BLOCK, PAGE)), (PAGES_PER_BLOCK * PAGE,))
        n = tl.reshape(tl.broadcast_to(n[:, None], (PAGES_PER_BLOCK, PAGE)), (PAGES_PER_BLOCK * PAGE,))
        ok = (page >= 0) & (t < n)
        safe = tl.where(page >= 0, page, 0)
        rows = ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + safe[:, None] * stride_kp + h * stride_kh + t[:, None] * stride_kt + d[None, :],
                    mask=rows, other=0.0)
        v = tl.load(v_ptr + safe[:, None] * stride_vp + h * stride_vh + t[:, None] * stride_vt + d[None, :],
                    mask=rows, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if IEEE:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        scores = tl.where(ok[None, :], scores * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
        if WITH_MASS:  # per page of the block: an empty page's scores are all -inf, its lse too
            paged = tl.reshape(scores, (BLOCK_G, PAGES_PER_BLOCK, PAGE))
            page_max = tl.max(paged, 2)
            seen = page_max > float("-inf")
            total = tl.sum(tl.exp(paged - tl.where(seen, page_max, 0.0)[:, :, None]), 2)
            lse = tl.where(seen, page_max + tl.log(tl.where(seen, total, 1.0)), float("-inf"))  # [G, pages]
            stored = g_ok[:, None] & in_split[None, :]
            tl.store(lse_ptr + (pid * BLOCK_G + g)[:, None] * num_slots + slot[None, :], lse, mask=stored)

    part = pid * num_splits + split  # the group's rows only: the padding rows of BLOCK_G are never read
    tl.store(acc_ptr + (part * BLOCK_G + g)[:, None] * BLOCK_D + d[None, :], acc, mask=g_ok[:, None])
    tl.store(m_ptr + part * BLOCK_G + g, m_i, mask=g_ok)
    tl.store(l_ptr + part * BLOCK_G + g, l_i, mask=g_ok)


@triton.jit
def _combine_kernel(
    acc_ptr, m_ptr, l_ptr, out_ptr, log_total_ptr, listed_ptr, num_slots, num_splits, num_kv_heads,
    stride_ob, stride_oh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CHUNK_D: tl.constexpr, SPLITS: tl.constexpr, PAGES_PER_BLOCK: tl.constexpr, HAS_LISTED: tl.constexpr,
):
    """Merge one (sequence, KV head)'s splits for CHUNK_D of the head dim, SPLITS at a time:
    out = sum_s w_s acc_s / sum_s w_s l_s with w_s = exp(m_s - max_s m_s). The chunk-0 program also
    writes the log of the softmax denominator (for the mass). Only the splits that walked any page."""
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    b = pid // num_kv_heads
    h = pid % num_kv_heads
    _, _, used = _row_split(listed_ptr, b, num_slots, num_splits, PAGES_PER_BLOCK, HAS_LISTED)
    g = tl.arange(0, BLOCK_G)
    sp = tl.arange(0, SPLITS)
    d = chunk * CHUNK_D + tl.arange(0, CHUNK_D)
    first = pid * num_splits
    real = (g < GROUP)[None, :]  # masked cells read m = -1e30 (a split's floor), l = 0, acc = 0: no weight
    top = tl.full([BLOCK_G], -1.0e30, tl.float32)
    for s0 in range(0, used, SPLITS):
        rows = (first + s0 + sp)[:, None] * BLOCK_G + g[None, :]  # [SPLITS, BLOCK_G]
        m = tl.load(m_ptr + rows, mask=(s0 + sp < used)[:, None] & real, other=-1.0e30)
        top = tl.maximum(top, tl.max(m, 0))
    total = tl.zeros([BLOCK_G], tl.float32)
    out = tl.zeros([BLOCK_G, CHUNK_D], tl.float32)
    for s0 in range(0, used, SPLITS):
        ok = (s0 + sp < used)[:, None] & real
        rows = (first + s0 + sp)[:, None] * BLOCK_G + g[None, :]
        weight = tl.exp(tl.load(m_ptr + rows, mask=ok, other=-1.0e30) - top[None, :])
        total += tl.sum(tl.load(l_ptr + rows, mask=ok, other=0.0) * weight, 0)
        acc = tl.load(acc_ptr + rows[:, :, None] * BLOCK_D + d[None, None, :], mask=ok[:, :, None], other=0.0)
        out += tl.sum(acc * weight[:, :, None], 0)
    out = out / tl.maximum(total, 1e-30)[:, None]
    keep = (g < GROUP)[:, None] & (d < HEAD_DIM)[None, :]
    tl.store(out_ptr + b * stride_ob + (h * GROUP + g)[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=keep)
    if chunk == 0:
        some = total > 0
        log_total = tl.where(some, top + tl.log(tl.where(some, total, 1.0)), float("-inf"))
        tl.store(log_total_ptr + pid * BLOCK_G + g, log_total)


@triton.jit
def _mass_kernel(lse_ptr, log_total_ptr, mass_ptr, listed_ptr, num_slots, num_kv_heads,
                 GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, HAS_LISTED: tl.constexpr):
    """Per page: its softmax weight summed over its rows (exp(lse - log_total)), averaged over the group;
    0 past the row's listed slots (the attention kernel wrote no lse there)."""
    pid = tl.program_id(0)
    s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    g = tl.arange(0, BLOCK_G)
    slots_here = num_slots
    if HAS_LISTED:
        slots_here = tl.minimum(tl.load(listed_ptr + pid // num_kv_heads).to(tl.int32), num_slots)
    ok = (g < GROUP)[:, None] & (s < slots_here)[None, :]
    lse = tl.load(lse_ptr + (pid * BLOCK_G + g)[:, None] * num_slots + s[None, :], mask=ok, other=float("-inf"))
    log_total = tl.load(log_total_ptr + pid * BLOCK_G + g)
    seen = log_total > float("-inf")
    weight = tl.exp(lse - tl.where(seen, log_total, 0.0)[:, None])
    weight = tl.where(ok & seen[:, None], weight, 0.0)
    tl.store(mass_ptr + pid * num_slots + s, tl.sum(weight, 0) / GROUP, mask=s < num_slots)


PAGES_PER_BLOCK = 4  # 64-row K/V tiles for 16-token pages
COMBINE_SPLITS, COMBINE_CHUNK_D, MASS_BLOCK_S = 16, 32, 64


def combine_chunk(block_d: int, device: torch.device) -> int:
    """Head-dim columns per combine program: a GPU wants more programs, the interpreter pays per program."""
    return min(COMBINE_CHUNK_D, block_d) if device.type == "cuda" else block_d


@lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:  # asked once per device, not on every eager launch
    return torch.cuda.get_device_properties(device).multi_processor_count


def _splits(programs: int, slots: int, pages_per_split: int | None, device: torch.device) -> int:
    if pages_per_split is not None:
        return max(1, pages_per_split)
    if device.type != "cuda":
        return max(1, slots)
    # split a long slot list so that the launch fills the GPU at least twice over
    target = 2 * _multiprocessors(device)
    splits = max(1, min(slots, -(-target // programs)))
    return max(1, slots // splits)  # rounded down: at least `splits` splits


def decode_attention_launch_args(q, k_cache, v_cache, page_ids, fill, pages_per_split=None, return_mass=False,
                                 pages_per_block=PAGES_PER_BLOCK, listed=None):
    """Shapes, buffers and constexprs of one launch (shared by the wrapper and the compile test)."""
    batch, num_heads, dim = q.shape
    num_kv_heads, slots = page_ids.shape[1], page_ids.shape[2]
    group = num_heads // num_kv_heads
    block_g, block_d = max(16, triton.next_power_of_2(group)), max(16, triton.next_power_of_2(dim))
    per_split = _splits(batch * num_kv_heads, slots, pages_per_split, q.device)
    pages_per_block = min(pages_per_block, triton.next_power_of_2(per_split))  # a short split: a smaller tile
    num_splits = max(1, -(-slots // per_split))
    programs = batch * num_kv_heads
    f32 = dict(dtype=torch.float32, device=q.device)
    acc = torch.empty(programs, num_splits, block_g, block_d, **f32)
    m = torch.empty(programs, num_splits, block_g, **f32)
    l = torch.empty(programs, num_splits, block_g, **f32)
    lse = torch.empty(programs, block_g, slots, **f32) if return_mass else torch.empty(1, **f32)
    constexprs = dict(GROUP=group, BLOCK_G=block_g, HEAD_DIM=dim, BLOCK_D=block_d, PAGE=k_cache.shape[2],
                      PAGES_PER_BLOCK=pages_per_block, UPCAST=not q.is_cuda,
                      WITH_MASS=return_mass, IEEE=q.dtype == torch.float32, HAS_LISTED=listed is not None)
    return (programs, num_splits), per_split, acc, m, l, lse, constexprs


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_ids: torch.Tensor,
                           fill: torch.Tensor, scale: float, return_mass: bool = False,
                           listed: torch.Tensor | None = None, pages_per_split: int | None = None,
                           pages_per_block: int = PAGES_PER_BLOCK):
    """Same contract as reference.paged_decode_attention. pages_per_split / pages_per_block (a power of
    two) are tuning knobs: how many slots one program walks at most (with `listed`, at least one tile),
    and how many pages one tile gathers."""
    batch, num_heads, dim = q.shape
    num_kv_heads, slots = page_ids.shape[1], page_ids.shape[2]
    q, page_ids, fill = q.contiguous(), page_ids.contiguous(), fill.contiguous()
    listed = None if listed is None else listed.contiguous()
    grid, per_split, acc, m, l, lse, constexprs = decode_attention_launch_args(
        q, k_cache, v_cache, page_ids, fill, pages_per_split, return_mass, pages_per_block, listed)
    listed_arg = page_ids if listed is None else listed  # a pointer the kernel never reads without HAS_LISTED
    _decode_attention_kernel[grid](
        q, k_cache, v_cache, page_ids, fill, listed_arg, acc, m, l, lse,
        scale, slots, num_kv_heads,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        page_ids.stride(0), page_ids.stride(1), fill.stride(0), fill.stride(1),
        **constexprs,
    )
    group = num_heads // num_kv_heads
    programs, num_splits = grid
    block_g, block_d = constexprs["BLOCK_G"], constexprs["BLOCK_D"]
    out = torch.empty_like(q)
    log_total = torch.empty(programs, block_g, dtype=torch.float32, device=q.device)
    chunk_d = combine_chunk(block_d, q.device)
    _combine_kernel[(programs, block_d // chunk_d)](
        acc, m, l, out, log_total, listed_arg, slots, num_splits, num_kv_heads, out.stride(0), out.stride(1),
        GROUP=group, BLOCK_G=block_g, HEAD_DIM=dim, BLOCK_D=block_d, CHUNK_D=chunk_d, SPLITS=COMBINE_SPLITS,
        PAGES_PER_BLOCK=constexprs["PAGES_PER_BLOCK"], HAS_LISTED=listed is not None)
    if not return_mass:
        return out
    mass = torch.empty(batch, num_kv_heads, slots, dtype=torch.float32, device=q.device)
    if slots:  # a grid of zero programs is not a launch
        _mass_kernel[(programs, triton.cdiv(slots, MASS_BLOCK_S))](
            lse, log_total, mass, listed_arg, slots, num_kv_heads,
            GROUP=group, BLOCK_G=block_g, BLOCK_S=MASS_BLOCK_S, HAS_LISTED=listed is not None)
    return out, mass
