"""CUDA graphs for the decode step: one graph per (policy, batch bucket, slot bucket), captured on the
bucket's first step and replayed after, all in one shared memory pool (as compact engines do).

The step reads only the persistent DecodeState buffers and the pool, whose addresses do not change
within a buffer generation (the generation is part of the key), so a replay sees the new step's data.
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
        self.generation = -1

    def run(self, key: Hashable, generation: int, step: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The step's output: replayed from the bucket's graph, or computed and then captured. Graphs of
        an older buffer generation read freed buffers and are dropped."""
        if generation != self.generation:
            self.graphs.clear()
            self.memory_pool = None  # the old pool may still hold a live output: start a new one
            self.generation = generation
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
