"""Decode speed and KV memory per policy at several context lengths, with the achieved memory bandwidth
against a measured copy bandwidth, and optionally the same workload through transformers."""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Any

import torch

from lemma.engine.engine import Engine
from lemma.engine.options import free_memory as free_memory_bytes
from lemma.engine.options import resolve_dtype
from lemma.engine.policies import Policy
from lemma.engine.pool import PAGE_SIZE, KVPool
from lemma.engine.sampler import SamplingParams
from lemma.errors import LemmaError
from lemma.models.config import ModelConfig
from lemma.models.linear import packed_bytes
from lemma.models.quantized import quantized_bytes

FILLER = ("The proof proceeds by induction on n. For the base case we check small values directly; for the "
          "inductive step we assume the statement for n and derive it for n + 1 using the recurrence above. ")


def check_fits(model_dir: Path, context: int, steps: int, device: str | None, dtype: str | None) -> int:
    """The KV cache tokens a bench of `context` + `steps` needs, or LemmaError if the model's positions
    or the free memory cannot hold them (checked before any weights are loaded)."""
    config = ModelConfig.from_dir(model_dir)
    positions = context + steps + 1  # generate() decodes steps + 1 tokens
    if positions > config.max_position_embeddings:
        raise LemmaError(f"--context {context} plus --steps {steps} needs {positions} positions but {model_dir.name} "
                         f"has {config.max_position_embeddings} (max_position_embeddings)")
    tokens = positions + 64
    try:
        torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        return tokens  # a bad --device is the engine's to report
    page_bytes = KVPool.bytes_per_page(config.num_layers, config.num_kv_heads, config.head_dim,
                                       resolve_dtype(dtype, torch_device))
    needed, free = -(-tokens // PAGE_SIZE) * page_bytes, free_memory_bytes(torch_device)
    if free is not None and needed > free:
        raise LemmaError(f"--context {context} plus --steps {steps} needs {_size(needed)} of KV cache but "
                         f"{torch_device} has {_size(free)} free")
    return tokens


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def long_prompt(engine: Engine, tokens: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < tokens:
        ids += engine.tokenizer.encode(FILLER)
    return ids[:tokens]


def copy_bandwidth(device: torch.device, mib: int = 256, repeats: int = 5) -> float:
    """Bytes per second of a device-to-device copy (read + write), the roofline we compare against."""
    src = torch.empty(mib << 20, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * src.numel() * repeats / (time.perf_counter() - start)


def weight_bytes_per_step(engine: Engine) -> int:
    """Bytes of weights one decode step reads: all of them, except that the embedding is a lookup where
    an output head of its own (untied, or a packed or quantized copy of the tied one) is read instead."""
    model = engine.model
    total = sum(p.numel() * p.element_size() for p in model.parameters()) + packed_bytes(model) + quantized_bytes(model)
    if model.lm_head is not None or model.tied_head is not None:
        emb = model.model.embed_tokens.weight
        total -= emb.numel() * emb.element_size()
    return total


def kv_bytes_per_step(engine: Engine, policy: Policy, context: int) -> int:
    """K/V (and page-bound) bytes one decode step reads at this context under `policy`."""
    c, page = engine.config, engine.pool.page_size
    per_token = engine.pool.layer_page_bytes // page  # K and V of one token in one layer
    pages = engine.pool.pages_for(context)
    bound_bytes = 2 * c.num_kv_heads * c.head_dim * 4  # key max and min per page and layer
    total = 0
    for layer in range(c.num_layers):
        sparse = policy.sparse(layer)
        if sparse and policy.evicts:
            held = min(pages, policy.budget_pages)
            total += held * page * per_token + (held * bound_bytes if policy.needs_bound else 0)
        elif sparse and policy.name == "quest":
            total += min(pages, max(3, policy.budget_pages)) * page * per_token + pages * bound_bytes
        else:
            total += context * per_token
    return total


def bytes_read_per_step(engine: Engine, policy: Policy, context: int, batch: int = 1) -> int:
    """Bytes one decode step of `batch` sequences, each at this context, reads: the weights once and
    every sequence's K/V under `policy` (what achieved bandwidth divides by the step time)."""
    return weight_bytes_per_step(engine) + batch * kv_bytes_per_step(engine, policy, context)


def synchronized_seconds(device: torch.device, fn, *args) -> tuple[Any, float]:
    """fn(*args) and its wall time, with the device's queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def bench_policy(engine: Engine, policy: Policy, prompt_ids: list[int], steps: int) -> dict[str, Any]:
    engine.policy = policy
    times: list[float] = []
    resident: list[int] = []
    decode = engine.runner.decode

    def timed(groups):
        logits, seconds = synchronized_seconds(engine.device, decode, groups)
        times.append(seconds)
        resident.append(sum(len(p) for p in groups[0][1][0].pages) * engine.pool.layer_page_bytes)
        return logits

    engine.runner.decode = timed
    try:
        out = engine.generate([prompt_ids], SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True))[0]
    finally:
        engine.runner.decode = decode
    if out.finish_reason == "error":
        return {"policy": policy.describe(), "context": len(prompt_ids), "error": out.error}
    step = sum(times[2:]) / max(len(times) - 2, 1)  # the first steps warm caches up
    read = bytes_read_per_step(engine, policy, len(prompt_ids) + steps // 2)
    return {"policy": policy.describe(), "context": len(prompt_ids), "ms_per_token": 1000 * step,
            "resident_kv_mib": resident[-1] / 2**20, "peak_kv_mib": out.stats.peak_kv_bytes / 2**20,
            "bytes_read_per_step": read, "achieved_gb_per_s": read / step / 1e9,
            "prefill_seconds": out.stats.prefill_seconds}


def bench_transformers(engine: Engine, prompt_ids: list[int], steps: int) -> float:
    """ms per decode token of transformers' own model and KV cache on the same folder, dtype and device."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(engine.model_dir, dtype=engine.dtype).to(engine.device).eval()
    ids = torch.tensor([prompt_ids], device=engine.device)
    # transformers 5.x names the cache argument `cache`, 4.x `past_key_values`
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    times = []
    with torch.inference_mode():
        out = model(ids, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            if engine.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = model(token, use_cache=True, **{cache_arg: past})
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            token.tolist()  # the same host sync our loop does each step
            times.append(time.perf_counter() - start)
    del model
    return 1000 * sum(times[2:]) / max(len(times) - 2, 1)


def decode_step_ms(engine: Engine, policy: Policy, prompts: list[list[int]], steps: int) -> float:
    """Mean ms per decode step of the whole batch of `prompts`, leaving out the first step of each batch
    bucket (where a compiled step not warmed up compiles, or a CUDA graph is captured) and steps after
    a sequence finished."""
    engine.policy = policy
    prepare, decode = engine.runner.prepare, engine.runner.decode
    seen: set = set()
    fresh = {"new": True}
    times: list[float] = []

    def spy_prepare(seqs, pol, *rest):
        step = prepare(seqs, pol, *rest)
        fresh["new"] = step.batch not in seen
        seen.add(step.batch)
        return step

    def timed(groups):
        logits, seconds = synchronized_seconds(engine.device, decode, groups)
        if not fresh["new"] and sum(len(seqs) for _, seqs in groups) == len(prompts):
            times.append(seconds)
        return logits

    engine.runner.prepare, engine.runner.decode = spy_prepare, timed
    try:
        outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True))
    finally:
        engine.runner.prepare, engine.runner.decode = prepare, decode
    failed = [o.error for o in outs if o.finish_reason == "error"]
    if failed:
        raise RuntimeError(failed[0])
    return 1000 * sum(times) / max(len(times), 1)
