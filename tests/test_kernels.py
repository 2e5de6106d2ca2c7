"""Triton kernels (under TRITON_INTERPRET=1 on CPU, compiled on GPU) against their torch twins,
and a compile of every kernel for sm_90 so GPU-only compile errors fail here."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lemma.kernels import reference

triton = pytest.importorskip("triton")
from lemma.kernels import attention, scores, store  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
PAGE = 16


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def random_case(batch, num_kv_heads, group, dim, slots, dtype, seed=0, num_pages=40):
    """A cache with random pages, page tables with empty slots (-1) and partial pages."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, num_kv_heads * group, dim, generator=g).to(dtype)
    k_cache = torch.randn(num_pages, num_kv_heads, PAGE, dim, generator=g).to(dtype)
    v_cache = torch.randn(num_pages, num_kv_heads, PAGE, dim, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(num_pages, generator=g)[:slots] for _ in range(batch * num_kv_heads)])
    ids = ids.view(batch, num_kv_heads, slots)
    fill = torch.randint(1, PAGE + 1, (batch, num_kv_heads, slots), generator=g)
    if slots > 2:
        ids[0, 0, 1] = -1  # an empty slot
        fill[0, 0, 1] = 0
        fill[:, :, -1] = 3  # a partial last page
    return [t.to(DEVICE) for t in (q, k_cache, v_cache, ids, fill)]


CASES = [  # (batch, kv heads, group, head dim, slots)
    (1, 2, 1, 64, 5),
    (3, 2, 2, 64, 4),
    (2, 1, 7, 128, 6),
    (1, 4, 2, 128, 3),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}-kv{}-g{}-d{}-s{}".format(*c))
def test_decode_attention_matches_the_twin(case, dtype):
    q, k_cache, v_cache, ids, fill = random_case(*case, dtype=dtype)
    scale = case[3] ** -0.5
    ref_out, ref_mass = reference.paged_decode_attention(q, k_cache, v_cache, ids, fill, scale, return_mass=True)
    # one split; split lists with the combine step (tiles shrunk to a short split, or cut by its end and by
    # the slot list's end); one page per tile
    for per_split, per_block in ((None, attention.PAGES_PER_BLOCK), (2, attention.PAGES_PER_BLOCK), (3, 2), (None, 1)):
        out, mass = attention.paged_decode_attention(q, k_cache, v_cache, ids, fill, scale, return_mass=True,
                                                     pages_per_split=per_split, pages_per_block=per_block)
        assert out.dtype == dtype and out.shape == ref_out.shape
        assert rel_err(out, ref_out) < TOLERANCE[dtype]
        assert rel_err(mass, ref_mass) < TOLERANCE[dtype]
    plain = attention.paged_decode_attention(q, k_cache, v_cache, ids, fill, scale)
    assert rel_err(plain, ref_out) < TOLERANCE[dtype]


def test_decode_attention_merges_many_splits_and_an_empty_head(monkeypatch):
    """More splits than the combine merges at once, head-dim chunks as on a GPU, and a KV head with no
    page at all (attends nothing: zeros, zero mass, as the twin)."""
    monkeypatch.setattr(attention, "combine_chunk", lambda block_d, device: min(attention.COMBINE_CHUNK_D, block_d))
    q, k_cache, v_cache, ids, fill = random_case(2, 2, 3, 64, 20, torch.float32, seed=3)
    ids[1, 0] = -1
    ref_out, ref_mass = reference.paged_decode_attention(q, k_cache, v_cache, ids, fill, 0.125, return_mass=True)
    assert attention.COMBINE_SPLITS < 20
    out, mass = attention.paged_decode_attention(q, k_cache, v_cache, ids, fill, 0.125, return_mass=True,
                                                 pages_per_split=1, pages_per_block=1)
    assert rel_err(out, ref_out) < 1e-5 and rel_err(mass, ref_mass) < 1e-5
    assert out[1, :3].abs().max() == 0 and mass[1, 0].abs().max() == 0


@pytest.mark.parametrize("per_split", [None, 2, 5])
def test_decode_attention_skips_each_rows_tail_past_listed(per_split):
    """A table wider than the rows' pages (CUDA's, as wide as the pool) with `listed` per row: the splits
    share only the listed slots, and real pages past them are neither attended nor given mass, exactly
    as the twin with those slots emptied. Rows list 0, 3, 1 and all 12 slots."""
    q, k_cache, v_cache, ids, fill = random_case(4, 2, 3, 64, 12, torch.float32, seed=5)
    listed = torch.tensor([0, 3, 1, 12], device=DEVICE)
    emptied = ids.masked_fill(torch.arange(12, device=DEVICE) >= listed[:, None, None], -1)
    ref_out, ref_mass = reference.paged_decode_attention(q, k_cache, v_cache, emptied, fill, 0.125, return_mass=True)
    twin_out, twin_mass = reference.paged_decode_attention(q, k_cache, v_cache, ids, fill, 0.125, return_mass=True,
                                                           listed=listed)
    assert torch.equal(twin_out, ref_out) and torch.equal(twin_mass, ref_mass)
    out, mass = attention.paged_decode_attention(q, k_cache, v_cache, ids, fill, 0.125, return_mass=True,
                                                 listed=listed, pages_per_split=per_split)
    assert rel_err(out, ref_out) < 1e-5 and rel_err(mass, ref_mass) < 1e-5
    assert out[0].abs().max() == 0 and mass[0].abs().max() == 0 and mass[1, :, 3:].abs().max() == 0
    full = attention.paged_decode_attention(q, k_cache, v_cache, ids, fill, 0.125)
    assert rel_err(out[3], full[3]) < 1e-6 and rel_err(out[1], full[1]) > 1e-3  # the tail did count without it


