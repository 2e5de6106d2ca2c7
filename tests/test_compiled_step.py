"""The decode step as a static graph compiled once: every graph at warm-up, fullgraph=True (no graph
breaks), nothing compiled after it however the session goes, and the same greedy tokens as eager."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch._dynamo
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

from lemma import H2O, Dense, Engine, Quest, RaaS, SamplingParams, StreamingLLM
from lemma.engine.compiled import CompileCounter
from lemma.engine.decode_state import DecodeState, batch_bucket

POLICIES = [Dense(), RaaS(budget=64), RaaS(budget=64, refresh="mass"), StreamingLLM(budget=64), H2O(budget=64),
            Quest(budget=48), RaaS(budget=64, dense_layers=1)]
# with max_batch=2: the first two run together, the first finishes and the third joins the same bucket
PROMPTS = ["The quick brown fox", "Once upon a time there was", "Name three primes"]
PARAMS = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (60, 230, 100)]


def warm_up_graphs(policy, buckets: int) -> int:
    """Graphs a warm-up of `buckets` batch buckets compiles, per kind of layer the policy has (dense,
    sparse) and for the head: one for batch 1, one for every larger bucket (dynamo makes the batch
    dimension dynamic when the second bucket arrives; the slot dimension is dynamic from the start)."""
    kinds = len({policy.sparse(layer) for layer in range(2)})  # the tiny models have two layers
    return (kinds + 1) * min(buckets, 2)


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: f"{p.describe()}-{getattr(p, 'refresh', '')}")
def test_compiled_step_compiles_at_warm_up_only_and_equals_eager(tiny_dir, policy):
    """Warm-up compiles one graph per (layer kind, batch bucket); the run after it, whose context grows
    from 4 to 240 tokens and whose batch goes 2 -> 1 -> 2, compiles nothing and breaks no graph."""
    torch._dynamo.reset()
    counters.clear()
    eager = Engine(tiny_dir, policy=policy, kv_cache_tokens=4096, max_batch=2)
    expected = eager.generate(PROMPTS, PARAMS)
    with CompileCounter() as warm_up:
        compiled = Engine(tiny_dir, policy=policy, kv_cache_tokens=4096, max_batch=2, compile="eager")
    assert warm_up.graphs == warm_up_graphs(policy, 2)
    with CompileCounter() as run:
        outs = compiled.generate(PROMPTS, PARAMS)
    assert run.graphs == 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in expected]
    assert not counters["graph_break"], dict(counters["graph_break"])
    if policy.evicts:
        assert outs[1].stats.pages_evicted > 0
    if policy.evicts and not policy.dense_layers:
        assert outs[1].stats.peak_kv_pages <= policy.budget_pages
    assert compiled.pages.all_free and eager.pages.all_free


def long_context_model(tiny_dir: Path, root: Path) -> Path:
    """The tiny model with a 4K context (its weights unchanged), so a 2K prompt fits."""
    folder = root / "tiny-4k"
    shutil.copytree(tiny_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 4096
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("policy", [Dense(), RaaS(budget=256, pin_prompt=False)], ids=lambda p: p.describe())
def test_nothing_compiles_after_warm_up_over_a_scripted_session(tiny_dir, tmp_path, policy):
    """A short request, a 2K one, a short one again, a batch of 5 and a 3-turn chat on one engine: every
    graph compiles at start, none during the session (not when a context grows past any before, not
    when a longer request arrives, not when the batch changes inside its bucket)."""
    torch._dynamo.reset()
    counters.clear()
    with CompileCounter() as warm_up:
        engine = Engine(long_context_model(tiny_dir, tmp_path), policy=policy, kv_cache_tokens=8192, max_batch=8,
                        compile="eager")
    assert warm_up.graphs == warm_up_graphs(policy, 4)  # buckets 1, 2, 4, 8
    short = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    long_prompt = list(engine.tokenizer.encode(" ".join(CORPUS_WORDS * 200)))[:2048]
    with CompileCounter() as session:
        outs = engine.generate(["The quick brown fox"], short)
        assert len(long_prompt) == 2048
        outs += engine.generate([long_prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
        outs += engine.generate(["Name three primes"], short)
        outs += engine.generate([f"Tell me a story {i}" for i in range(5)], short)
        messages = []
        for turn in ("Hello", "Name three primes", "And three more"):
            messages.append({"role": "user", "content": turn})
            reply = engine.chat(messages, short)
            messages.append({"role": "assistant", "content": reply.text})
    assert session.graphs == 0, f"{session.graphs} graphs compiled after warm-up"
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert [len(o.token_ids) for o in outs] == [20, 40] + [20] * 6, [o.error for o in outs]
    assert len(messages) == 6
    assert engine.pages.all_free


CORPUS_WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "primes", "story", "robot"]


def test_inductor_compiled_step_equals_eager(tiny_dir):
    """The real compiler (C++ on CPU) on a tiny model: same greedy tokens as the eager step."""
    torch._dynamo.reset()
    policy = RaaS(budget=32)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    expected = Engine(tiny_dir, policy=policy, kv_cache_tokens=1024, max_batch=1).generate(["The quick brown fox"], params)
    engine = Engine(tiny_dir, policy=policy, kv_cache_tokens=1024, max_batch=1, compile=True)
    out = engine.generate(["The quick brown fox"], params)
    assert out[0].token_ids == expected[0].token_ids
    assert out[0].stats.pages_evicted > 0


def test_traces_come_out_of_the_compiled_step(tiny_dir):
    """An observer still sees every layer's retained pages and evictions when the step is compiled."""
    from lemma.evaluation.trace import record_trace

    torch._dynamo.reset()
    engine = Engine(tiny_dir, policy=RaaS(budget=32, pin_prompt=False), kv_cache_tokens=1024, compile="eager")
    eager = Engine(tiny_dir, policy=RaaS(budget=32, pin_prompt=False), kv_cache_tokens=1024)
    ids = engine.tokenizer.encode("The quick brown fox")
    got, want = record_trace(engine, ids, 50), record_trace(eager, ids, 50)
    assert got.evictions == want.evictions and got.evictions
    assert len(got.steps) == len(want.steps) == 49
    assert counters["graph_break"] == {} or not any(counters["graph_break"].values())


