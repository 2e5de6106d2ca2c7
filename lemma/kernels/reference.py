"""Torch reference of every attention kernel: the CPU path and the oracle the Triton kernels must match.

Cache layout, per layer: K and V are [num_pages, num_kv_heads, page_size, head_dim]; a page of one KV
head is one contiguous block. A page table row lists page ids per (sequence, KV head), -1 for an empty
slot, with how many tokens of each page are valid. Slot order does not matter for decode attention
(positions are already in the keys through RoPE), so a policy may put any pages in any slots.
"""

from __future__ import annotations

import torch
from torch.nn.attention.bias import causal_lower_right


def gather_blocks(cache: torch.Tensor, page_ids: torch.Tensor, head_axis: int) -> torch.Tensor:
    """cache [P, Hkv, page, D] -> block (page_ids[...], h) for every entry, h its index along head_axis of
    page_ids; shaped page_ids.shape + [page, D] (-1 reads page 0). One index_select over flattened
    (page, head) blocks: much faster on CPU than 2-D advanced indexing."""
    num_kv_heads, page_size, dim = cache.shape[1:]
    shape = [1] * page_ids.dim()
    shape[head_axis] = num_kv_heads
    heads = torch.arange(num_kv_heads, device=page_ids.device).view(shape)
    blocks = (page_ids.clamp(min=0) * num_kv_heads + heads).reshape(-1)
    return cache.reshape(-1, page_size, dim).index_select(0, blocks).view(*page_ids.shape, page_size, dim)


def store_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    page_ids: torch.Tensor,
    offsets: torch.Tensor,
) -> None:
    """Write k/v [N, Hkv, D] of N new tokens into page page_ids[n, h] (shape [N, Hkv]) at row offsets[n]."""
    heads = torch.arange(k.shape[1], device=k.device)[None, :]
    k_cache[page_ids, heads, offsets[:, None]] = k.to(k_cache.dtype)
    v_cache[page_ids, heads, offsets[:, None]] = v.to(v_cache.dtype)


