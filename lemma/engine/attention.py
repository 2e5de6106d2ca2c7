"""The attention the model calls in each layer, over the paged pool under a KV policy.

The model hands every layer's post-RoPE q, k, v to an `Attend` callable and gets the output back. Here
are the two the runner builds: `DecodeAttention` for one fixed-shape decode step and `PrefillAttention`
for one chunk of a prompt. A decode layer runs named phases, top to bottom:

    slots   -> the layer's page ids [B, Hkv, S] and, where the policy keeps metadata, their SlotMeta
    victim  -> the slot each (row, KV head) writes: its current page, a new slot, or the policy's victim
               (always computed for an evicting layer, applied with `where`: no host branch on step data)
    store   -> reset the metadata of opened pages, write k/v (and the page's key max/min and fill)
    select  -> the slots to attend (Quest's top-k, or all of them)
    attend  -> paged decode attention, with per-page mass when the policy or a trace wants it
    update  -> the policy's new timestamps / mass, written back to the pool

Everything is a tensor op on the step's inputs, so the step can be compiled with fullgraph=True.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from lemma.engine.decode_state import CONTINUE, EVICT, NEW_SLOT, StepInputs
from lemma.engine.policies import Policy
from lemma.engine.pool import KVPool, SlotMeta
from lemma.kernels import reference


class DecodeAttention:
    """One decode step's attention for every layer. With `trace`, each layer also leaves
    (born, valid, step mass, evicted logical page or -1) in `traces` for an observer outside the step."""

    def __init__(self, pool: KVPool, policy: Policy, ops: SimpleNamespace, scale: float, step: StepInputs,
                 trace: bool = False):
        self.pool, self.policy, self.ops, self.scale, self.step, self.trace = pool, policy, ops, scale, step, trace
        self.logical = step.positions // pool.page_size  # the logical page each row writes
        self.offsets = step.positions % pool.page_size
        self.traces: list[tuple[torch.Tensor, ...]] = []

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        pool, policy = self.pool, self.policy
        sparse = policy.sparse(layer)
        evicts = sparse and policy.evicts
        tracked = evicts or self.trace  # needs per-slot metadata
        mode = self.step.modes[layer][:, None]  # [B, 1]

        ids, valid, meta = self.slots(layer, tracked)
        write_slot = self.victim(layer, meta, mode, evicts)
        write_page = ids.gather(2, write_slot[..., None])[..., 0]
        write_page = torch.where(write_page >= 0, write_page, pool.scratch)  # padded rows
        evicted = None
        if self.trace:
            evicted = torch.where(mode == EVICT, meta.born.gather(2, write_slot[..., None])[..., 0], -1)
        self.store(layer, k, v, write_page, mode, tracked, bounded=sparse and policy.needs_bound)

        meta = pool.slot_meta(layer, ids, valid) if tracked else None  # the opened pages changed
        bound = self.ops.page_scores(q, pool.key_max[layer], pool.key_min[layer], ids) if sparse and policy.needs_bound else None
        attend_ids = self.select(ids, valid, bound, meta, write_slot) if sparse else ids
        want_mass = (sparse and policy.needs_mass) or self.trace
        out, step_mass = self.attend(layer, q, attend_ids, want_mass)
        if self.trace and attend_ids is ids:  # a trace follows the retained pages, not a selection
            self.traces.append((layer, meta.born, valid, step_mass, evicted))
        if evicts:
            stamp, mass = policy.update(meta, bound, step_mass, self.step.positions)
            pool.write_policy_state(layer, ids, stamp, mass)
        return out

    # ---- phases ----------------------------------------------------------------------------------------
    def slots(self, layer: int, tracked: bool):
        ids = self.step.tables[layer][:, None, :].expand(-1, self.pool.heads.numel(), -1)  # [B, Hkv, S]
        valid = ids >= 0
        return ids, valid, (self.pool.slot_meta(layer, ids, valid) if tracked else None)

    def victim(self, layer: int, meta, mode: torch.Tensor, evicts: bool) -> torch.Tensor:
        """[B, Hkv] slot this step writes."""
        return write_slots(self.policy, meta, self.logical, mode, self.step.new_slots[layer][:, None],
                           self.pool.heads.numel(), evicts)

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, write_page: torch.Tensor, mode: torch.Tensor,
              tracked: bool, bounded: bool) -> None:
        pool = self.pool
        if tracked:
            opening = (mode != CONTINUE).expand_as(write_page)
            pool.open_pages(layer, write_page, opening, self.logical, self.step.positions)
        self.ops.store_decode(pool.k[layer], pool.v[layer], k, v, write_page, self.offsets,
                              pool.key_max[layer] if bounded else None, pool.key_min[layer] if bounded else None,
                              pool.fill[layer])

    def select(self, ids: torch.Tensor, valid: torch.Tensor, bound, meta, write_slot: torch.Tensor) -> torch.Tensor:
        chosen = self.policy.select(bound, meta, write_slot)
        if chosen is None:
            return ids
        return torch.where(valid.gather(2, chosen), ids.gather(2, chosen), -1)

    def attend(self, layer: int, q: torch.Tensor, ids: torch.Tensor, want_mass: bool):
        pool = self.pool
        fill = torch.where(ids >= 0, pool.fill[layer][ids.clamp(min=0), pool.heads[None, :, None]], 0)
        result = self.ops.paged_decode_attention(q, pool.k[layer], pool.v[layer], ids, fill, self.scale,
                                                 return_mass=want_mass)
        return result if want_mass else (result, None)


def write_slots(policy: Policy, meta: SlotMeta | None, logical: torch.Tensor, mode: torch.Tensor,
                new_slots: torch.Tensor, heads: int, evicts: bool) -> torch.Tensor:
    """[B, Hkv] slot each row writes logical page logical [B] to: the slot already holding it (CONTINUE),
    new_slots [B, 1] (NEW_SLOT) or the policy's victim (EVICT); mode [B, 1]."""
    if meta is None:  # nothing is ever evicted here, so slot s holds logical page s
        return logical[:, None].expand(-1, heads)
    current = (meta.born == logical[:, None, None]) & meta.valid
    slot = current.int().argmax(-1)  # CONTINUE: the slot holding this position's page
    slot = torch.where(mode == NEW_SLOT, new_slots, slot)
    if evicts:
        slot = torch.where(mode == EVICT, policy.victim(meta, logical), slot)
    return slot


