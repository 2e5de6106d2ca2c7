"""The static paged KV pool: allocated once, handed out page by page, every page returned.

Pages are per layer: page id p of layer l is independent of page p of another layer, so layers kept
dense can hold more pages than evicting ones. Beside K and V the pool keeps, per (layer, page, KV head),
the metadata the policies work on: key max/min (Quest's bound), fill count, the logical page number it
holds (`born`), a timestamp, accumulated attention mass, and a pinned flag. Page id `num_pages` is a
scratch page that is never handed out: fixed-shape steps send the writes of empty slots and padded
batch rows there. The metadata writes live in `PoolLayer`, one layer's view of the pool.
"""

from __future__ import annotations

import torch

from dataclasses import dataclass

from lemma.errors import LemmaError

PAGE_SIZE = 16


@dataclass
class SlotMeta:
    """Per (sequence, KV head, slot) metadata of one layer. `valid` is False for empty slots."""

    born: torch.Tensor  # logical page number held (position // page size)
    stamp: torch.Tensor  # RaaS timestamp (a position)
    mass: torch.Tensor  # accumulated attention mass (H2O)
    pinned: torch.Tensor
    valid: torch.Tensor


class KVPool:
    """K and V per layer as [num_pages + 1, num_kv_heads, page_size, head_dim]. Which sequence holds
    which page is engine/pages.py's business."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_pages: int,
                 dtype: torch.dtype, device: torch.device, page_size: int = PAGE_SIZE):
        if num_pages < 1:
            raise LemmaError(f"KV pool too small: {num_pages} pages")
        # One tensor per layer (not views of one big tensor): a compiled step then updates each in place
        # instead of copying the whole pool back.
        shape = (num_pages + 1, num_kv_heads, page_size, head_dim)  # + the scratch page
        meta = (num_pages + 1, num_kv_heads)

        def per_layer(shape: tuple[int, ...], dtype: torch.dtype) -> list[torch.Tensor]:
            return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

        self.k, self.v = per_layer(shape, dtype), per_layer(shape, dtype)
        self.key_max = per_layer((*meta, head_dim), torch.float32)
        self.key_min = per_layer((*meta, head_dim), torch.float32)
        self.fill = per_layer(meta, torch.int32)
        self.born = per_layer(meta, torch.int64)
        self.stamp = per_layer(meta, torch.int64)
        self.mass = per_layer(meta, torch.float32)
        self.pinned = per_layer(meta, torch.bool)
        self.device = torch.device(device)
        self.num_layers, self.num_pages, self.page_size = num_layers, num_pages, page_size
        self.scratch = num_pages
        self.heads = torch.arange(num_kv_heads, device=device)
        self.layers = [PoolLayer(*(t[i] for t in (self.k, self.v, self.key_max, self.key_min, self.fill, self.born,
                                                  self.stamp, self.mass, self.pinned)), self.heads, self.scratch,
                                 page_size) for i in range(num_layers)]

    @staticmethod
    def bytes_per_page(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                       page_size: int = PAGE_SIZE) -> int:
        """K and V bytes of one page in every layer (the unit the pool is sized in)."""
        return 2 * num_layers * num_kv_heads * page_size * head_dim * torch.finfo(dtype).bits // 8

    @property
    def layer_page_bytes(self) -> int:
        """K and V bytes of one page of one layer."""
        return self.page_bytes // self.num_layers

    @property
    def page_bytes(self) -> int:
        k = self.k[0]
        return self.bytes_per_page(self.num_layers, k.shape[1], k.shape[3], k.dtype, self.page_size)

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

@dataclass(eq=False)
class PoolLayer:
    """One layer's tensors of the pool and the metadata writes on them, all tensor ops (no host sync).
    A decode step hands one of these to each layer, so a compiled layer reads no layer number: the same
    graph serves every layer (engine/compiled.py). `pages` index the layer's pages, one column per KV head."""

    k: torch.Tensor
    v: torch.Tensor
    key_max: torch.Tensor
    key_min: torch.Tensor
    fill: torch.Tensor
    born: torch.Tensor
    stamp: torch.Tensor
    mass: torch.Tensor
    pinned: torch.Tensor
    heads: torch.Tensor  # arange(num_kv_heads)
    scratch: int
    page_size: int

    def slot_meta(self, ids: torch.Tensor, valid: torch.Tensor) -> SlotMeta:
        """Metadata of the slots ids [B, Hkv, S] (-1 = empty, read from page 0 and marked invalid)."""
        safe, heads = ids.clamp(min=0), self.heads[None, :, None]
        return SlotMeta(born=self.born[safe, heads], stamp=self.stamp[safe, heads], mass=self.mass[safe, heads],
                        pinned=self.pinned[safe, heads], valid=valid)

    def write_prefilled(self, pages: torch.Tensor, born: torch.Tensor, fill: torch.Tensor,
                        key_max: torch.Tensor, key_min: torch.Tensor, pinned: torch.Tensor) -> None:
        """Pages [n] just written by a prefill chunk hold logical pages born [n] with fill [n, Hkv] rows;
        pinned [n, 1] says which of them are never evicted."""
        cols, heads = pages[:, None].expand(-1, self.heads.numel()), self.heads
        self.key_max[cols, heads], self.key_min[cols, heads] = key_max, key_min
        self.fill[cols, heads] = fill.to(torch.int32)
        self.born[cols, heads] = born[:, None].expand_as(cols)
        self.stamp[cols, heads] = born[:, None].expand_as(cols) * self.page_size
        self.mass[cols, heads] = 0.0
        self.pinned[cols, heads] = pinned

    def open_pages(self, pages: torch.Tensor, opening: torch.Tensor, logical: torch.Tensor,
                   position: torch.Tensor) -> None:
        """Where opening [B, Hkv], page pages[b, h] starts holding logical page logical[b], stamped now."""
        heads = self.heads
        keep = lambda t, new: torch.where(opening, new, t[pages, heads])  # noqa: E731
        self.born[pages, heads] = keep(self.born, logical[:, None])
        self.stamp[pages, heads] = keep(self.stamp, position[:, None])
        self.mass[pages, heads] = keep(self.mass, 0.0)
        self.pinned[pages, heads] = keep(self.pinned, False)

    def write_policy_state(self, ids: torch.Tensor, stamp: torch.Tensor, mass: torch.Tensor) -> None:
        """The policy's new timestamps and mass for the slots ids [B, Hkv, S] (empty slots go to scratch)."""
        target, heads = torch.where(ids >= 0, ids, self.scratch), self.heads[None, :, None]
        self.stamp[target, heads] = stamp
        self.mass[target, heads] = mass