# ---- one step across policies ------------------------------------------------------------------------

MIXED = [Dense(), RaaS(budget=32), StreamingLLM(budget=48)]


def run_requests(engine: Engine, requests: list[tuple[str, object, SamplingParams]]) -> list[list[int]]:
    """Each (prompt, policy, params) through add_request/step; the token ids of each."""
    ids = [engine.add_request(prompt, params, policy=policy) for prompt, policy, params in requests]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
    return [tokens[i] for i in ids]


def test_requests_under_different_policies_decode_in_one_step(tiny_dir):
    """Three policies, five requests: every decode step is one forward over all of them (a row slice
    per policy), and each request's tokens equal its run alone."""
    engine = Engine(tiny_dir, kv_cache_tokens=4096, max_batch=8)
    requests = [(PROMPTS[i % 3], MIXED[i % 3], SamplingParams(temperature=0, max_tokens=40 + 20 * i, ignore_eos=True))
                for i in range(5)]
    alone = [run_requests(engine, [r])[0] for r in requests]
    calls, decode_step, steps_before = [], engine.runner.decode_step, engine.scheduler.decode_steps
    engine.runner.decode_step = lambda policies, *rest: calls.append(policies) or decode_step(policies, *rest)
    assert run_requests(engine, requests) == alone
    assert len(calls) == engine.scheduler.decode_steps - steps_before  # one forward per step that decoded
    assert max(map(len, calls)) == 3 and all(list(p) == sorted(p, key=repr) for p in calls)
    assert engine.pages.all_free


