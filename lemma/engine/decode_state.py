"""DecodeState: the fixed-size buffers a decode step reads, kept between steps and updated in place.

The decode step sees only views of these buffers with bucketed shapes, so the same compiled graph (or
captured CUDA graph) serves every step of a bucket:

    tokens [B], positions [B]        the token each row feeds and its position
    modes, new_slots [L, B]          what the step does to each (layer, row): CONTINUE, NEW_SLOT, EVICT
    tables [L, B, S]                 page ids per (layer, row, slot), -1 = empty

B is the batch bucket (1, 2, 4, ... up to max_batch), S the slot bucket. Padded rows and empty slots
hold -1, and the step sends their writes to the pool's scratch page. The host keeps a numpy mirror of
every buffer: on CPU the mirror *is* the device buffer; on CUDA changed table entries go to the device
as one non-blocking copy from pinned memory (the whole block only when the batch's membership changed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

CONTINUE, NEW_SLOT, EVICT = 0, 1, 2  # what a decode step does to each (layer, sequence)
MIN_SLOTS = 4


def batch_bucket(n: int, max_batch: int) -> int:
    """Smallest power of two >= n, or max_batch when that is smaller."""
    return min(1 << max(n - 1, 0).bit_length(), max_batch)


def slot_bucket(pages: int, evicting_capacity: int | None = None) -> int:
    """Slots for a step whose sequences hold at most `pages` pages in a layer: an evicting policy's
    capacity while it holds, else the next of 4, 6, 8, 12, 16, 24, 32, ... (at most 1.5x padding)."""
    if evicting_capacity is not None and pages <= evicting_capacity:
        return evicting_capacity
    size = MIN_SLOTS
    while size < pages:
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
    return size


@dataclass
class StepInputs:
    """One decode step's inputs: views of the DecodeState buffers with the bucket's shapes."""

    tokens: torch.Tensor  # [B]
    positions: torch.Tensor  # [B]
    modes: torch.Tensor  # [L, B]
    new_slots: torch.Tensor  # [L, B]
    tables: torch.Tensor  # [L, B, S]

    @property
    def bucket(self) -> tuple[int, int]:
        return self.tables.shape[1], self.tables.shape[2]


class DecodeState:
    def __init__(self, num_layers: int, max_batch: int, device: torch.device):
        self.num_layers, self.max_batch, self.device = num_layers, max_batch, device
        self.on_host = device.type == "cpu"
        # rows 0 and 1: tokens and positions; then L rows of modes and L rows of new slots
        self._inputs_np, self.inputs = self._buffer((2 + 2 * num_layers, max_batch), 0)
        self._tables_np, self.tables = self._buffer((num_layers, max_batch, MIN_SLOTS), -1)
        self.rows: list[int] = []  # sequence uid of each row, in order
        self.generation = 0  # bumped when buffers are reallocated (captured graphs must be dropped)
        self._dirty: list[np.ndarray] = []  # flat indices of changed table entries (CUDA only)
        self._all_dirty = False

    def _buffer(self, shape: tuple[int, ...], fill: int) -> tuple[np.ndarray, torch.Tensor]:
        host = np.full(shape, fill, dtype=np.int64)
        return host, torch.from_numpy(host) if self.on_host else torch.from_numpy(host).to(self.device)

    # ---- membership and pages (host bookkeeping between steps) ---------------------------------------
    def set_rows(self, uids: list[int], page_lists: list[list[list[int]]], most_pages: int = 1) -> None:
        """Make row i hold sequence uids[i] (page_lists[i][layer] = its pages); rows that kept their
        sequence keep their entries, rows of new or moved sequences are rewritten. The tables grow to
        hold `most_pages` slots (the most any of these sequences may hold)."""
        if uids == self.rows:
            return
        old = {uid: row for row, uid in enumerate(self.rows)}
        self.ensure_slots(max([most_pages] + [len(p) for pages in page_lists for p in pages]))
        moved = self._tables_np[:, [old.get(uid, 0) for uid in uids]]  # a copy of the rows that stay
        for row, (uid, pages) in enumerate(zip(uids, page_lists)):
            if uid not in old:
                moved[:, row] = -1
                for layer, layer_pages in enumerate(pages):
                    moved[layer, row, : len(layer_pages)] = layer_pages
        self._tables_np[:, : len(uids)] = moved
        self._tables_np[:, len(uids):] = -1
        self.rows = list(uids)
        self._all_dirty = True

    def set_page(self, layer: int, row: int, slot: int, page: int) -> None:
        self.ensure_slots(slot + 1)
        self._tables_np[layer, row, slot] = page
        if not self.on_host:
            self._dirty.append(np.ravel_multi_index((layer, row, slot), self._tables_np.shape))

    def ensure_slots(self, slots: int) -> None:
        """Grow the tables (to the next slot bucket) when a sequence holds more pages than they have."""
        have = self._tables_np.shape[2]
        if slots <= have:
            return
        self._flush_tables()
        host, device = self._buffer((self.num_layers, self.max_batch, slot_bucket(slots)), -1)
        host[:, :, :have] = self._tables_np
        self._tables_np, self.tables = host, (device if self.on_host else torch.from_numpy(host).to(self.device))
        self.generation += 1

    # ---- one step ------------------------------------------------------------------------------------
    def step_inputs(self, tokens: list[int], positions: list[int], modes: np.ndarray, new_slots: np.ndarray,
                    slots: int) -> StepInputs:
        """Write this step's per-row inputs (modes/new_slots [L, n]) and return the bucket's views."""
        n = len(tokens)
        batch = batch_bucket(n, self.max_batch)
        self.ensure_slots(slots)
        inputs = self._inputs_np
        inputs[:, :batch] = 0  # padded rows: token 0 at position 0, CONTINUE into the scratch page
        inputs[0, :n], inputs[1, :n] = tokens, positions
        inputs[2 : 2 + self.num_layers, :n], inputs[2 + self.num_layers :, :n] = modes, new_slots
        if not self.on_host:
            staged = torch.from_numpy(inputs[:, :batch].copy()).pin_memory()
            self.inputs[:, :batch].copy_(staged, non_blocking=True)
        self._flush_tables()
        layers = self.num_layers
        return StepInputs(self.inputs[0, :batch], self.inputs[1, :batch], self.inputs[2 : 2 + layers, :batch],
                          self.inputs[2 + layers :, :batch], self.tables[:, :batch, :slots])

    def _flush_tables(self) -> None:
        if self.on_host:
            return
        if self._all_dirty:
            staged = torch.from_numpy(self._tables_np.copy()).pin_memory()
            self.tables.copy_(staged, non_blocking=True)
        elif self._dirty:
            index = np.asarray(self._dirty, dtype=np.int64)
            staged = torch.from_numpy(np.stack([index, self._tables_np.reshape(-1)[index]])).pin_memory()
            entries = staged.to(self.device, non_blocking=True)
            self.tables.view(-1).index_copy_(0, entries[0], entries[1])
        self._dirty, self._all_dirty = [], False
