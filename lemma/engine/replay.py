"""Exact page-chunked replay of a teacher-forced continuation: up to one page of known tokens per
forward instead of one decode step per token, with the same evictions, timestamps, mass and
log-probabilities as token-by-token decoding.

Why it is exact: a decode step opens (and under an evicting policy, evicts for) a page only at a
page's first position, so between two page boundaries the retained set is fixed. For the T known
tokens of one page, each layer runs the decode phases once for the page and per query where the
query matters:

    slots, victim   the page-open decision of the chunk's first position, as the decode step makes it
    store           the T keys/values into the page; the page's key max/min as each query saw it
                    (a running max/min over the page's rows up to that query)
    select          per query (Quest), from per-query bounds
    attend          every query over the retained pages, its own page up to itself (causal)
    update          the policy's stamp/mass updates applied query by query, in order

No Triton twin: on GPU this runs as torch ops (like prefill); the oracle is token-by-token replay.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lemma.engine.attention import write_slots
from lemma.engine.decode_state import CONTINUE
from lemma.engine.policies import Policy
from lemma.engine.pool import KVPool, SlotMeta
from lemma.kernels import reference


@dataclass
class ReplaySegment:
    """One sequence's known tokens at positions [start, end) of one logical page, rows
    [offset, offset + end - start) of the forward."""

    tables: torch.Tensor  # [L, S] page ids by slot (-1 = empty)
    start: int
    end: int
    offset: int
    modes: torch.Tensor  # [L] CONTINUE, NEW_SLOT or EVICT for the chunk's first position
    new_slots: torch.Tensor  # [L] the slot a NEW_SLOT layer writes


class ReplayAttention:
    """The `Attend` of a replay forward: one page of known tokens per segment."""

    def __init__(self, pool: KVPool, policy: Policy, scale: float, segments: list[ReplaySegment],
                 positions: torch.Tensor):
        self.pool, self.policy, self.scale, self.segments = pool, policy, scale, segments
        self.parts = []
        for seg in segments:
            rows = slice(seg.offset, seg.offset + seg.end - seg.start)
            pos = positions[rows]
            self.parts.append((seg, rows, pos, pos % pool.page_size, pos[:1] // pool.page_size))

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        outs = [self.segment(layer, *part, q[part[1]], k[part[1]], v[part[1]]) for part in self.parts]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def segment(self, layer: int, seg: ReplaySegment, rows: slice, positions: torch.Tensor, offsets: torch.Tensor,
                logical: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        pool, policy = self.pool, self.policy
        heads, count = pool.heads, q.shape[0]
        sparse = policy.sparse(layer)
        evicts, bounded = sparse and policy.evicts, sparse and policy.needs_bound
        ids = seg.tables[layer][None, None, :].expand(-1, heads.numel(), -1)  # [1, Hkv, S]
        valid = ids >= 0
        meta = pool.slot_meta(layer, ids, valid) if evicts else None
        mode = seg.modes[layer].view(1, 1)
        slot = write_slots(policy, meta, logical, mode, seg.new_slots[layer].view(1, 1), heads.numel(), evicts)
        page = ids.gather(2, slot[..., None])[..., 0]  # [1, Hkv]

        if evicts:
            pool.open_pages(layer, page, (mode != CONTINUE).expand_as(page), logical, positions[:1])
        reference.store_kv(pool.k[layer], pool.v[layer], k, v, page.expand(count, -1), offsets)
        pool.fill[layer][page, heads] = (offsets[-1] + 1).to(torch.int32)
        bound = None
        if bounded:  # the page's key max/min after each query's key: running extremes over its rows
            keys = reference.gather_blocks(pool.k[layer], page, 1)[0].float()  # [Hkv, page, D]
            seen_hi, seen_lo = keys.cummax(1).values[:, offsets], keys.cummin(1).values[:, offsets]  # [Hkv, T, D]
            pool.key_max[layer][page, heads], pool.key_min[layer][page, heads] = seen_hi[None, :, -1], seen_lo[None, :, -1]
            safe = ids.clamp(min=0)
            hi = pool.key_max[layer][safe, heads[None, :, None]].expand(count, -1, -1, -1).clone()  # [T, Hkv, S, D]
            lo = pool.key_min[layer][safe, heads[None, :, None]].expand(count, -1, -1, -1).clone()
            at = slot[0][None, :, None, None].expand(count, -1, 1, hi.shape[-1])
            hi.scatter_(2, at, seen_hi.transpose(0, 1)[:, :, None])
            lo.scatter_(2, at, seen_lo.transpose(0, 1)[:, :, None])
            bound = reference.bound_from_extremes(q, hi, lo, ids.expand(count, -1, -1))

        # per query, the rows of each page it sees: whole retained pages, its own page up to itself
        safe = ids.clamp(min=0)
        fill = torch.where(valid, pool.fill[layer][safe, heads[None, :, None]], 0).expand(count, -1, -1).clone()
        fill.scatter_(2, slot.expand(count, -1)[..., None], (offsets + 1)[:, None, None].expand(-1, heads.numel(), 1).to(fill.dtype))
        if sparse:
            chosen = policy.select(bound, meta, slot.expand(count, -1))
            if chosen is not None:
                picked = torch.zeros_like(valid.expand(count, -1, -1)).scatter_(2, chosen, True)
                fill = torch.where(picked, fill, 0)
        want_mass = sparse and policy.needs_mass
        result = reference.paged_chunk_attention(q, pool.k[layer], pool.v[layer], ids[0], fill, self.scale, want_mass)
        out, mass = result if want_mass else (result, None)

        if evicts:  # the decode step's update, once per query in order
            meta = pool.slot_meta(layer, ids, valid)  # the opened page's metadata changed
            stamp, acc = meta.stamp, meta.mass
            for t in range(count):
                now = SlotMeta(meta.born, stamp, acc, meta.pinned, meta.valid)
                stamp, acc = policy.update(now, None if bound is None else bound[t : t + 1],
                                           None if mass is None else mass[t : t + 1], positions[t : t + 1])
            pool.write_policy_state(layer, ids, stamp, acc)
        return out