def test_a_compiled_mixed_step_compiles_at_warm_up_only_and_equals_eager(tiny_dir):
    """warm_up(policies=[a, b]) compiles the step that mixes them too: one graph per layer kind, whatever
    the slices' sizes; the run after it (mixes of 1+1, 2+1, 1+3 requests) compiles nothing."""
    torch._dynamo.reset()
    counters.clear()
    policies = [RaaS(budget=32), Dense()]
    runs = [[(p, policies[i < k]) for i, p in enumerate(PROMPTS[:1] * (k + m))] for k, m in ((1, 1), (2, 1), (1, 3))]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    eager = Engine(tiny_dir, kv_cache_tokens=4096, max_batch=4)
    expected = [run_requests(eager, [(p, pol, params) for p, pol in run]) for run in runs]
    compiled = Engine(tiny_dir, kv_cache_tokens=4096, max_batch=4, compile="eager", warm_up=False)
    with CompileCounter() as warm_up:
        compiled.warm_up(policies=policies)
    # RaaS: a sparse layer and the head, at batch 1 and larger; Dense: its dense layer (the head is shared);
    # the mix: one graph
    assert warm_up.graphs == 4 + 2 + 1
    with CompileCounter() as run:
        got = [run_requests(compiled, [(p, pol, params) for p, pol in run]) for run in runs]
    assert run.graphs == 0 and got == expected
    assert not counters["graph_break"], dict(counters["graph_break"])


# ---- the persistent state --------------------------------------------------------------------------

def test_buckets():
    assert [batch_bucket(n, 32) for n in (1, 2, 3, 5, 17, 32)] == [1, 2, 4, 8, 32, 32]
    assert batch_bucket(3, 3) == 3


def test_state_updates_in_place():
    state = DecodeState(num_layers=2, max_batch=4, max_slots=8, device=torch.device("cpu"))
    state.set_rows([7, 8], [[[0, 1], [0]], [[2], [1, 2, 3]]])
    tables = state.tables
    step = state.step_inputs([5, 6], [20, 33], np.zeros((2, 2), np.int64), np.zeros((2, 2), np.int64), 4)
    assert step.bucket == (2, 4) and step.tables.data_ptr() == tables.data_ptr()
    assert step.tables[1, 1, :4].tolist() == [1, 2, 3, -1]
    state.set_page(0, 1, 1, 9)  # a page opens: one entry changes, nothing is rebuilt
    assert state.tables is tables and tables[0, 1, :2].tolist() == [2, 9]
    state.set_rows([8, 9], [[[2, 9], [1, 2, 3]], [[4], [5]]])  # 7 leaves, 8 moves up, 9 joins
    assert tables[0, 0, :2].tolist() == [2, 9] and tables[1, 1, :2].tolist() == [5, -1]
    assert (tables[:, 2:] == -1).all()
    step = state.step_inputs([1, 2, 3], [0, 1, 2], np.ones((2, 3), np.int64), np.zeros((2, 3), np.int64), 4)
    assert step.bucket == (4, 4) and step.modes[:, 3].tolist() == [0, 0]  # the padded row continues into scratch
    step = state.step_inputs([1], [70], np.zeros((2, 1), np.int64), np.zeros((2, 1), np.int64), 6)
    assert step.bucket == (1, 6) and step.tables.data_ptr() == tables.data_ptr()  # wider: a view, not a copy
    assert state.step_inputs([1], [0], np.zeros((2, 1), np.int64), np.zeros((2, 1), np.int64), 99).bucket == (1, 8)


OPERATION = st.one_of(
    st.tuples(st.just("rows"), st.lists(st.integers(0, 7), max_size=5, unique=True)),  # uids, in row order
    st.tuples(st.just("page"), st.integers(0, 1), st.integers(0, 4), st.integers(0, 5), st.integers(0, 99)),
    st.tuples(st.just("step"), st.integers(1, 6)))


@settings(max_examples=150, deadline=None)
@given(operations=st.lists(OPERATION, max_size=25))
def test_a_mirrored_states_device_tables_follow_its_host_mirror(operations):
    """The device copy of a state's tables (the CUDA path: rows that stay move on the device, only new
    rows and changed entries cross) equals the host mirror after every step's sync, however
    membership changes, page writes and steps interleave."""
    state = DecodeState(num_layers=2, max_batch=5, max_slots=6, device=torch.device("cpu"), mirrored=True)
    assert state.tables.data_ptr() != torch.from_numpy(state._tables_np).data_ptr()
    with torch.inference_mode():
        for operation in operations:
            if operation[0] == "rows":
                uids = operation[1]
                state.set_rows(uids, [[[10 * uid + i for i in range(uid % 4)], [10 * uid + 7]] for uid in uids])
            elif operation[0] == "page" and operation[2] < len(state.rows):
                state.set_page(*operation[1:])
            elif operation[0] == "step":
                n = max(len(state.rows), 1)
                zeros = np.zeros((2, n), np.int64)
                state.step_inputs([1] * n, [0] * n, zeros, zeros, operation[1])
                assert torch.equal(state.tables, torch.from_numpy(state._tables_np))


