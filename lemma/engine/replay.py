"""Exact page-chunked replay of a teacher-forced continuation: up to one page of known tokens per
sequence per forward instead of one decode step per token, with the same evictions, timestamps, mass
and log-probabilities as token-by-token decoding.

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

Every phase runs on all sequences of the forward at once: their chunks are laid on a [B, T] grid
(T = the longest chunk; a shorter chunk's padding cells compute and are then dropped: they store
nothing and update nothing).

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
from lemma.models.llama import ByLayer


@dataclass
class ReplayBatch:
    """B sequences' known tokens, each within one logical page: rows of the forward by sequence."""

    tables: torch.Tensor  # [B, L, S] page ids by slot (-1 = empty)
    modes: torch.Tensor  # [B, L] CONTINUE, NEW_SLOT or EVICT for each chunk's first position
    new_slots: torch.Tensor  # [B, L] the slot a NEW_SLOT layer writes
    grid: torch.Tensor  # [B, T] the forward row of each cell (padding cells: their sequence's last row)
    active: torch.Tensor  # [B, T] whether a cell is a real token
    cells: torch.Tensor  # [N] the cell (b * T + t) of each forward row

    @staticmethod
    def build(tables: list[torch.Tensor], modes: list[list[int]], new_slots: list[list[int]], lengths: list[int],
              device: torch.device) -> "ReplayBatch":
        """From per-sequence tables [L, S_b], page-open modes/slots per layer and chunk lengths (rows in order)."""
        width = max(t.shape[1] for t in tables)
        padded = torch.stack([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=-1) for t in tables])
        longest, starts = max(lengths), torch.tensor([0] + lengths[:-1]).cumsum(0)
        steps = torch.arange(longest)
        counts = torch.tensor(lengths)
        active = steps[None, :] < counts[:, None]
        grid = starts[:, None] + torch.minimum(steps[None, :], counts[:, None] - 1)
        cells = (torch.arange(len(lengths))[:, None] * longest + steps[None, :])[active]
        return ReplayBatch(padded.to(device), torch.tensor(modes, device=device), torch.tensor(new_slots, device=device),
                           grid.to(device), active.to(device), cells.to(device))