def page_key_bounds(k_cache: torch.Tensor, page_ids: torch.Tensor, fill: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel-wise max and min [M, Hkv, D] (fp32) of the first fill[m, h] keys of page page_ids[m, h]."""
    keys = gather_blocks(k_cache, page_ids, 1).float()  # [M, Hkv, page, D]
    rows = torch.arange(keys.shape[2], device=keys.device)
    valid = (rows[None, None, :] < fill[..., None])[..., None]
    hi = keys.masked_fill(~valid, float("-inf")).amax(2)
    lo = keys.masked_fill(~valid, float("inf")).amin(2)
    return hi, lo


def store_decode(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 page_ids: torch.Tensor, offsets: torch.Tensor, key_max: torch.Tensor | None,
                 key_min: torch.Tensor | None, fill: torch.Tensor) -> None:
    """A decode step's store: k/v [N, Hkv, D] into page page_ids[n, h] at row offsets[n], the page's fill
    [P, Hkv] = offsets[n] + 1 and, unless key_max/key_min [P, Hkv, D] are None, the page's key max/min
    over its rows 0..offsets[n]. Each (page, head) receives at most one token."""
    store_kv(k_cache, v_cache, k, v, page_ids, offsets)
    heads = torch.arange(k.shape[1], device=k.device)[None, :]
    count = (offsets + 1)[:, None].expand_as(page_ids)
    if key_max is not None:
        key_max[page_ids, heads], key_min[page_ids, heads] = page_key_bounds(k_cache, page_ids, count)
    fill[page_ids, heads] = count.to(fill.dtype)


def page_scores(q: torch.Tensor, key_max: torch.Tensor, key_min: torch.Tensor, page_ids: torch.Tensor) -> torch.Tensor:
    """Quest's upper bound of q·k over each listed page: sum_d max(q_d M_d, q_d m_d), max over the
    query heads of the group. q [B, Hq, D]; key_max/key_min [P, Hkv, D]; page_ids [B, Hkv, S]
    -> [B, Hkv, S] fp32, -inf on empty slots."""
    heads = torch.arange(page_ids.shape[1], device=q.device)[None, :, None]
    safe = page_ids.clamp(min=0)
    return bound_from_extremes(q, key_max[safe, heads], key_min[safe, heads], page_ids)


def bound_from_extremes(q: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor, page_ids: torch.Tensor) -> torch.Tensor:
    """page_scores' formula over given per-slot key max/min hi, lo [B, Hkv, S, D] -> [B, Hkv, S]."""
    batch, num_heads, dim = q.shape
    num_kv_heads = page_ids.shape[1]
    qg = q.float().view(batch, num_kv_heads, num_heads // num_kv_heads, dim)
    bound = signed_dot(qg, hi, lo).amax(2)  # [B, Hkv, G, S] -> [B, Hkv, S]
    return bound.masked_fill(page_ids < 0, float("-inf"))


def signed_dot(q: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """sum_d max(q_d hi_d, q_d lo_d) for q [..., R, D] against every row of hi, lo [..., S, D] -> [..., R, S].
    Since hi >= lo, the max picks hi where q_d >= 0 and lo where q_d < 0: two matmuls, q+ hi^T + q- lo^T,
    instead of a [R, S, D] product."""
    return q.clamp(min=0) @ hi.transpose(-1, -2) + q.clamp(max=0) @ lo.transpose(-1, -2)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_ids: torch.Tensor,
    fill: torch.Tensor,
    scale: float,
    return_mass: bool = False,
    listed: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One query token per sequence attends the listed pages of its KV head group.

    q [B, Hq, D]; page_ids, fill [B, Hkv, S] -> out [B, Hq, D] (q's dtype); with return_mass also the
    attention mass per page [B, Hkv, S] (softmax weights summed over the page, averaged over the
    group's query heads; 0 for empty slots). listed [B]: row b's slots at and past listed[b] count as
    empty whatever they hold (a wide table's tail; the Triton kernel skips them).
    """
    batch, num_heads, dim = q.shape
    num_kv_heads, slots = page_ids.shape[1], page_ids.shape[2]
    if listed is not None:
        tail = torch.arange(slots, device=page_ids.device) >= listed[:, None, None]
        page_ids = page_ids.masked_fill(tail, -1)
    page_size = k_cache.shape[2]
    group = num_heads // num_kv_heads
    keys = gather_blocks(k_cache, page_ids, 1).float().view(batch, num_kv_heads, slots * page_size, dim)
    values = gather_blocks(v_cache, page_ids, 1).float().view(batch, num_kv_heads, slots * page_size, dim)
    rows = torch.arange(page_size, device=q.device)
    valid = (rows[None, None, None, :] < fill[..., None]) & (page_ids[..., None] >= 0)
    valid = valid.reshape(batch, num_kv_heads, 1, slots * page_size)
    qg = q.float().view(batch, num_kv_heads, group, dim)
    if not return_mass:
        out = torch.nn.functional.scaled_dot_product_attention(qg, keys, values, attn_mask=valid, scale=scale)
        return out.nan_to_num(0.0).reshape(batch, num_heads, dim).to(q.dtype)  # a row with nothing valid attends nothing

    scores = torch.einsum("bhgd,bhtd->bhgt", qg, keys) * scale
    scores = scores.masked_fill(~valid, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhgt,bhtd->bhgd", weights, values).reshape(batch, num_heads, dim).to(q.dtype)
    mass = weights.view(batch, num_kv_heads, group, slots, page_size).sum(-1).mean(2)
    return out, mass


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_ids: torch.Tensor,
    start: int,
    scale: float,
) -> torch.Tensor:
    """Causal attention of one sequence's chunk of queries at positions start, start + 1, ... over its
    pages in logical order.

    q [T, Hq, D]; page_ids [Hkv, S], slot s holding positions s*page_size ... Key j is visible to the
    query at position p when j <= p: keys up to the chunk's end, causal aligned to the lower right,
    which SDPA runs as a fused kernel (an explicit mask falls back to its 3x slower math path on CPU).
    """
    tokens, num_heads, dim = q.shape
    num_kv_heads, slots = page_ids.shape
    page_size = k_cache.shape[2]
    end = start + tokens
    keys = gather_blocks(k_cache, page_ids, 0).reshape(num_kv_heads, slots * page_size, dim)[:, :end]
    values = gather_blocks(v_cache, page_ids, 0).reshape(num_kv_heads, slots * page_size, dim)[:, :end]
    group = num_heads // num_kv_heads
    keys = keys.repeat_interleave(group, dim=0).to(q.dtype)
    values = values.repeat_interleave(group, dim=0).to(q.dtype)
    causal = causal_lower_right(tokens, end)
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1)[None], keys[None], values[None],
                                                           attn_mask=causal, scale=scale)
    return out[0].transpose(0, 1)


def paged_chunk_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_ids: torch.Tensor,
    fill: torch.Tensor,
    scale: float,
    return_mass: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """T queries of each of B sequences over that sequence's listed pages, each query seeing its own rows
    of each page: paged_decode_attention for rows that share page_ids, with the pages gathered once.

    q [B, T, Hq, D]; page_ids [B, Hkv, S]; fill [B, T, Hkv, S] rows of each page query t sees (0 hides
    a page) -> out [B, T, Hq, D]; with return_mass also the mass per page [B, T, Hkv, S] (as
    paged_decode_attention).
    """
    batch, tokens, num_heads, dim = q.shape
    num_kv_heads, slots = page_ids.shape[1:]
    page_size = k_cache.shape[2]
    group = num_heads // num_kv_heads
    keys = gather_blocks(k_cache, page_ids, 1).float().view(batch, num_kv_heads, slots * page_size, dim)
    values = gather_blocks(v_cache, page_ids, 1).float().view(batch, num_kv_heads, slots * page_size, dim)
    rows = torch.arange(page_size, device=q.device)
    valid = (rows < fill[..., None]) & (page_ids[:, None, :, :, None] >= 0)  # [B, T, Hkv, S, page]
    valid = valid.view(batch, tokens, num_kv_heads, 1, slots * page_size).transpose(1, 2)  # [B, Hkv, T, 1, S*page]
    qg = q.float().view(batch, tokens, num_kv_heads, group, dim).transpose(1, 2)  # [B, Hkv, T, G, D]
    scores = torch.einsum("bhtgd,bhnd->bhtgn", qg, keys) * scale
    weights = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhtgn,bhnd->bhtgd", weights, values).transpose(1, 2).reshape(batch, tokens, num_heads, dim)
    if not return_mass:
        return out.to(q.dtype)
    mass = weights.view(batch, num_kv_heads, tokens, group, slots, page_size).sum(-1).mean(3).transpose(1, 2)
    return out.to(q.dtype), mass
