"""Shared pieces of the GPU benchmark (bench/gpu_bench.py and its gpu_* sections): random-init models of
Qwen2.5 shape, a toy tokenizer, random prompts, and the clocks: wall time of eager calls, device time of
calls captured in one CUDA graph, and device time of an engine's own graph replays while it decodes."""

from __future__ import annotations

import gc
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from lemma.engine.engine import Engine
from lemma.models.config import ModelConfig
from lemma.models.llama import CausalLM
from lemma.models.tokenizer import Tokenizer

SHAPES = {
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "smoke": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
}


def shape_config(shape: str) -> ModelConfig:
    return ModelConfig.from_dict({"model_type": "qwen2", "rope_theta": 1e6, "max_position_embeddings": 40000,
                                  **SHAPES[shape]})


def random_model(shape: str, device: torch.device, dtype: torch.dtype) -> CausalLM:
    with torch.device(device):
        model = CausalLM(shape_config(shape)).to(dtype)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return model.eval().requires_grad_(False)


def toy_tokenizer() -> Tokenizer:
    from tokenizers import Tokenizer as HF
    from tokenizers import models

    folder = Path(tempfile.mkdtemp())
    HF(models.WordLevel({"<unk>": 0, "x": 1}, unk_token="<unk>")).save(str(folder / "tokenizer.json"))
    return Tokenizer(folder)


def random_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """`count` prompts of random token ids, all different (no prefix-cache hits between them)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (count, length), generator=generator).tolist()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def timed(fn: Callable[[], object], device: torch.device, repeats: int = 20) -> float:
    """Median wall seconds of fn() (host launch cost included)."""
    fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return sorted(samples)[len(samples) // 2]


def graphed_seconds(fn: Callable[[], object], calls: int = 20, replays: int = 5) -> float:
    """Device seconds per fn() call: `calls` calls captured in one CUDA graph, replayed, timed with events
    (no host launch cost; repeated calls over data that fits in L2 read it from there)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (Triton compiles, allocator settles) off the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / (replays * calls)


def device_seconds(fn: Callable[[], object], device: torch.device, calls: int = 20) -> float:
    """graphed_seconds on CUDA; on CPU (--smoke) the wall time of 2 calls, only to run the code path."""
    return graphed_seconds(fn, calls) if device.type == "cuda" else timed(fn, device, repeats=2)


@contextmanager
def replay_times(engine: Engine, rows: int) -> Iterator[list[float]]:
    """Device ms of each CUDA-graph replay of a decode step with `rows` real rows while open (events
    around the replay, so the host's bookkeeping between steps is left out), filled in on exit; stays
    empty without CUDA graphs (CPU) and for the steps that capture a graph."""
    times: list[float] = []
    graphs = engine.runner._graphs  # the runner's CudaGraphs (engine/graphs.py), None when not graphing
    if graphs is None:
        yield times
        return
    decode, run = engine.runner.decode, graphs.run
    full = {"now": False}
    events = []

    def spy_decode(groups):
        full["now"] = sum(len(seqs) for _, seqs in groups) == rows
        return decode(groups)

    def spy_run(key, step):
        if not full["now"] or key not in graphs.graphs:
            return run(key, step)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        output = run(key, step)
        end.record()
        events.append((start, end))
        return output

    engine.runner.decode, graphs.run = spy_decode, spy_run
    try:
        yield times
    finally:
        engine.runner.decode, graphs.run = decode, run
        torch.cuda.synchronize()
        times += [start.elapsed_time(end) for start, end in events]


def mean(values: list[float]) -> float | None:
    """Mean without the first value (its caches are cold) where there are more than two; None if empty."""
    kept = values[1:] if len(values) > 2 else values
    return sum(kept) / len(kept) if kept else None
