"""DecodeState: the fixed-size buffers a decode step reads, kept between steps and updated in place.

    tokens [B], positions [B]        the token each row feeds and its position
    modes, new_slots [L, B]          what the step does to each (layer, row): CONTINUE, NEW_SLOT, EVICT
    tables [L, B, S]                 page ids per (layer, row, slot), -1 = empty

The buffers are allocated once, at full size (max_batch rows, `max_slots` slots: on CUDA the most
pages a sequence under the state's policy can hold, ModelRunner.table_width), and never reallocated,
so nothing a compiled graph or a captured CUDA graph read moves. A step sees views: B is the batch
bucket (1, 2, 4, ... up to max_batch); S is the full width on CUDA (one captured graph per batch
bucket; the Triton kernel still walks only the pages a row lists) and the pages actually held on CPU
(the compiled step's slot dimension is dynamic, engine/compiled.py). Padded rows and empty slots hold -1, and the step sends their writes to the pool's scratch page. The host keeps a numpy
mirror of every buffer: on CPU the mirror *is* the device buffer; on CUDA changed table entries go to
the device as one non-blocking copy from pinned memory. When the batch's membership changes, the rows
that stay move on the device (one gather) and only the rows of new sequences cross from the host, so a
sequence leaving a Dense batch of 64 costs a device copy, not the whole [L, B, S] block over PCIe.
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


@dataclass
class StepInputs:
    """One decode step's inputs: views of the DecodeState buffers with the bucket's shapes."""

    tokens: torch.Tensor  # [B]
    positions: torch.Tensor  # [B]
    modes: torch.Tensor  # [L, B]
    new_slots: torch.Tensor  # [L, B]
    tables: torch.Tensor  # [L, B, S]

    @property
    def batch(self) -> int:
        """The batch bucket: rows of the step, padded ones included."""
        return self.tables.shape[1]

    @property
    def bucket(self) -> tuple[int, int]:
        """(batch bucket, slots): the step's shape."""
        return self.tables.shape[1], self.tables.shape[2]