@pytest.mark.parametrize("programs, slots", [(8, 1024), (8, 3), (64, 300), (512, 256)])
def test_gpu_split_fills_the_device_twice_over(monkeypatch, programs, slots):
    """On a GPU the slot list is split so that (sequence, KV head, split) programs cover every SM at least
    twice where the slots allow it, with no split left empty (132 SMs, as an H100/H200 SXM)."""
    monkeypatch.setattr(attention, "_multiprocessors", lambda device: 132)
    per_split = attention._splits(programs, slots, None, torch.device("cuda"))
    splits = -(-slots // per_split)
    assert 1 <= per_split <= slots and (splits - 1) * per_split < slots
    assert programs * splits >= min(2 * 132, programs * slots)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}-kv{}-g{}-d{}-s{}".format(*c))
def test_page_scores_match_the_twin(case, dtype):
    q, k_cache, _, ids, fill = random_case(*case, dtype=dtype)
    heads = torch.arange(case[1], device=DEVICE)[None, :]
    pages = torch.arange(k_cache.shape[0], device=DEVICE)[:, None].expand(-1, case[1])
    count = torch.randint(1, PAGE + 1, pages.shape, device=DEVICE)
    key_max, key_min = reference.page_key_bounds(k_cache, pages, count)
    out = scores.page_scores(q, key_max, key_min, ids)
    ref = reference.page_scores(q, key_max, key_min, ids)
    assert torch.equal(torch.isinf(out), torch.isinf(ref))
    finite = torch.isfinite(ref)
    assert rel_err(out[finite], ref[finite]) < 1e-5
    assert heads.numel() == case[1]


@pytest.mark.parametrize("bounds", [True, False], ids=["with-bounds", "no-bounds"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_kv_heads, dim", [(2, 64), (3, 128)])
def test_store_decode_matches_the_twin(num_kv_heads, dim, dtype, bounds):
    g = torch.Generator().manual_seed(3)
    pages, tokens = 12, 4
    state = []
    for _ in range(2):  # two identical pools: one for the kernel, one for the twin
        k_cache = torch.randn(pages, num_kv_heads, PAGE, dim, generator=torch.Generator().manual_seed(4)).to(dtype)
        v_cache = torch.randn(pages, num_kv_heads, PAGE, dim, generator=torch.Generator().manual_seed(5)).to(dtype)
        state.append([t.to(DEVICE) for t in (k_cache, v_cache)])
    page_ids = torch.stack([torch.randperm(pages, generator=g)[:tokens] for _ in range(num_kv_heads)], 1)  # [N, Hkv]
    offsets = torch.tensor([0, 5, 15, 9])  # a fresh page, middles, a last row
    ids_all = torch.arange(pages)[:, None].expand(-1, num_kv_heads)
    prior = torch.full((pages, num_kv_heads), 16)
    for n in range(tokens):
        prior[page_ids[n], torch.arange(num_kv_heads)] = offsets[n]  # rows before the new one are filled
    k = torch.randn(tokens, num_kv_heads, dim, generator=g).to(dtype)
    v = torch.randn(tokens, num_kv_heads, dim, generator=g).to(dtype)
    results = []
    for fn, (k_cache, v_cache) in zip((store.store_decode, reference.store_decode), state):
        hi, lo = reference.page_key_bounds(k_cache, ids_all.to(DEVICE), prior.clamp(min=1).to(DEVICE))
        fill = prior.to(torch.int32).to(DEVICE)
        fn(k_cache, v_cache, k.to(DEVICE), v.to(DEVICE), page_ids.to(DEVICE), offsets.to(DEVICE),
           hi if bounds else None, lo if bounds else None, fill)
        results.append((k_cache, v_cache, hi, lo, fill))
    for ours, twin in zip(*results):
        assert torch.equal(ours, twin)


def test_every_kernel_compiles_for_sm90():
    """Compile each kernel for the H100/H200 (sm_90) with Triton's GPU target, in a process without
    TRITON_INTERPRET (the interpreter patches triton.language in-process)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("compile_sm90.py")
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "compiled 37 kernels for sm_90" in result.stdout


@pytest.mark.parametrize("policy", ["dense", "raas"])
def test_demo_model_generates_the_same_tokens_with_triton(policy):
    """End to end through the Triton kernels (interpreted on CPU): same greedy tokens as the torch path.
    RaaS runs at a budget small enough that pages are evicted and refreshed by the bound."""
    from lemma import Dense, Engine, RaaS, SamplingParams
    from lemma.models.store import pull

    folder = pull("smollm2-135m-instruct", quiet=True)
    kv_policy = Dense() if policy == "dense" else RaaS(budget=32, pin_prompt=False)
    # the interpreter runs ~3 s per token here: few tokens. Under RaaS the prompt is its last 32 tokens,
    # exactly the budget's 2 pages, so the first decode step (position 32) already evicts a page
    params = SamplingParams(temperature=0, max_tokens=8 if policy == "dense" else 5, ignore_eos=True)
    outs = {}
    for backend in ("torch", "triton"):
        engine = Engine(folder, policy=kv_policy, attention=backend, kv_cache_tokens=512, device=DEVICE)
        prompt = engine.chat_prompt([{"role": "user", "content": "What is 2+3?"}])
        outs[backend] = engine.generate([prompt if policy == "dense" else prompt[-32:]], params)[0]
        assert engine.pages.all_free
    assert outs["triton"].token_ids == outs["torch"].token_ids
    if policy == "raas":
        assert outs["triton"].stats.pages_evicted > 0