@pytest.mark.parametrize("policy", [RaaS(budget=96), RaaS(budget=96, pin_prompt=False), StreamingLLM(budget=96),
                                    H2O(budget=96)], ids=lambda p: p.describe())
def test_an_evicting_policys_page_tables_are_its_budget_wide(tiny_dir, policy):
    """On CUDA a policy's decode state is as wide as its sequences can ever hold (the width every step
    reads): an evicting one's budget, a dense one's (or one with dense layers) the model's context. Long
    outputs (and, unpinned, a prompt past the budget) fit in it, with the same tokens as the full-width
    state CPU keeps: a page past the width would not fit the table."""
    engine = Engine(tiny_dir, policy=policy, kv_cache_tokens=4096, max_batch=2)
    runner, full = engine.runner, engine.runner.max_slots
    assert full > 6 and runner.table_width(policy) == 6
    assert [runner.table_width(p) for p in (Dense(), Quest(budget=48), RaaS(budget=96, dense_layers=1))] == [full] * 3
    assert runner.state_for(policy).tables.shape[-1] == full
    params = SamplingParams(temperature=0, max_tokens=150, ignore_eos=True)
    prompt = "The quick brown fox " * (8 if getattr(policy, "pin_prompt", True) else 30)  # 30: 14 pages
    wide = engine.generate([prompt, "Name three primes"], params)
    runner.states[policy] = DecodeState(engine.pool.num_layers, 2, 6, engine.pool.device)  # as on CUDA
    narrow = engine.generate([prompt, "Name three primes"], params)
    assert [o.token_ids for o in narrow] == [o.token_ids for o in wide], [o.error for o in narrow]
    assert [len(o.token_ids) for o in narrow] == [150, 150] and runner.states[policy].tables.shape[-1] == 6
    assert engine.pages.all_free


def test_padded_rows_do_not_disturb_real_ones(tiny_dir):
    """Three sequences in a bucket of four: each equals its own run alone."""
    engine = Engine(tiny_dir, policy=RaaS(budget=32), kv_cache_tokens=4096, max_batch=4)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    alone = [engine.generate([p], params)[0].token_ids for p in PROMPTS]
    assert [o.token_ids for o in engine.generate(PROMPTS, params)] == alone
    assert engine.pages.all_free


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("policy", [Dense(), RaaS(budget=64), H2O(budget=64), Quest(budget=48)], ids=lambda p: p.describe())
def test_cuda_graphs_replay_each_bucket_and_equal_eager(tiny_dir, policy):
    """On CUDA, compile=True captures one graph per batch bucket at start and replays it as contexts
    grow: same greedy tokens as eager."""
    kwargs = dict(policy=policy, kv_cache_tokens=4096, max_batch=2, device="cuda", dtype="float32")
    expected = Engine(tiny_dir, compile=False, **kwargs).generate(PROMPTS, PARAMS)
    engine = Engine(tiny_dir, compile=True, **kwargs)
    graphs = engine.runner._graphs.graphs  # keyed by the step's ((policy, batch bucket), ...) slices
    assert sorted(graphs) == [((policy, 1),), ((policy, 2),)]  # captured at warm-up, one per batch bucket
    outs = engine.generate(PROMPTS, PARAMS)
    assert [o.token_ids for o in outs] == [o.token_ids for o in expected]
    assert sorted(graphs) == [((policy, 1),), ((policy, 2),)]  # replayed, never captured again
    assert engine.pages.all_free


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("policy", [Dense(), RaaS(budget=64)], ids=lambda p: p.describe())
def test_cuda_graphs_of_an_inductor_step_equal_eager(tiny_dir, policy):
    """compile="inductor" on CUDA fuses the layers with inductor, then captures them: the first step of a
    bucket compiles, the capture records it, and greedy tokens equal eager's."""
    kwargs = dict(policy=policy, kv_cache_tokens=4096, max_batch=2, device="cuda", dtype="float32")
    expected = Engine(tiny_dir, compile=False, **kwargs).generate(PROMPTS, PARAMS)
    engine = Engine(tiny_dir, compile="inductor", **kwargs)
    assert sorted(engine.runner._graphs.graphs) == [((policy, 1),), ((policy, 2),)]
    assert [o.token_ids for o in engine.generate(PROMPTS, PARAMS)] == [o.token_ids for o in expected]
    assert engine.pages.all_free


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_of_a_mixed_step_equal_eager(tiny_dir):
    """On CUDA a step mixing policies is one captured graph per ((policy, bucket), ...) mix: warmed up at
    2 rows a slice, captured on first use for other sizes, and the same greedy tokens as eager."""
    kwargs = dict(kv_cache_tokens=4096, max_batch=4, device="cuda", dtype="float32")
    requests = [(PROMPTS[i % 3], MIXED[i % 2], SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))
                for i in range(5)]
    expected = run_requests(Engine(tiny_dir, compile=False, **kwargs), requests)
    engine = Engine(tiny_dir, compile=True, warm_up=False, **kwargs)
    engine.warm_up(policies=MIXED[:2])
    assert tuple(sorted(MIXED[:2], key=repr)) in {tuple(p for p, _ in key) for key in engine.runner._graphs.graphs}
    assert run_requests(engine, requests) == expected
    assert engine.pages.all_free