class ReplayAttention(ByLayer):
    """The `Attend` of a replay forward: one page of known tokens per sequence."""

    def __init__(self, pool: KVPool, policy: Policy, scale: float, batch: ReplayBatch, positions: torch.Tensor,
                 outputs: bool = True):
        """outputs=False: only the policy's bookkeeping is wanted (a shared prefix, engine/recording.py);
        the attention runs only when the policy needs its mass, and the call returns None."""
        self.pool, self.policy, self.scale, self.batch, self.outputs = pool, policy, scale, batch, outputs
        cell_positions = positions[batch.grid]  # [B, T]
        self.positions = positions
        self.offsets = cell_positions % pool.page_size  # [B, T]
        self.logical = cell_positions[:, 0] // pool.page_size  # [B]
        self.first_positions = cell_positions[:, 0]
        self.row_offsets = positions % pool.page_size  # [N]
        self.row_sequence = batch.cells // batch.grid.shape[1]  # [N]
        self.last = batch.active.sum(1) - 1  # [B] each chunk's last cell

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
        pool, policy, batch = self.pool, self.policy, self.batch
        heads, kv_heads = pool.heads, pool.heads.numel()
        (count, steps), offsets = batch.grid.shape, self.offsets
        sparse = policy.sparse(layer)
        evicts, bounded = sparse and policy.evicts, sparse and policy.needs_bound
        ids = batch.tables[:, layer, None, :].expand(-1, kv_heads, -1)  # [B, Hkv, S]
        valid = ids >= 0
        meta = pool.layers[layer].slot_meta(ids, valid) if evicts else None
        mode = batch.modes[:, layer, None]  # [B, 1]
        slot = write_slots(policy, meta, self.logical, mode, batch.new_slots[:, layer, None], kv_heads, evicts)
        page = ids.gather(2, slot[..., None])[..., 0]  # [B, Hkv]

        if evicts:
            pool.layers[layer].open_pages(page, (mode != CONTINUE).expand_as(page), self.logical, self.first_positions)
        reference.store_kv(pool.k[layer], pool.v[layer], k, v, page[self.row_sequence], self.row_offsets)
        pool.fill[layer][page, heads] = (self.offsets.gather(1, self.last[:, None]) + 1).to(torch.int32)
        cell_q = q[batch.grid.view(-1)]  # [B*T, Hq, D]
        cell_slot = slot[:, None].expand(-1, steps, -1).reshape(count * steps, kv_heads)
        cell_ids = ids[:, None].expand(-1, steps, -1, -1).reshape(count * steps, kv_heads, -1)
        bound = None
        if bounded:  # the page's key max/min after each query's key: running extremes over its rows
            keys = reference.gather_blocks(pool.k[layer], page, 1).float()  # [B, Hkv, page, D]
            at = offsets[:, None, :, None].expand(-1, kv_heads, -1, keys.shape[-1])
            seen_hi, seen_lo = keys.cummax(2).values.gather(2, at), keys.cummin(2).values.gather(2, at)  # [B, Hkv, T, D]
            last = self.last[:, None, None, None].expand(-1, kv_heads, 1, keys.shape[-1])
            pool.key_max[layer][page, heads] = seen_hi.gather(2, last)[:, :, 0]
            pool.key_min[layer][page, heads] = seen_lo.gather(2, last)[:, :, 0]
            bound = self._bounds(layer, cell_q, ids, slot, seen_hi, seen_lo)  # [B*T, Hkv, S]

        # per query, the rows of each page it sees: whole retained pages, its own page up to itself
        safe = ids.clamp(min=0)
        fill = torch.where(valid, pool.fill[layer][safe, heads[None, :, None]], 0)[:, None].expand(-1, steps, -1, -1).clone()
        own = (offsets + 1)[:, :, None, None].expand(-1, -1, kv_heads, 1).to(fill.dtype)
        fill.scatter_(3, slot[:, None, :, None].expand(-1, steps, -1, 1), own)  # [B, T, Hkv, S]
        if sparse:
            chosen = policy.select(bound, meta, cell_slot)
            if chosen is not None:
                picked = torch.zeros_like(cell_ids, dtype=torch.bool).scatter_(2, chosen, True)
                fill = torch.where(picked.view_as(fill), fill, 0)
        want_mass = sparse and policy.needs_mass
        out = mass = None
        if self.outputs or want_mass:
            result = reference.paged_chunk_attention(cell_q.view(count, steps, *q.shape[1:]), pool.k[layer],
                                                     pool.v[layer], ids, fill, self.scale, want_mass)
            out, mass = result if want_mass else (result, None)

        if evicts:  # the decode step's update, once per query in order; padding cells keep the state
            meta = pool.layers[layer].slot_meta(ids, valid)  # the opened pages changed
            stamp, acc = meta.stamp, meta.mass
            bound = None if bound is None else bound.view(count, steps, *bound.shape[1:])
            for t in range(steps):
                now = SlotMeta(meta.born, stamp, acc, meta.pinned, meta.valid)
                new_stamp, new_acc = policy.update(now, None if bound is None else bound[:, t],
                                                   None if mass is None else mass[:, t], self.positions[batch.grid[:, t]])
                real = batch.active[:, t, None, None]
                stamp, acc = torch.where(real, new_stamp, stamp), torch.where(real, new_acc, acc)
            pool.layers[layer].write_policy_state(ids, stamp, acc)
        return out.reshape(count * steps, *q.shape[1:])[batch.cells] if self.outputs else None

    def _bounds(self, layer: int, cell_q: torch.Tensor, ids: torch.Tensor, slot: torch.Tensor,
                seen_hi: torch.Tensor, seen_lo: torch.Tensor) -> torch.Tensor:
        """Each query's Quest bound [B*T, Hkv, S]: retained pages from the pool's key max/min, its own page
        (slot [B, Hkv]) from the running extremes seen_hi/seen_lo [B, Hkv, T, D] up to itself."""
        count, steps = self.batch.grid.shape
        kv_heads, dim = ids.shape[1], cell_q.shape[-1]
        heads = self.pool.heads[None, :, None]
        safe = ids.clamp(min=0)
        hi, lo = self.pool.key_max[layer][safe, heads], self.pool.key_min[layer][safe, heads]  # [B, Hkv, S, D]
        qg = cell_q.float().view(count, steps, kv_heads, -1, dim).transpose(1, 2)  # [B, Hkv, T, G, D]
        group = qg.shape[3]
        scores = reference.signed_dot(qg.reshape(count, kv_heads, steps * group, dim), hi, lo)
        scores = scores.view(count, kv_heads, steps, group, -1)  # [B, Hkv, T, G, S]
        own = reference.signed_dot(qg, seen_hi[:, :, :, None], seen_lo[:, :, :, None])  # [B, Hkv, T, G, 1]
        scores.scatter_(4, slot[:, :, None, None, None].expand(-1, -1, steps, group, 1), own)
        bound = scores.amax(3).masked_fill(ids[:, :, None, :] < 0, float("-inf"))  # [B, Hkv, T, S]
        return bound.transpose(1, 2).reshape(count * steps, kv_heads, -1)
