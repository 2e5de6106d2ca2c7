"""The static paged KV pool: allocated once, handed out page by page, every page returned."""

from __future__ import annotations

import torch

from lemma.errors import LemmaError

PAGE_SIZE = 16


class KVPool:
    """K and V for every layer as [num_layers, num_pages, num_kv_heads, page_size, head_dim].

    A page id covers one page of every layer and KV head, so a sequence owns whole page ids.
    Admission reserves pages up front (`reserve`); pages are then taken lazily (`take`) against the
    reservation, so a running sequence can never find the pool empty.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_pages: int,
                 dtype: torch.dtype, device: torch.device, page_size: int = PAGE_SIZE):
        if num_pages < 1:
            raise LemmaError(f"KV pool too small: {num_pages} pages")
        shape = (num_layers, num_pages, num_kv_heads, page_size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_pages, self.page_size = num_pages, page_size
        self.free_pages: list[int] = list(range(num_pages - 1, -1, -1))  # pop() hands out low ids first
        self.reserved = 0  # pages promised to admitted sequences but not yet taken

    @staticmethod
    def bytes_per_page(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                       page_size: int = PAGE_SIZE) -> int:
        return 2 * num_layers * num_kv_heads * page_size * head_dim * torch.finfo(dtype).bits // 8

    @property
    def page_bytes(self) -> int:
        return self.bytes_per_page(self.k.shape[0], self.k.shape[2], self.k.shape[4], self.k.dtype, self.page_size)

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def can_reserve(self, pages: int) -> bool:
        return pages <= len(self.free_pages) - self.reserved

    def reserve(self, pages: int) -> None:
        if not self.can_reserve(pages):
            raise LemmaError(f"KV pool cannot reserve {pages} pages ({len(self.free_pages) - self.reserved} available)")
        self.reserved += pages

    def take(self) -> int:
        """One page from the caller's reservation."""
        assert self.reserved > 0, "take() without a reservation"
        self.reserved -= 1
        return self.free_pages.pop()

    def release(self, pages: list[int], unused_reservation: int) -> None:
        self.free_pages.extend(reversed(pages))
        self.reserved -= unused_reservation
        assert 0 <= self.reserved <= len(self.free_pages) <= self.num_pages

    @property
    def all_free(self) -> bool:
        return len(self.free_pages) == self.num_pages and self.reserved == 0 and len(set(self.free_pages)) == self.num_pages
