"""One-row products (batch-1 decode) with quantized weights on CPU: each form streams SmolLM2-135M's 30
layers of projection weights (random), side by side in one run, against the copy bandwidth of this run.

    fp32 / bf16 reduction      multiply + sum under compile (models/linear.py `project`)
    int8 aten                  torch.ops.aten._weight_int8pack_mm (per-row scales), eager and compiled
    int8 reduction             int8 weight, scales per row or per group, dequantized inside the reduction
    int4 aten gG               torch.ops.aten._weight_int4pack_mm_for_cpu, group G, eager and compiled
    int4 reduction gG          two 4-bit values per byte (GGUF's nibble order), scale and offset per group
    int8 / int4 lemma gG       lemma::int8_linear / lemma::int4_linear (kernels/quant_cpu.cpp), fp16 scales

    OMP_NUM_THREADS=2 python bench/quant_products.py [--rows 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from row_products import LAYERS, SHAPES, best_seconds, layer

OPTIONS = {"cpp_wrapper": True, "realize_reads_threshold": 1}


def row_float(x, w):
    return (x[:, None, :].float() * w[None].float()).sum(-1).to(x.dtype)


def int8_rows(w: torch.Tensor):
    scale = w.abs().amax(1).clamp(min=1e-8) / 127
    return (w / scale[:, None]).round().to(torch.int8), scale


def int8_groups(w: torch.Tensor, group: int):
    n, k = w.shape
    blocks = w.view(n, k // group, group)
    scale = blocks.abs().amax(-1).clamp(min=1e-8) / 127
    return (blocks / scale[..., None]).round().to(torch.int8).view(n, k), scale


def int4_groups(w: torch.Tensor, group: int):
    """-> (uint8 [N, K/2]: byte j of a group holds value j low and j + group/2 high, scale, offset [N, K/group])"""
    n, k = w.shape
    blocks = w.view(n, k // group, group)
    low, high = blocks.amin(-1), blocks.amax(-1)
    scale = ((high - low) / 15).clamp(min=1e-8)
    q = ((blocks - low[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8)
    packed = q[..., : group // 2] | (q[..., group // 2:] << 4)
    return packed.reshape(n, k // 2), scale, low


def lemma_int8(w: torch.Tensor, group: int):
    q, scale = int8_groups(w, group)
    return q, scale.half().contiguous(), group


def lemma_int4(w: torch.Tensor, group: int):
    packed, scale, low = int4_groups(w, group)
    return packed, scale.half().contiguous(), low.half().contiguous(), group


def row_int8(x, w, s):
    return ((x[:, None, :].float() * w[None].float()).sum(-1) * s).to(x.dtype)


def row_int8_groups(x, w, s):
    n, k = w.shape
    groups = s.shape[1]
    xs = x.float().view(x.shape[0], 1, groups, k // groups)
    partial = (xs * w.view(1, n, groups, k // groups).float()).sum(-1)
    return (partial * s[None]).sum(-1).to(x.dtype)


def row_int4_groups(x, w, s, m):
    n, half = w.shape
    groups = s.shape[1]
    g = 2 * half // groups
    pairs = w.view(n, groups, g // 2)
    values = torch.cat((pairs & 15, pairs >> 4), dim=-1).float()  # [N, G, g]
    xs = x.float().view(x.shape[0], 1, groups, g)
    dots = (xs * values[None]).sum(-1)
    sums = xs.sum(-1)
    return (dots * s[None] + sums * m[None]).sum(-1).to(x.dtype)


def aten_int4(w: torch.Tensor, group: int, dtype):
    n, k = w.shape
    blocks = w.view(n, k // group, group)
    low, high = blocks.amin(-1), blocks.amax(-1)
    scale = ((high - low) / 15).clamp(min=1e-8)
    q = ((blocks - low[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).view(n, k)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    zero = low + 8 * scale  # aten dequantizes (q - 8) * scale + zero
    scales_zeros = torch.stack((scale.t(), zero.t()), dim=-1).contiguous().to(dtype)  # [K/group, N, 2]
    return packed, scales_zeros


def fits(shapes, group: int) -> bool:
    return all(i % group == 0 for _, i in shapes)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--all", action="store_true", help="also torch's and inductor's int8/int4 forms (slow here)")
    args = parser.parse_args()
    from lemma.kernels import quant

    quant.load_cpu_kernel()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rows} row(s)")
    big, into = torch.ones(256 * 2**20, dtype=torch.uint8), torch.zeros(256 * 2**20, dtype=torch.uint8)
    copy = min((lambda s: (into.copy_(big), time.perf_counter() - s)[1])(time.perf_counter()) for _ in range(5))
    print(f"copy bandwidth: {2 * big.nbytes / copy / 1e9:.1f} GB/s (read + write of 256 MiB)")
    torch.manual_seed(0)
    floats = [[torch.randn(576), torch.randn(576)] + [torch.randn(o, i) * 0.02 for o, i in SHAPES] for _ in range(LAYERS)]

    def compiled(fn):
        return torch.compile(fn, dynamic=False, options=OPTIONS)

    def run(name, product, layers, x, eager=False):
        nbytes = sum(t.nbytes for weights in layers for w in weights[2:] for t in (w if isinstance(w, tuple) else (w,))
                     if isinstance(t, torch.Tensor))
        torch._dynamo.reset()
        fn = (lambda x, *w: layer(product, x, *w))
        seconds = best_seconds(fn if eager else compiled(fn), layers, x)
        print(f"{name:26s} {seconds * 1e3:6.2f} ms  {nbytes / 2**20:6.1f} MiB  {nbytes / seconds / 1e9:5.1f} GB/s")

    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(args.rows, 576, dtype=dtype)
        tag = str(dtype)[6:]
        plain = [[t.to(dtype) for t in weights] for weights in floats]
        run(f"{tag} reduction", row_float, plain, x)
        norms = lambda weights: [t.to(dtype) for t in weights[:2]]  # noqa: E731
        for group in (32, 64, 576):
            g8 = [norms(ws) + [lemma_int8(w, group if group < 576 else w.shape[1]) for w in ws[2:]] for ws in floats]
            run(f"{tag} int8 lemma g{group if group < 576 else 'row'}", lambda h, w: quant.int8_linear(h, *w), g8, x)
        for group in (32, 64, 128):
            if fits(SHAPES, group):
                g4 = [norms(ws) + [lemma_int4(w, group) for w in ws[2:]] for ws in floats]
                run(f"{tag} int4 lemma g{group}", lambda h, w: quant.int4_linear(h, *w), g4, x)
        if not args.all:
            continue
        rows8 = [norms(ws) + [tuple(t.to(dtype) if t.is_floating_point() else t for t in int8_rows(w)) for w in ws[2:]] for ws in floats]
        int8mm = lambda h, w: torch.ops.aten._weight_int8pack_mm(h, w[0], w[1])  # noqa: E731
        run(f"{tag} int8 aten (eager)", int8mm, rows8, x, eager=True)
        run(f"{tag} int8 reduction rows", lambda h, w: row_int8(h, *w), rows8, x)
        g8 = [norms(ws) + [int8_groups(w, 32) for w in ws[2:]] for ws in floats]
        run(f"{tag} int8 reduction g32", lambda h, w: row_int8_groups(h, *w), g8, x)
        g4 = [norms(ws) + [int4_groups(w, 32) for w in ws[2:]] for ws in floats]
        run(f"{tag} int4 reduction g32", lambda h, w: row_int4_groups(h, *w), g4, x)
        a4 = [norms(ws) + [aten_int4(w, 32, dtype) for w in ws[2:]] for ws in floats]
        mm4 = lambda h, w: torch.ops.aten._weight_int4pack_mm_for_cpu(h, w[0], 32, w[1])  # noqa: E731
        run(f"{tag} int4 aten g32 (eager)", mm4, a4, x, eager=True)

if __name__ == "__main__":
    main()