@dataclass
class PrefillSegment:
    """One sequence's chunk [start, end) of a prefill forward (start page-aligned); its tokens are rows
    [offset, offset + end - start) of the forward."""

    tables: torch.Tensor  # [L, S] the sequence's pages in logical order, up to the chunk's end
    start: int
    end: int
    offset: int
    pinned: list[torch.Tensor]  # per layer: [n] whether each page the chunk writes is pinned (RaaS prompt pages)


class PrefillAttention:
    """Prompt chunks of one or more sequences in one forward: per sequence, store k/v, set the metadata
    of the pages the chunk writes, causal attention over the sequence's pages so far."""

    def __init__(self, pool: KVPool, scale: float, segments: list[PrefillSegment], positions: torch.Tensor):
        self.pool, self.scale, self.segments, self.positions = pool, scale, segments, positions
        page, device = pool.page_size, positions.device
        self.parts = []
        for seg in segments:
            rows = slice(seg.offset, seg.offset + seg.end - seg.start)
            born = torch.arange(seg.start // page, seg.tables.shape[1], device=device)  # logical pages written
            fill = torch.clamp(seg.end - born * page, max=page)
            self.parts.append((seg, rows, born, fill, positions[rows] // page, positions[rows] % page))

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        pool = self.pool
        heads = pool.heads.numel()
        kc, vc = pool.k[layer], pool.v[layer]
        outs = []
        for seg, rows, born, fill, slot_of, offsets in self.parts:
            table = seg.tables[layer]  # [S] pages in logical order
            reference.store_kv(kc, vc, k[rows], v[rows], table[slot_of][:, None].expand(-1, heads), offsets)
            written = table[born]
            fill_heads = fill[:, None].expand(-1, heads)
            hi, lo = reference.page_key_bounds(kc, written[:, None].expand(-1, heads), fill_heads)
            pool.write_prefilled(layer, written, born, fill_heads, hi, lo, seg.pinned[layer][:, None])
            outs.append(reference.prefill_attention(q[rows], kc, vc, table[None, :].expand(heads, -1),
                                                    seg.start, self.scale))
        return outs[0] if len(outs) == 1 else torch.cat(outs)
