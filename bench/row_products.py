"""One-row products (batch-1 decode) on CPU: how fast each form streams a whole model's projection
weights, SmolLM2-135M's 30 layers of shapes with random weights, side by side in one run.

Each layer is the RMSNorm, q/k/v/o, the RMSNorm again and the MLP, with its products as:

    aten                        F.linear (MKL sgemv for fp32, oneDNN for bf16), eager
    reduction + norm            multiply + sum (models/linear.py `project` under compile), inductor's
                                default options (it recomputes the norm for every output row)
    reduction + norm + realize  the same with realize_reads_threshold=1 (engine/compiled.py `cpu_options`)

    OMP_NUM_THREADS=2 python bench/row_products.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # q k v o gate up down
LAYERS = 30


def row(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x[:, None, :].float() * w[None].float()).sum(-1).to(x.dtype)


def norm(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * g.float()).to(x.dtype)


def layer(product, x, n1, n2, q, k, v, o, g, u, d):
    h = norm(x, n1)
    x = x + product(h, q) + product(h, o) + product(h, k).sum() + product(h, v).sum()
    h = norm(x, n2)
    return x + product(F.silu(product(h, g)) * product(h, u), d)


def best_seconds(fn, layers, x, rounds: int = 5) -> float:
    for weights in layers:
        fn(x, *weights)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for weights in layers:
            fn(x, *weights)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for dtype in (torch.float32, torch.bfloat16):
        layers = [[torch.randn(576, dtype=dtype), torch.randn(576, dtype=dtype)]
                  + [torch.randn(o, i, dtype=dtype) for o, i in SHAPES] for _ in range(LAYERS)]
        weight_bytes = sum(w.nbytes for weights in layers for w in weights[2:])
        x = torch.randn(1, 576, dtype=dtype)
        forms = {
            "aten": lambda x, *w: layer(F.linear, x, *w),
            "reduction + norm": torch.compile(lambda x, *w: layer(row, x, *w), dynamic=False,
                                              options={"cpp_wrapper": True}),
            "reduction + norm + realize": torch.compile(lambda x, *w: layer(row, x, *w), dynamic=False,
                                                        options={"cpp_wrapper": True, "realize_reads_threshold": 1}),
        }
        for name, fn in forms.items():
            seconds = best_seconds(fn, layers, x)
            print(f"{str(dtype)[6:]:9s} {name:28s} {seconds * 1e3:6.2f} ms  {weight_bytes / seconds / 1e9:5.1f} GB/s")


if __name__ == "__main__":
    main()
