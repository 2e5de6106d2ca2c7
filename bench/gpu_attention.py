"""GPU benchmark section `attention`: the Triton paged decode attention (kernels/attention.py, Dense page
table) against torch SDPA (and flash-attn's kernel where the package is installed) over the same K/V,
per batch and context: device time per call from CUDA events over a graph of many calls, the KV GB/s
that reaches, Triton's speed relative to SDPA, and a sweep of the tile size (pages per block).

Pages are a random permutation of the pool (as after churn); SDPA reads the same K/V gathered into a
dense [B, Hkv, T, D] cache. Where one call's K/V would fit in L2, the graph cycles through enough copies
(ROTATION_BYTES in all) that every call reads from HBM, as each layer of a real step does.

`held_in_wide_table`: a row holding `held` tokens in a table as wide as the longest context (a captured
step's table is its policy's full width): the kernel told how many pages each row lists against the
same call walking every slot, the cost a graphed step paid for a short context before `listed`."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from gpu_common import device_seconds, shape_config, timed
from lemma.kernels import attention as triton_attention
from lemma.kernels import reference

PAGE = 16
ROTATION_BYTES = 256 << 20  # 5x the 50 MB L2 of an H100/H200
MAX_COPIES = 64
TILE_SWEEP = (1, 2, 4, 8)  # pages per block (the default is triton_attention.PAGES_PER_BLOCK)


def _flash_attn() -> Callable | None:
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


class KVCopies:
    """`copies` independent K/V sets of one (batch, context): the paged pool with its page table, and the
    same K/V as a dense cache for SDPA; `next()` hands them out in turn."""

    def __init__(self, batch: int, context: int, kv_heads: int, dim: int, copies: int, device: torch.device,
                 dtype: torch.dtype, flash: bool):
        pages = -(-context // PAGE)
        self.sets = []
        for _ in range(copies):
            k = torch.randn(batch * pages, kv_heads, PAGE, dim, device=device, dtype=dtype)
            v = torch.randn_like(k)
            rows = torch.randperm(batch * pages, device=device).view(batch, pages)
            ids = rows[:, None, :].expand(-1, kv_heads, -1).contiguous()  # every head of a row: one table
            dense_k, dense_v = (c[rows].permute(0, 2, 1, 3, 4).reshape(batch, kv_heads, pages * PAGE, dim)
                                for c in (k, v))
            flash_kv = (dense_k.transpose(1, 2).contiguous(), dense_v.transpose(1, 2).contiguous()) if flash else None
            self.sets.append((k, v, ids, torch.full_like(ids, PAGE), dense_k, dense_v, flash_kv))
        self.turn = 0

    def next(self) -> tuple:
        chosen = self.sets[self.turn % len(self.sets)]
        self.turn += 1
        return chosen


def kernel_vs_sdpa(shape: str, batch: int, context: int, device: torch.device, dtype: torch.dtype,
                   tile_sweep: bool, repeats: int) -> dict:
    config = shape_config(shape)
    hkv, hq, d = config.num_kv_heads, config.num_heads, config.head_dim
    kv_bytes = 2 * batch * -(-context // PAGE) * PAGE * hkv * d * torch.finfo(dtype).bits // 8
    copies = min(MAX_COPIES, -(-ROTATION_BYTES // kv_bytes)) if device.type == "cuda" else 1
    flash = _flash_attn() if device.type == "cuda" else None
    kv = KVCopies(batch, context, hkv, d, copies, device, dtype, flash is not None)
    q = torch.randn(batch, hq, d, device=device, dtype=dtype)
    scale = d ** -0.5

    def ours(pages_per_block: int = triton_attention.PAGES_PER_BLOCK) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            k, v, ids, fill = kv.next()[:4]
            return triton_attention.paged_decode_attention(q, k, v, ids, fill, scale, pages_per_block=pages_per_block)
        return call

    def sdpa() -> torch.Tensor:
        dense_k, dense_v = kv.next()[4:6]
        return F.scaled_dot_product_attention(q[:, :, None, :], dense_k, dense_v, scale=scale, enable_gqa=True)

    def flash_call() -> torch.Tensor:
        flash_k, flash_v = kv.next()[6]
        return flash(q[:, None], flash_k, flash_v, softmax_scale=scale)

    k, v, ids, fill = kv.sets[0][:4]
    few = slice(0, 2)  # the twin gathers in fp32: two rows are enough to check the kernel
    out = triton_attention.paged_decode_attention(q[few], k, v, ids[few], fill[few], scale)
    ref = reference.paged_decode_attention(q[few], k, v, ids[few], fill[few], scale)
    calls = max(20, copies)
    row = {"batch": batch, "context": context, "kv_bytes_per_call": kv_bytes, "kv_copies_cycled": copies,
           "rel_err_vs_twin": ((out.float() - ref.float()).norm() / ref.float().norm()).item(),
           "triton_eager_us": 1e6 * timed(ours(), device, repeats), "sdpa_eager_us": 1e6 * timed(sdpa, device, repeats),
           "triton_device_us": 1e6 * device_seconds(ours(), device, calls),
           "sdpa_device_us": 1e6 * device_seconds(sdpa, device, calls)}
    row["triton_kv_gb_per_s"] = kv_bytes / row["triton_device_us"] / 1e3
    row["sdpa_kv_gb_per_s"] = kv_bytes / row["sdpa_device_us"] / 1e3
    row["triton_speed_vs_sdpa"] = row["sdpa_device_us"] / row["triton_device_us"]  # > 1: Triton is faster
    if flash is not None:
        try:
            row["flash_attn_device_us"] = 1e6 * device_seconds(flash_call, device, calls)
            row["triton_speed_vs_flash_attn"] = row["flash_attn_device_us"] / row["triton_device_us"]
        except Exception as exc:  # noqa: BLE001 - an optional peer; its failure must not cost the run
            row["flash_attn_error"] = f"{type(exc).__name__}: {exc}"[:200]
    if tile_sweep:
        row["triton_device_us_by_pages_per_block"] = {
            per_block: 1e6 * device_seconds(ours(per_block), device, calls) for per_block in TILE_SWEEP}
    return row


def held_in_wide_table(shape: str, batch: int, held: int, width: int, device: torch.device,
                       dtype: torch.dtype) -> dict:
    """Device time of one call over `held` tokens a row in a `width`-token table, with and without `listed`."""
    config = shape_config(shape)
    hkv, hq, d = config.num_kv_heads, config.num_heads, config.head_dim
    pages, slots = -(-held // PAGE), -(-width // PAGE)
    k = torch.randn(batch * pages, hkv, PAGE, d, device=device, dtype=dtype)
    v = torch.randn_like(k)
    ids = torch.full((batch, hkv, slots), -1, device=device, dtype=torch.int64)
    ids[:, :, :pages] = torch.randperm(batch * pages, device=device).view(batch, 1, pages)
    fill = torch.where(ids >= 0, PAGE, 0)
    listed = torch.full((batch,), pages, device=device, dtype=torch.int64)
    q = torch.randn(batch, hq, d, device=device, dtype=dtype)
    scale = d ** -0.5
    bounded = triton_attention.paged_decode_attention(q, k, v, ids, fill, scale, listed=listed)
    walked = triton_attention.paged_decode_attention(q, k, v, ids, fill, scale)
    row = {"batch": batch, "held": held, "table_width": width,
           "rel_diff_listed_vs_walked": ((bounded.float() - walked.float()).norm() / walked.float().norm()).item(),
           "listed_device_us": 1e6 * device_seconds(
               lambda: triton_attention.paged_decode_attention(q, k, v, ids, fill, scale, listed=listed), device, 20),
           "walked_device_us": 1e6 * device_seconds(
               lambda: triton_attention.paged_decode_attention(q, k, v, ids, fill, scale), device, 20)}
    row["speedup_from_listed"] = row["walked_device_us"] / row["listed_device_us"]
    return row


def run(shapes: list[str], batches: list[int], contexts: list[int], sweep_context: int, device: torch.device,
        dtype: torch.dtype, repeats: int, held: int) -> dict[str, dict[str, list[dict]]]:
    """Every (shape, batch, context) against SDPA, the tile sweep at `sweep_context` for each batch, and
    per batch `held` tokens in a table as wide as the longest context."""
    report = {}
    for shape in shapes:
        rows = []
        for batch in batches:
            for context in contexts:
                row = kernel_vs_sdpa(shape, batch, context, device, dtype, context == sweep_context, repeats)
                rows.append(row)
                target = 1.0 if batch == 1 else 0.9
                flash = f", flash-attn {row['flash_attn_device_us']:.1f} us" if "flash_attn_device_us" in row else ""
                print(f"{shape} attention batch {batch} @{context}: device triton {row['triton_device_us']:.1f} us "
                      f"({row['triton_kv_gb_per_s']:.0f} GB/s of KV), sdpa {row['sdpa_device_us']:.1f} us "
                      f"({row['sdpa_kv_gb_per_s']:.0f} GB/s){flash}; triton speed {row['triton_speed_vs_sdpa']:.2f}x "
                      f"sdpa (target >= {target}); eager call {row['triton_eager_us']:.0f} / {row['sdpa_eager_us']:.0f} us; "
                      f"rel err {row['rel_err_vs_twin']:.1e}", flush=True)
                if "triton_device_us_by_pages_per_block" in row:
                    print(f"{shape} attention batch {batch} @{context}: triton by pages per block: "
                          + ", ".join(f"{k}: {v:.1f} us" for k, v in row["triton_device_us_by_pages_per_block"].items()),
                          flush=True)
        wide = []
        for batch in batches:
            row = held_in_wide_table(shape, batch, held, max(contexts), device, dtype)
            wide.append(row)
            print(f"{shape} attention batch {batch}, {held} held in a {max(contexts)}-token table: device "
                  f"{row['listed_device_us']:.1f} us listed vs {row['walked_device_us']:.1f} us walking every slot "
                  f"({row['speedup_from_listed']:.2f}x); rel diff {row['rel_diff_listed_vs_walked']:.1e}", flush=True)
        report[shape] = {"kernel_vs_sdpa": rows, "held_in_wide_table": wide}
    return report
