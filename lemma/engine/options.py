"""What an Engine is built from, checked and resolved: device, dtype, pool size, batch limits.

Every bad value is one LemmaError line naming the argument; nothing is allocated before the checks pass.
"""

from __future__ import annotations

import torch

from lemma.engine.pool import PAGE_SIZE
from lemma.engine.sampler import check_number
from lemma.errors import LemmaError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
CPU_KV_BYTES = 1 << 30  # default pool on CPU: 1 GiB
CUDA_KV_FRACTION = 0.85  # default pool on CUDA: this share of the memory free after loading weights


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise LemmaError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if resolved.type not in ("cpu", "cuda"):
        raise LemmaError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise LemmaError(f"device {device!r} asked for, but this machine has no CUDA GPU (use --device cpu)")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise LemmaError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA GPU(s) here")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise LemmaError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_compile(compile: object, device: torch.device, tensor_parallel: object) -> object:
    """compile as given; None (the default) is True on CUDA (CUDA graphs always pay there) without
    tensor parallelism, False elsewhere."""
    if compile is None:
        return device.type == "cuda" and tensor_parallel == 1
    return compile


def check_limits(max_batch: object, prefill_chunk: object, compile: object) -> None:
    check_number("max_batch", max_batch, "an integer >= 1", low=1, integer=True)
    check_number("prefill_chunk", prefill_chunk, f"an integer >= {PAGE_SIZE}", low=PAGE_SIZE, integer=True)
    if not isinstance(compile, (bool, str)):
        raise LemmaError(f"compile must be True, False or a backend name, got {compile!r}")


def pool_pages(kv_cache_tokens: object, page_bytes: int, device: torch.device) -> int:
    """Pages of the KV pool: kv_cache_tokens rounded up to pages, else the device default. A pool that
    cannot fit in the memory there is refused before anything is allocated."""
    if kv_cache_tokens is not None:
        check_number("kv_cache_tokens", kv_cache_tokens, "a positive integer", low=1, integer=True)
        pages = -(-kv_cache_tokens // PAGE_SIZE)
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        pages = max(1, int(free * CUDA_KV_FRACTION) // page_bytes)
    else:
        pages = max(1, CPU_KV_BYTES // page_bytes)
    need, free = (pages + 1) * page_bytes, free_memory(device)
    if free is not None and need > free:
        raise LemmaError(f"kv_cache_tokens={pages * PAGE_SIZE} needs {need / 2**30:.1f} GiB of KV cache but only "
                         f"{free / 2**30:.1f} GiB of memory is free on {device}; lower kv_cache_tokens")
    return pages


def check_step_tables(num_layers: int, max_batch: int, max_slots: int, device: torch.device, policies: int) -> None:
    """The page tables of the decode states of `policies` KV policies ([layers, max_batch, max_slots]
    int64 each, allocated whole) must take at most a quarter of the free memory, or max_batch is refused
    before allocating."""
    row = num_layers * max_slots * 8 * policies
    need, free = max_batch * row, free_memory(device)
    if free is not None and need > free // 4:
        raise LemmaError(f"max_batch={max_batch} needs {need / 2**30:.1f} GiB of page tables for {policies} KV "
                         f"policies ({max_slots} pages x {num_layers} layers a row each) but only {free / 2**30:.1f} "
                         f"GiB of memory is free on {device}; use max_batch <= {max(1, free // 4 // row)} or a "
                         "smaller kv_cache_tokens")


def free_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on the device (on CPU: MemAvailable), or None when unknown."""
    if device.type == "cuda":
        try:
            return torch.cuda.mem_get_info(device)[0]
        except (RuntimeError, AssertionError):
            return None
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
