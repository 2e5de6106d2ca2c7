"""ModelRunner: runs the model for a prefill chunk or a decode step over the paged pool.

It builds the step's page tables and hands the model an `attend` callable that stores the new K/V
into the pool and attends the listed pages. Page ownership and admission belong to the engine.
"""

from __future__ import annotations

import torch

from lemma.engine.pool import KVPool
from lemma.engine.sequence import Sequence
from lemma.kernels import reference
from lemma.models.llama import CausalLM


class ModelRunner:
    def __init__(self, model: CausalLM, pool: KVPool, prefill_chunk: int = 512):
        self.model, self.pool = model, pool
        self.device = pool.k.device
        self.num_kv_heads = model.config.num_kv_heads
        self.scale = model.config.head_dim ** -0.5
        self.prefill_chunk = max(pool.page_size, prefill_chunk // pool.page_size * pool.page_size)

    def _ensure_pages(self, seq: Sequence, tokens: int) -> None:
        while len(seq.pages) < self.pool.pages_for(tokens):
            seq.pages.append(self.pool.take())
            seq.reserved_pages -= 1

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)

    @torch.inference_mode()
    def prefill(self, seq: Sequence, all_logits: bool = False) -> torch.Tensor:
        """Run the whole prompt through the model in chunks; return the last position's logits [V]
        (or every position's, [T, V], with all_logits)."""
        ids, page = seq.prompt_ids, self.pool.page_size
        logits, rows = None, []
        for start in range(0, len(ids), self.prefill_chunk):
            end = min(start + self.prefill_chunk, len(ids))
            self._ensure_pages(seq, end)
            positions = torch.arange(start, end, device=self.device)
            pages_t = self._tensor(seq.pages[: self.pool.pages_for(end)])
            table = pages_t[None, :].expand(self.num_kv_heads, -1)
            write_pages = pages_t[positions // page][:, None].expand(-1, self.num_kv_heads)
            offsets = positions % page

            def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                kc, vc = self.pool.k[layer], self.pool.v[layer]
                reference.store_kv(kc, vc, k, v, write_pages, offsets)
                return reference.prefill_attention(q, kc, vc, table, positions, self.scale)

            last = None if all_logits else self._tensor([end - start - 1])
            logits = self.model(self._tensor(ids[start:end]), positions, attend, logits_at=last)
            rows.append(logits)
        return torch.cat(rows) if all_logits else logits[0]

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """Feed each sequence's last token; return next-token logits [B, V]."""
        page = self.pool.page_size
        positions = [s.num_tokens - 1 for s in seqs]
        for s, pos in zip(seqs, positions):
            self._ensure_pages(s, pos + 1)
        slots = max(len(s.pages) for s in seqs)
        table_rows = [s.pages + [-1] * (slots - len(s.pages)) for s in seqs]
        fill_rows = [[page] * (len(s.pages) - 1) + [pos % page + 1] + [0] * (slots - len(s.pages))
                     for s, pos in zip(seqs, positions)]
        heads = self.num_kv_heads
        page_ids = self._tensor(table_rows)[:, None, :].expand(-1, heads, -1)
        fill = self._tensor(fill_rows)[:, None, :].expand(-1, heads, -1)
        write_pages = self._tensor([s.pages[pos // page] for s, pos in zip(seqs, positions)])[:, None].expand(-1, heads)
        offsets = self._tensor([pos % page for pos in positions])

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            kc, vc = self.pool.k[layer], self.pool.v[layer]
            reference.store_kv(kc, vc, k, v, write_pages, offsets)
            return reference.paged_decode_attention(q, kc, vc, page_ids, fill, self.scale)

        tokens = self._tensor([s.last_token for s in seqs])
        return self.model(tokens, self._tensor(positions), attend)