def test_compiled_step_calls_the_triton_kernels_as_custom_ops(tiny_dir):
    """attention="triton" (interpreted here): the compiled step traces the kernels as opaque custom ops,
    with no graph break, and gives the eager Triton path's tokens."""
    torch._dynamo.reset()
    counters.clear()
    kwargs = dict(policy=RaaS(budget=32, pin_prompt=False), kv_cache_tokens=1024, max_batch=1, attention="triton")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompt = list(range(3, 35))  # exactly the budget's 2 pages: the first decode step evicts
    expected = Engine(tiny_dir, **kwargs).generate([prompt], params)[0]
    got = Engine(tiny_dir, compile="eager", **kwargs).generate([prompt], params)[0]
    assert got.token_ids == expected.token_ids and got.stats.pages_evicted > 0
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 2  # one bucket: a layer kind, the head


WARM_START = """
import json, sys, time
import torch
from torch._dynamo.utils import counters
from lemma import Dense, Engine
start = time.perf_counter()
Engine(sys.argv[1], policy=Dense(), kv_cache_tokens=1024, max_batch=1, compile=True)
print(json.dumps({"hits": counters["inductor"]["fxgraph_cache_hit"], "misses": counters["inductor"]["fxgraph_cache_miss"],
                  "seconds": time.perf_counter() - start}))
"""


def test_a_second_process_loads_the_compiled_step_from_disk(tiny_dir, tmp_path):
    """Inductor's output is kept under $LEMMA_HOME/compile: the second process compiles nothing new."""
    env = {**os.environ, "LEMMA_HOME": str(tmp_path)}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    env.pop("TRITON_CACHE_DIR", None)
    runs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", WARM_START, str(tiny_dir)], env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    cold, warm = runs
    assert cold["misses"] >= 2 and cold["hits"] == 0  # a layer and the head (batch 1 only: the cheapest cold compile)
    assert warm["misses"] == 0 and warm["hits"] == cold["misses"]
    assert any((tmp_path / "compile").rglob("*.py")) or any((tmp_path / "compile").rglob("*.cpp"))


def test_engine_compiles_by_default_on_cuda_only(tiny_dir):
    """compile=None (the default): CUDA graphs on a GPU, eager on CPU and under tensor parallelism."""
    from lemma.engine.options import resolve_compile

    assert Engine(tiny_dir, kv_cache_tokens=256).compile is False
    assert resolve_compile(None, torch.device("cuda"), 1) is True
    assert resolve_compile(None, torch.device("cuda"), 2) is False
    assert resolve_compile(None, torch.device("cpu"), 1) is False
    assert resolve_compile("eager", torch.device("cpu"), 1) == "eager"
