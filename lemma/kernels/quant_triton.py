"""Triton weight-only GEMV for CUDA (the CUDA implementations of lemma::int8_linear / lemma::int4_linear,
same layouts as kernels/quant.py; twin: quant.reference_*). One program per (BLOCK_N rows of W, row of x):
it streams its rows of W once per row of x, dequantizes in registers and reduces in fp32, so a decode
step reads each weight byte once per token and a CUDA graph captures the launches. Above GEMV_ROWS rows
of x (prefill) the weight is dequantized once in the compute dtype and multiplied by cuBLAS.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lemma.kernels import quant

GEMV_ROWS = 32
BLOCK_N = 64
BLOCK_K = 128


@triton.jit
def _int8_gemv_kernel(x_ptr, w_ptr, s_ptr, out_ptr, n_rows, n_cols, stride_xm, stride_om,
                      GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    m = tl.program_id(1).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, n_cols, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < n_cols
        ok = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + m * stride_xm + cols, mask=col_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rows64[:, None] * n_cols + cols[None, :], mask=ok, other=0).to(tl.float32)
        s = tl.load(s_ptr + rows64[:, None] * (n_cols // GROUP) + (cols // GROUP)[None, :], mask=ok, other=0.0).to(tl.float32)
        acc += tl.sum(w * s * x[None, :], axis=1)
    tl.store(out_ptr + m * stride_om + rows, acc.to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _int4_gemv_kernel(x_ptr, w_ptr, s_ptr, o_ptr, out_ptr, n_rows, n_cols, stride_xm, stride_om,
                      GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
    """BLOCK_B bytes of each row at a time: byte b of group g holds value b % (GROUP/2) low and that plus
    GROUP/2 high."""
    pid = tl.program_id(0)
    m = tl.program_id(1).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    half_k = n_cols // 2
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for b0 in range(0, half_k, BLOCK_B):
        cols = b0 + tl.arange(0, BLOCK_B)  # byte columns
        col_ok = cols < half_k
        ok = row_ok[:, None] & col_ok[None, :]
        group = cols // (GROUP // 2)
        low_col = group * GROUP + cols % (GROUP // 2)
        x_low = tl.load(x_ptr + m * stride_xm + low_col, mask=col_ok, other=0.0).to(tl.float32)
        x_high = tl.load(x_ptr + m * stride_xm + low_col + GROUP // 2, mask=col_ok, other=0.0).to(tl.float32)
        packed = tl.load(w_ptr + rows64[:, None] * half_k + cols[None, :], mask=ok, other=0).to(tl.int32)
        where = rows64[:, None] * (n_cols // GROUP) + group[None, :]
        s = tl.load(s_ptr + where, mask=ok, other=0.0).to(tl.float32)
        o = tl.load(o_ptr + where, mask=ok, other=0.0).to(tl.float32)
        low = (packed & 15).to(tl.float32) * s + o
        high = (packed >> 4).to(tl.float32) * s + o
        acc += tl.sum(low * x_low[None, :] + high * x_high[None, :], axis=1)
    tl.store(out_ptr + m * stride_om + rows, acc.to(out_ptr.dtype.element_ty), mask=row_ok)


def _rows(x: torch.Tensor, k: int) -> torch.Tensor:
    return x.reshape(-1, k).contiguous()


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    n, k = weight.shape
    rows = _rows(x, k)
    if rows.shape[0] > GEMV_ROWS:
        out = torch.nn.functional.linear(rows, quant.dequantize_int8(weight, scales, group, x.dtype))
    else:
        out = torch.empty(rows.shape[0], n, dtype=x.dtype, device=x.device)
        grid = (triton.cdiv(n, BLOCK_N), rows.shape[0])
        _int8_gemv_kernel[grid](rows, weight, scales, out, n, k, rows.stride(0), out.stride(0),
                                GROUP=group, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return out.view(*x.shape[:-1], n)


def int4_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                group: int) -> torch.Tensor:
    n, half_k = weight.shape
    rows = _rows(x, 2 * half_k)
    if rows.shape[0] > GEMV_ROWS:
        out = torch.nn.functional.linear(rows, quant.dequantize_int4(weight, scales, offsets, group, x.dtype))
    else:
        out = torch.empty(rows.shape[0], n, dtype=x.dtype, device=x.device)
        grid = (triton.cdiv(n, BLOCK_N), rows.shape[0])
        _int4_gemv_kernel[grid](rows, weight, scales, offsets, out, n, 2 * half_k, rows.stride(0), out.stride(0),
                                GROUP=group, BLOCK_N=BLOCK_N, BLOCK_B=BLOCK_K // 2)
    return out.view(*x.shape[:-1], n)
