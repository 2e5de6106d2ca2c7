"""The attention the model calls in each layer, over the paged pool under a KV policy.

The model hands every layer's post-RoPE q, k, v to the `Attend` it is given for that layer and gets the
output back. Here are the two the runner builds: `DecodeAttention` for one fixed-shape decode step (a
`DecodeLayer` per layer) and `PrefillAttention` for one chunk of a prompt. A decode layer runs named
phases, top to bottom:

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
from lemma.engine.pool import KVPool, PoolLayer, SlotMeta
from lemma.models.llama import ByLayer
from lemma.kernels import reference


class DecodeAttention:
    """One decode step's attention over one or more row slices, each under its own policy (rows of one
    policy are contiguous, so which policy a row runs is a static fact of the step's graph, not data):
    `layer(i)` is layer i's `DecodeLayer`, or a `SlicedLayer` of one per slice. With `trace`, each
    (layer, slice) also leaves (born, valid, step mass, evicted logical page or -1) for an observer."""

    def __init__(self, pool: KVPool, policies: tuple[Policy, ...], ops: SimpleNamespace, scale: float,
                 steps: tuple[StepInputs, ...], trace: bool = False):
        self.pool, self.policies, self.ops, self.scale, self.trace = pool, policies, ops, scale, trace
        self.steps = steps
        # per slice: the logical page each row writes, the row within it and, for a kernel that skips a
        # table's tail, the slots each row can list (tables fill front to back): once a step, not a layer
        logicals = [step.positions // pool.page_size for step in steps]
        self.places = [(logical, step.positions % pool.page_size, logical + 1 if ops.skips_tail else None)
                       for logical, step in zip(logicals, steps)]
        self.layers: list[list[DecodeLayer]] = []

    def layer(self, index: int) -> "DecodeLayer | SlicedLayer":
        parts = [DecodeLayer(self.pool.layers[index], policy, policy.sparse(index), self.ops, self.scale,
                             step.tables[index], step.modes[index], step.new_slots[index], step.positions,
                             *place, self.trace)
                 for policy, step, place in zip(self.policies, self.steps, self.places)]
        self.layers.append(parts)
        return parts[0] if len(parts) == 1 else SlicedLayer(tuple(parts))

    @property
    def traces(self) -> list[list[tuple]]:
        """Per slice: (layer, born, valid, step mass, evicted) of each traced layer."""
        return [[(i, *parts[j].trace_out) for i, parts in enumerate(self.layers) if parts[j].trace_out is not None]
                for j in range(len(self.steps))]


@dataclass(eq=False)
class SlicedLayer:
    """A layer's attention over consecutive row slices under different policies: q/k/v rows split by the
    slices' sizes (their tables' rows), each slice's DecodeLayer on its own rows, outputs back in order."""

    parts: tuple["DecodeLayer", ...]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        sizes = [part.tables.shape[0] for part in self.parts]  # symbolic in a compiled graph, not guarded ints
        return torch.cat([part(*rows) for part, *rows in zip(self.parts, q.split(sizes), k.split(sizes), v.split(sizes))])


