"""GPU: the Triton int8/int4 GEMV (kernels/quant_triton.py) against a bf16 F.linear over the same shapes,
device time per call from CUDA events over a CUDA graph of many calls, and the weight GB/s each reaches
against a device copy. Shapes: Qwen2.5-7B's projections (q/kv/o, gate/up, down), batch 1 and 8.

    python bench/gpu_quant.py --out bench/results/gpu_quant.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from gpu_common import graphed_seconds

SHAPES = {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584), "down": (3584, 18944)}


def graphed_ms(fn, calls: int = 50) -> float:
    return graphed_seconds(fn, calls) * 1000


def copy_GBps() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / (graphed_ms(lambda: dst.copy_(src), 10) / 1000) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from lemma.kernels import quant
    from lemma.models.quantized import quantize_int4, quantize_int8

    quant.prepare(torch.device("cuda"))
    rows, peak = [], copy_GBps()
    print(f"copy {peak:.0f} GB/s")
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        q8, s8 = quantize_int8(w)
        q4, s4, o4 = quantize_int4(w)
        for batch in (1, 8):
            x = torch.randn(batch, k, device="cuda", dtype=torch.bfloat16)
            forms = {"bf16": (lambda: torch.nn.functional.linear(x, w), w.nbytes),
                     "int8": (lambda: quant.int8_linear(x, q8, s8, 32), q8.nbytes + s8.nbytes),
                     "int4": (lambda: quant.int4_linear(x, q4, s4, o4, 32), q4.nbytes + s4.nbytes + o4.nbytes)}
            for form, (fn, nbytes) in forms.items():
                ms = graphed_ms(fn)
                row = {"shape": name, "n": n, "k": k, "batch": batch, "form": form, "us": ms * 1000,
                       "GBps": nbytes / (ms / 1000) / 1e9, "of_copy": nbytes / (ms / 1000) / 1e9 / peak}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"copy_GBps": peak, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