class DecodeState:
    def __init__(self, num_layers: int, max_batch: int, max_slots: int, device: torch.device,
                 mirrored: bool | None = None):
        """mirrored: keep the device buffers apart from the host mirror and sync them before each step
        (default: on any device but the CPU; a CPU test can ask for it to check the sync)."""
        self.num_layers, self.max_batch, self.max_slots, self.device = num_layers, max_batch, max_slots, device
        self.on_host = device.type == "cpu" if mirrored is None else not mirrored
        # rows 0 and 1: tokens and positions; then L rows of modes and L rows of new slots
        self._inputs_np, self.inputs = self._buffer((2 + 2 * num_layers, max_batch), 0)
        self._tables_np, self.tables = self._buffer((num_layers, max_batch, max_slots), -1)
        self.rows: list[int] = []  # sequence uid of each row, in order
        # device side (mirrored only): since the last sync, which device row holds each row's entries
        # (-1: only the host has them; None: every row is where it was), how many leading device rows
        # may hold entries, and changed entries (flat indices)
        self._device_rows: list[int] | None = None
        self._device_used = 0
        self._dirty: list[int] = []

    def _buffer(self, shape: tuple[int, ...], fill: int) -> tuple[np.ndarray, torch.Tensor]:
        host = np.full(shape, fill, dtype=np.int64)
        with torch.inference_mode():  # the step runs in inference mode; a compiled one guards on it
            return host, torch.from_numpy(host) if self.on_host else torch.from_numpy(host.copy()).to(self.device)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        """A non-blocking copy of `array` on the device, staged in pinned memory where there is one."""
        staged = torch.from_numpy(np.ascontiguousarray(array))
        if self.device.type == "cuda":
            staged = staged.pin_memory()
        return staged.to(self.device, non_blocking=True)

    # ---- membership and pages (host bookkeeping between steps) ---------------------------------------
    def set_rows(self, uids: list[int], page_lists: list[list[list[int]]]) -> None:
        """Make row i hold sequence uids[i] (page_lists[i][layer] = its pages); rows that kept their
        sequence keep their entries, rows of new or moved sequences are rewritten."""
        if uids == self.rows:
            return
        old = {uid: row for row, uid in enumerate(self.rows)}
        moved = self._tables_np[:, [old.get(uid, 0) for uid in uids]]  # a copy of the rows that stay
        for row, (uid, pages) in enumerate(zip(uids, page_lists)):
            if uid not in old:
                moved[:, row] = -1
                for layer, layer_pages in enumerate(pages):
                    moved[layer, row, : len(layer_pages)] = layer_pages
        self._tables_np[:, : len(uids)] = moved
        self._tables_np[:, len(uids):] = -1
        if not self.on_host:
            # entries changed since the last sync are numbered by the old rows: those rows come from the host
            stale = set(np.unravel_index(np.asarray(self._dirty, dtype=np.int64), self._tables_np.shape)[1].tolist())
            where = range(len(self.rows)) if self._device_rows is None else self._device_rows
            self._device_rows = [where[old[uid]] if uid in old and old[uid] not in stale else -1 for uid in uids]
            self._dirty = []
        self.rows = list(uids)

    def set_page(self, layer: int, row: int, slot: int, page: int) -> None:
        self._tables_np[layer, row, slot] = page
        if not self.on_host:
            self._dirty.append(int(np.ravel_multi_index((layer, row, slot), self._tables_np.shape)))

    # ---- one step ------------------------------------------------------------------------------------
    def step_inputs(self, tokens: list[int], positions: list[int], modes: np.ndarray, new_slots: np.ndarray,
                    slots: int, least_rows: int = 1) -> StepInputs:
        """Write this step's per-row inputs (modes/new_slots [L, n]) and return the views of the bucket
        holding max(n, least_rows) rows, `slots` wide on CPU (at least MIN_SLOTS) and full width on CUDA."""
        n = len(tokens)
        batch = batch_bucket(max(n, least_rows), self.max_batch)
        slots = min(max(slots, MIN_SLOTS), self.max_slots) if self.on_host else self.max_slots
        inputs = self._inputs_np
        inputs[:, :batch] = 0  # padded rows: token 0 at position 0, CONTINUE into the scratch page
        inputs[0, :n], inputs[1, :n] = tokens, positions
        inputs[2 : 2 + self.num_layers, :n], inputs[2 + self.num_layers :, :n] = modes, new_slots
        if not self.on_host:
            self.inputs[:, :batch].copy_(self._to_device(inputs[:, :batch]), non_blocking=True)
        self._flush_tables()
        layers = self.num_layers
        return StepInputs(self.inputs[0, :batch], self.inputs[1, :batch], self.inputs[2 : 2 + layers, :batch],
                          self.inputs[2 + layers :, :batch], self.tables[:, :batch, :slots])

    def _flush_tables(self) -> None:
        """Bring the device tables up to the host mirror: rows that stayed move on the device, new rows
        and changed entries cross from the host, rows left behind are cleared."""
        if self.on_host:
            return
        rows, tables = len(self.rows), self.tables
        if self._device_rows is not None:
            moves = [(row, source) for row, source in enumerate(self._device_rows) if source not in (-1, row)]
            if moves:
                to_rows, from_rows = self._to_device(np.asarray(moves, dtype=np.int64).T)
                tables[:, to_rows] = tables[:, from_rows]  # the source rows are gathered before any is written
            fresh = [row for row, source in enumerate(self._device_rows) if source == -1]
            if fresh:
                tables[:, self._to_device(np.asarray(fresh))] = self._to_device(self._tables_np[:, fresh])
        if self._device_used > rows:
            tables[:, rows : self._device_used] = -1
        self._device_rows, self._device_used = None, rows
        if self._dirty:
            index = np.asarray(self._dirty, dtype=np.int64)
            entries = self._to_device(np.stack([index, self._tables_np.reshape(-1)[index]]))
            tables.view(-1).index_copy_(0, entries[0], entries[1])
        self._dirty = []