@dataclass(eq=False)
class DecodeLayer:
    """One layer of a decode step: everything it reads is a field, so the same compiled graph serves
    every layer whose policy and sparsity match (engine/compiled.py)."""

    pool: PoolLayer
    policy: Policy
    sparse: bool
    ops: SimpleNamespace
    scale: float
    tables: torch.Tensor  # [B, S] page ids, -1 = empty
    modes: torch.Tensor  # [B] CONTINUE, NEW_SLOT or EVICT
    new_slots: torch.Tensor  # [B]
    positions: torch.Tensor  # [B]
    logical: torch.Tensor  # [B] the logical page each row writes
    offsets: torch.Tensor  # [B] the row within it
    listed: torch.Tensor | None  # [B] logical + 1: the most slots a row's table lists (None: not used)
    trace: bool = False
    trace_out: tuple | None = None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        pool, policy, sparse = self.pool, self.policy, self.sparse
        evicts = sparse and policy.evicts
        tracked = evicts or self.trace  # needs per-slot metadata
        mode = self.modes[:, None]  # [B, 1]

        ids, valid, meta = self.slots(tracked)
        write_slot = write_slots(policy, meta, self.logical, mode, self.new_slots[:, None], pool.heads.numel(), evicts)
        write_page = ids.gather(2, write_slot[..., None])[..., 0]
        write_page = torch.where(write_page >= 0, write_page, pool.scratch)  # padded rows
        evicted = None
        if self.trace:
            evicted = torch.where(mode == EVICT, meta.born.gather(2, write_slot[..., None])[..., 0], -1)
        self.store(k, v, write_page, mode, tracked, bounded=sparse and policy.needs_bound)

        meta = pool.slot_meta(ids, valid) if tracked else None  # the opened pages changed
        bound = self.ops.page_scores(q, pool.key_max, pool.key_min, ids) if sparse and policy.needs_bound else None
        attend_ids = self.select(ids, valid, bound, meta, write_slot) if sparse else ids
        want_mass = (sparse and policy.needs_mass) or self.trace
        out, step_mass = self.attend(q, attend_ids, want_mass, held=attend_ids is ids)
        if self.trace and attend_ids is ids:  # a trace follows the retained pages, not a selection
            self.trace_out = (meta.born, valid, step_mass, evicted)
        if evicts:
            stamp, mass = policy.update(meta, bound, step_mass, self.positions)
            pool.write_policy_state(ids, stamp, mass)
        return out

    def row_inputs(self) -> tuple[torch.Tensor, ...]:
        """Its inputs with one entry per batch row (dimension 0)."""
        rows = self.tables, self.modes, self.new_slots, self.positions, self.logical, self.offsets
        return rows if self.listed is None else (*rows, self.listed)

    # ---- phases ----------------------------------------------------------------------------------------
    def slots(self, tracked: bool):
        ids = self.tables[:, None, :].expand(-1, self.pool.heads.numel(), -1)  # [B, Hkv, S]
        valid = ids >= 0
        return ids, valid, (self.pool.slot_meta(ids, valid) if tracked else None)

    def store(self, k: torch.Tensor, v: torch.Tensor, write_page: torch.Tensor, mode: torch.Tensor,
              tracked: bool, bounded: bool) -> None:
        pool = self.pool
        if tracked:
            opening = (mode != CONTINUE).expand_as(write_page)
            pool.open_pages(write_page, opening, self.logical, self.positions)
        self.ops.store_decode(pool.k, pool.v, k, v, write_page, self.offsets,
                              pool.key_max if bounded else None, pool.key_min if bounded else None, pool.fill)

    def select(self, ids: torch.Tensor, valid: torch.Tensor, bound, meta, write_slot: torch.Tensor) -> torch.Tensor:
        chosen = self.policy.select(bound, meta, write_slot)
        if chosen is None:
            return ids
        return torch.where(valid.gather(2, chosen), ids.gather(2, chosen), -1)

    def attend(self, q: torch.Tensor, ids: torch.Tensor, want_mass: bool, held: bool = True):
        """held: ids are the rows' tables, whose slots are filled front to back, so row b lists at most
        logical[b] + 1 pages (one per logical page so far): a kernel that skips the tail walks only those
        of a table as wide as the pool (CUDA's, one graph for every context)."""
        pool = self.pool
        fill = torch.where(ids >= 0, pool.fill[ids.clamp(min=0), pool.heads[None, :, None]], 0)
        result = self.ops.paged_decode_attention(q, pool.k, pool.v, ids, fill, self.scale, return_mass=want_mass,
                                                 listed=self.listed if held else None)
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


class PrefillAttention(ByLayer):
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
            pool.layers[layer].write_prefilled(written, born, fill_heads, hi, lo, seg.pinned[layer][:, None])
            outs.append(reference.prefill_attention(q[rows], kc, vc, table[None, :].expand(heads, -1),
                                                    seg.start, self.scale))
        return outs[0] if len(outs) == 1 else torch.cat(outs)
