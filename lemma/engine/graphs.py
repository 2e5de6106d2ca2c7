"""CUDA graphs for the decode step: one graph per mix of row slices (each a policy and its batch bucket),
captured on the mix's first step (or at warm-up) and replayed after, all in one shared memory pool (as
compact engines do).

The step reads only the persistent DecodeState buffers and the pool, which are allocated once and never
move, so a replay sees the new step's data.
The first step of a bucket runs for real (it is also the warm-up that compiles or autotunes); the
capture that follows records without executing, so no step is applied twice.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch


class CudaGraphs:
    def __init__(self):
        self.graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.memory_pool = None

    def forget(self, drop: Callable[[Hashable], bool]) -> None:
        """Drop the graphs whose key `drop` names."""
        for key in [k for k in self.graphs if drop(k)]:
            del self.graphs[key]

    def run(self, key: Hashable, step: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The step's output: replayed from the bucket's graph, or computed and then captured."""
        if key in self.graphs:
            graph, output = self.graphs[key]
            graph.replay()
            return output
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            computed = step()  # the real step (and warm-up)
        torch.cuda.current_stream().wait_stream(side)
        computed.record_stream(torch.cuda.current_stream())
        result = computed.clone()
        if self.memory_pool is None:
            self.memory_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.memory_pool):
            output = step()
        self.graphs[key] = (graph, output)
        return result
