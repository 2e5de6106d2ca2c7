"""ModelRunner: runs the model for a prefill chunk or a decode step over the paged pool, and applies
the KV policy inside each layer's attention.

The model hands each layer's q, k, v to an `attend` callable built here; it stores the new K/V and
page metadata into the pool, lets the policy pick a victim slot (at a page boundary) or the pages to
attend, runs the attention kernel and lets the policy update timestamps or mass. Everything inside a
step is tensor ops on the device; the host only decides, per sequence, whether a step opens a page.
"""

from __future__ import annotations

import torch

from lemma.engine.policies import Policy, SlotMeta
from lemma.engine.pool import KVPool
from lemma.engine.sequence import Sequence
from lemma.kernels import kernel_ops, reference
from lemma.models.llama import CausalLM

CONTINUE, NEW_SLOT, EVICT = 0, 1, 2  # what a decode step does to each (layer, sequence)


class ModelRunner:
    def __init__(self, model: CausalLM, pool: KVPool, prefill_chunk: int = 512, attention: str = "torch"):
        self.model, self.pool = model, pool
        self.ops = kernel_ops(attention)
        self.device = pool.k.device
        self.num_kv_heads = model.config.num_kv_heads
        self.scale = model.config.head_dim ** -0.5
        self.heads = torch.arange(self.num_kv_heads, device=self.device)
        self.prefill_chunk = max(pool.page_size, prefill_chunk // pool.page_size * pool.page_size)
        # observer(layer, born [B,Hkv,S], valid, step mass [B,Hkv,S], evicted born [B,Hkv] or -1): for traces
        self.observer = None
        self._tables_key: tuple = ()
        self._tables = torch.empty(0)

    def _tensor(self, values: list, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    def _append_page(self, seq: Sequence, layer: int) -> int:
        page = self.pool.take(layer)
        seq.reserved[layer] -= 1
        seq.pages[layer].append(page)
        seq.pages_version += 1
        return len(seq.pages[layer]) - 1

    # ---- prefill ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, seq: Sequence, policy: Policy, all_logits: bool = False) -> torch.Tensor:
        """Run the whole prompt through the model in page-aligned chunks (dense attention), then cut
        layers over their capacity down to it. Returns the last position's logits [V] (or [T, V])."""
        ids, pool = seq.prompt_ids, self.pool
        rows = []
        for start in range(0, len(ids), self.prefill_chunk):
            end = min(start + self.prefill_chunk, len(ids))
            for layer in range(pool.num_layers):
                while len(seq.pages[layer]) < pool.pages_for(end):
                    self._append_page(seq, layer)
            positions = torch.arange(start, end, device=self.device)
            attend = self._prefill_attend(seq, policy, start, end, positions)
            last = None if all_logits else self._tensor([end - start - 1])
            rows.append(self.model(self._tensor(ids[start:end]), positions, attend, logits_at=last))
        seq.track_peak(pool.layer_page_bytes)  # the whole prompt is resident until the cut
        self._cut_to_capacity(seq)
        return torch.cat(rows) if all_logits else rows[-1][0]

    def _prefill_attend(self, seq: Sequence, policy: Policy, start: int, end: int, positions: torch.Tensor):
        """The attend callable of the prefill chunk [start, end) (start page aligned; positions on the
        device): store K/V, set the metadata of the pages it writes, causal attention over the pages so far."""
        pool, page = self.pool, self.pool.page_size
        first_slot, last_slot = start // page, pool.pages_for(end)
        tables = self._tensor([pages[:last_slot] for pages in seq.pages])  # [L, S]
        touched = tables[:, first_slot:]  # pages this chunk writes, [L, n]
        born = torch.arange(first_slot, last_slot, device=self.device)
        counts = torch.clamp(end - born * page, max=page)
        slot_of, offsets = positions // page, positions % page
        pinned = policy.pin_prompt_pages()

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            kc, vc = pool.k[layer], pool.v[layer]
            table = tables[layer]
            reference.store_kv(kc, vc, k, v, table[slot_of][:, None].expand(-1, self.num_kv_heads), offsets)
            pages_now = touched[layer][:, None].expand(-1, self.num_kv_heads)
            fill = counts[:, None].expand_as(pages_now)
            hi, lo = reference.page_key_bounds(kc, pages_now, fill)
            pool.key_max[layer][pages_now, self.heads], pool.key_min[layer][pages_now, self.heads] = hi, lo
            pool.fill[layer][pages_now, self.heads] = fill.to(torch.int32)
            pool.born[layer][pages_now, self.heads] = born[:, None].expand_as(pages_now)
            pool.stamp[layer][pages_now, self.heads] = born[:, None].expand_as(pages_now) * page
            pool.mass[layer][pages_now, self.heads] = 0.0
            pool.pinned[layer][pages_now, self.heads] = pinned and policy.sparse(layer)
            return reference.prefill_attention(q, kc, vc, table[None, :].expand(self.num_kv_heads, -1), positions, self.scale)

        return attend

    def _cut_to_capacity(self, seq: Sequence) -> None:
        """A prompt longer than a layer's capacity keeps its first page (the sink) and its most recent
        pages, the same for every KV head; the rest go back to the pool."""
        most = 0
        for layer, cap in enumerate(seq.capacity):
            pages = seq.pages[layer]
            if len(pages) > cap:
                dropped = pages[1 : len(pages) - cap + 1]
                seq.pages[layer] = pages[:1] + pages[len(pages) - cap + 1 :]
                self.pool.release(layer, dropped)
                seq.pages_version += 1
                most = max(most, len(dropped))
        seq.stats.pages_evicted += most

    # ---- decode -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, seqs: list[Sequence], policy: Policy) -> torch.Tensor:
        """Feed each sequence's last token; return next-token logits [B, V]."""
        pool, page, layers = self.pool, self.pool.page_size, self.pool.num_layers
        positions = [s.num_tokens - 1 for s in seqs]
        modes = [[CONTINUE] * len(seqs) for _ in range(layers)]
        new_slots = [[0] * len(seqs) for _ in range(layers)]
        for b, (s, pos) in enumerate(zip(seqs, positions)):
            if pos % page:
                continue
            for layer in range(layers):
                if len(s.pages[layer]) < s.capacity[layer]:
                    modes[layer][b], new_slots[layer][b] = NEW_SLOT, self._append_page(s, layer)
                else:
                    modes[layer][b] = EVICT
            s.stats.pages_evicted += any(modes[layer][b] == EVICT for layer in range(layers))
        tables = self._page_tables(seqs)
        mode_t, new_slot_t = self._tensor(modes), self._tensor(new_slots)
        evicting = [EVICT in row for row in modes]
        pos_t = self._tensor(positions)
        logical, offsets = pos_t // page, pos_t % page
        scratch = pool.num_pages  # metadata writes for empty slots land here
        heads = self.heads[None, :, None]
        ops = self.ops

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            kc, vc = pool.k[layer], pool.v[layer]
            ids = tables[layer][:, None, :].expand(-1, self.num_kv_heads, -1)  # [B, Hkv, S]
            valid = ids >= 0
            sparse = policy.sparse(layer)
            evicts = sparse and policy.evicts
            tracked = evicts or self.observer is not None  # needs per-slot metadata
            mode = mode_t[layer][:, None]
            if tracked:
                safe = ids.clamp(min=0)
                meta = self._gather_meta(layer, safe, valid)
                current = (meta.born == logical[:, None, None]) & valid
                write_slot = current.int().argmax(-1)  # CONTINUE: the slot holding this position's page
                write_slot = torch.where(mode == NEW_SLOT, new_slot_t[layer][:, None], write_slot)
                if evicting[layer]:
                    write_slot = torch.where(mode == EVICT, policy.victim(meta, logical), write_slot)
            else:  # nothing is ever evicted here, so slot s holds logical page s
                write_slot = logical[:, None].expand(-1, self.num_kv_heads)
            write_page = ids.gather(2, write_slot[..., None])[..., 0]  # [B, Hkv]
            if self.observer is not None:
                evicted = torch.where(mode == EVICT, meta.born.gather(2, write_slot[..., None])[..., 0], -1)
            if tracked:
                self._open_pages(layer, write_page, mode != CONTINUE, logical, pos_t)
            bounded = sparse and policy.needs_bound
            ops.store_decode(kc, vc, k, v, write_page, offsets, pool.key_max[layer] if bounded else None,
                             pool.key_min[layer] if bounded else None, pool.fill[layer])

            meta = self._gather_meta(layer, safe, valid) if tracked else None
            bound = ops.page_scores(q, pool.key_max[layer], pool.key_min[layer], ids) if bounded else None
            chosen = policy.select(bound, meta, write_slot) if sparse else None
            attend_ids = ids if chosen is None else torch.where(valid.gather(2, chosen), ids.gather(2, chosen), -1)
            attend_fill = torch.where(attend_ids >= 0, pool.fill[layer][attend_ids.clamp(min=0), heads], 0)
            want_mass = (sparse and policy.needs_mass) or self.observer is not None
            result = ops.paged_decode_attention(q, kc, vc, attend_ids, attend_fill, self.scale, return_mass=want_mass)
            out, step_mass = result if want_mass else (result, None)
            if self.observer is not None and chosen is None:
                self.observer(layer, meta.born, valid, step_mass, evicted)
            if evicts:
                stamp, mass = policy.update(meta, bound, step_mass, pos_t)
                target = torch.where(valid, ids, scratch)
                pool.stamp[layer][target, heads] = stamp
                pool.mass[layer][target, heads] = mass
            return out

        tokens = self._tensor([s.last_token for s in seqs])
        return self.model(tokens, pos_t, attend)

    def _page_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        """[L, B, S] page ids (-1 = empty), rebuilt only when some sequence's pages changed."""
        key = tuple((s.uid, s.pages_version) for s in seqs)
        if key != self._tables_key:
            slots = max(len(p) for s in seqs for p in s.pages)
            rows = [[s.pages[layer] + [-1] * (slots - len(s.pages[layer])) for s in seqs] for layer in range(self.pool.num_layers)]
            self._tables, self._tables_key = self._tensor(rows), key
        return self._tables

    def _gather_meta(self, layer: int, safe: torch.Tensor, valid: torch.Tensor) -> SlotMeta:
        pool, heads = self.pool, self.heads[None, :, None]
        return SlotMeta(born=pool.born[layer][safe, heads], stamp=pool.stamp[layer][safe, heads],
                        mass=pool.mass[layer][safe, heads], pinned=pool.pinned[layer][safe, heads], valid=valid)

    def _open_pages(self, layer: int, write_page: torch.Tensor, opening: torch.Tensor,
                    logical: torch.Tensor, position: torch.Tensor) -> None:
        """Reset the metadata of pages that start holding a new logical page this step."""
        pool, heads = self.pool, self.heads
        old = lambda t: t[layer][write_page, heads]  # noqa: E731
        pool.born[layer][write_page, heads] = torch.where(opening, logical[:, None], old(pool.born))
        pool.stamp[layer][write_page, heads] = torch.where(opening, position[:, None], old(pool.stamp))
        pool.mass[layer][write_page, heads] = torch.where(opening, 0.0, old(pool.mass))
        pool.pinned[layer][write_page, heads] = torch.where(opening, False, old(pool.pinned))
