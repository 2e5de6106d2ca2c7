"""Shard: which slice of the model one tensor-parallel rank holds, and the collectives that join them.

Attention is split by heads (query heads and, with them, their KV heads), the MLP by its intermediate
size, embedding and lm_head by vocabulary rows. A layer's attention and MLP each end in one all-reduce
(their output projections are row-parallel); the embedding lookup is masked per rank and all-reduced;
logits are gathered. The model holds a Shard only to call these; it knows nothing of processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Shard:
    rank: int
    world: int

    def part(self, n: int) -> tuple[int, int]:
        """[start, stop) of this rank's share of n items (the last ranks get one fewer when n % world)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)

    def size(self, n: int) -> int:
        start, stop = self.part(n)
        return stop - start

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x)
        return x

    def gather(self, x: torch.Tensor, total: int) -> torch.Tensor:
        """Concatenate every rank's x along the last dim (ranks hold `part(total)` columns each)."""
        sizes = [Shard(r, self.world).size(total) for r in range(self.world)]
        parts = [x.new_empty(*x.shape[:-1], size) for size in sizes]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)
