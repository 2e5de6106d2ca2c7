"""What one call of a compiled layer costs on the host, by way of calling it (CPU).

The compiled CPU decode step calls one compiled layer graph per decoder layer (engine/compiled.py), and
each call pays dynamo's guard check and AOTAutograd's runtime wrapper around inductor's C++ entry
(~130 µs per call in the compile-once profile, ~4 ms of a 20 ms SmolLM2 step). This measures the same
small function (12 chained [1, 64] linears and an in-place KV-style `index_copy_` into a pool input)
called four ways, side by side in one process:

- eager;
- `torch.compile(fullgraph=True, cpp_wrapper=True)` (what the engine does today);
- AOTInductor (`torch.export` + `aoti_compile_and_package`), through the loaded package's Python runner;
- the same package through its C++ loader directly (`runner.loader.run(flat_inputs)`, no pytree).

The function's own arithmetic is tiny, so the differences are per-call overhead. It also checks that the
AOTInductor package writes the mutated pool input in place (as the decode layer's KV write needs).

    OMP_NUM_THREADS=1 python bench/call_overhead.py [--calls 2000]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch


def chain(x: torch.Tensor, weights: list[torch.Tensor], pool: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    for weight in weights:
        x = torch.nn.functional.linear(x, weight).relu()
    pool.index_copy_(0, index, x)
    return x


class Chain(torch.nn.Module):
    def forward(self, x, weights, pool, index):  # torch.export takes modules only
        return chain(x, weights, pool, index)


def microseconds_per_call(fn: Callable[[], object], calls: int) -> float:
    for _ in range(50):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return 1e6 * (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    torch.manual_seed(0)
    x, pool, index = torch.randn(1, 64), torch.zeros(100, 64), torch.tensor([3])
    weights = [torch.randn(64, 64) / 8 for _ in range(12)]
    inputs = (x, weights, pool, index)

    compiled = torch.compile(chain, fullgraph=True, options={"cpp_wrapper": True})
    start = time.perf_counter()
    program = torch.export.export(Chain(), inputs)
    package = torch._inductor.aoti_compile_and_package(program, package_path=str(Path(tempfile.mkdtemp()) / "chain.pt2"))
    print(f"AOTInductor export + compile: {time.perf_counter() - start:.1f} s")
    runner = torch._inductor.aoti_load_package(package)
    flat = [x, *weights, pool, index]

    pool.zero_()
    out = runner(*inputs)
    assert torch.equal(pool[3], out[0]) and bool(pool[3].any()), "the AOTInductor package did not write the pool in place"
    assert torch.allclose(out, chain(*inputs), atol=1e-5)

    ways = {"eager": lambda: chain(*inputs), "torch.compile (cpp_wrapper)": lambda: compiled(*inputs),
            "AOTInductor runner": lambda: runner(*inputs), "AOTInductor loader.run": lambda: runner.loader.run(flat)}
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    for name, fn in ways.items():
        print(f"{name:30s} {microseconds_per_call(fn, args.calls):7.1f} µs/call")


if __name__ == "__main__":
    main()
