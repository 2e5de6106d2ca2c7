"""The decode step as a static graph: fixed shapes per bucket, compiled with fullgraph=True, no graph
breaks, no recompiles inside a bucket, and the same greedy tokens as the eager step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from lemma import H2O, Dense, Engine, Quest, RaaS, SamplingParams, StreamingLLM
from lemma.engine.decode_state import DecodeState, batch_bucket, slot_bucket

POLICIES = [Dense(), RaaS(budget=64), RaaS(budget=64, refresh="mass"), StreamingLLM(budget=64), H2O(budget=64),
            Quest(budget=48)]
# with max_batch=2: the first two run together, the first finishes and the third joins the same bucket
PROMPTS = ["The quick brown fox", "Once upon a time there was", "Name three primes"]
PARAMS = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (60, 230, 100)]


def run_counting_buckets(engine: Engine) -> tuple[list, list[tuple]]:
    """Generate PROMPTS; per decode step record (bucket, graphs compiled before, after)."""
    steps: list[tuple] = []
    prepare, decode = engine.runner.prepare, engine.runner.decode
    seen: dict = {}

    def spy_prepare(seqs, policy):
        step = prepare(seqs, policy)
        seen["bucket"] = step.bucket
        return step

    def spy_decode(seqs, policy):
        before = counters["stats"]["unique_graphs"]
        logits = decode(seqs, policy)
        steps.append((seen["bucket"], before, counters["stats"]["unique_graphs"]))
        return logits

    engine.runner.prepare, engine.runner.decode = spy_prepare, spy_decode
    try:
        outs = engine.generate(PROMPTS, PARAMS)
    finally:
        engine.runner.prepare, engine.runner.decode = prepare, decode
    return outs, steps


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: f"{p.describe()}-{getattr(p, 'refresh', '')}")
def test_compiled_step_has_no_breaks_no_recompiles_and_equals_eager(tiny_dir, policy):
    torch._dynamo.reset()
    counters.clear()
    eager = Engine(tiny_dir, policy=policy, kv_cache_tokens=4096, max_batch=2)
    compiled = Engine(tiny_dir, policy=policy, kv_cache_tokens=4096, max_batch=2, compile="eager")
    expected = eager.generate(PROMPTS, PARAMS)
    outs, steps = run_counting_buckets(compiled)

    assert [o.token_ids for o in outs] == [o.token_ids for o in expected]
    assert len(steps) >= 200
    assert not counters["graph_break"], dict(counters["graph_break"])
    first_of_bucket: set = set()
    for bucket, before, after in steps:
        if bucket in first_of_bucket:
            assert after == before, f"recompiled inside bucket {bucket}"
        else:
            assert after == before + 1, f"bucket {bucket} did not compile exactly once"
            first_of_bucket.add(bucket)
    assert (2, slot_bucket(1, policy.budget_pages if policy.evicts else None)) in first_of_bucket  # a batch of 2
    if policy.evicts:
        assert outs[1].stats.pages_evicted > 0
        assert outs[1].stats.peak_kv_pages <= policy.budget_pages
    assert compiled.pool.all_free and eager.pool.all_free


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


# ---- the persistent state --------------------------------------------------------------------------

def test_buckets():
    assert [batch_bucket(n, 32) for n in (1, 2, 3, 5, 17, 32)] == [1, 2, 4, 8, 32, 32]
    assert batch_bucket(3, 3) == 3
    assert [slot_bucket(n) for n in (1, 5, 7, 9, 16, 17, 25, 33, 49, 65, 97, 129)] == [4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192]
    assert slot_bucket(3, 32) == 32 and slot_bucket(33, 32) == 48


def test_state_updates_in_place():
    state = DecodeState(num_layers=2, max_batch=4, device=torch.device("cpu"))
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
    state.ensure_slots(40)
    assert state.tables.shape[2] == 48 and state.generation == 1 and state.tables[0, 0, :2].tolist() == [2, 9]


def test_padded_rows_do_not_disturb_real_ones(tiny_dir):
    """Three sequences in a bucket of four: each equals its own run alone."""
    engine = Engine(tiny_dir, policy=RaaS(budget=32), kv_cache_tokens=4096, max_batch=4)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    alone = [engine.generate([p], params)[0].token_ids for p in PROMPTS]
    assert [o.token_ids for o in engine.generate(PROMPTS, params)] == alone
    assert engine.pool.all_free


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("policy", [Dense(), RaaS(budget=64), H2O(budget=64), Quest(budget=48)], ids=lambda p: p.describe())
def test_cuda_graphs_replay_each_bucket_and_equal_eager(tiny_dir, policy):
    """On CUDA, compile=True captures one graph per bucket and replays it: same greedy tokens as eager."""
    kwargs = dict(policy=policy, kv_cache_tokens=4096, max_batch=2, device="cuda", dtype="float32")
    expected = Engine(tiny_dir, **kwargs).generate(PROMPTS, PARAMS)
    engine = Engine(tiny_dir, compile=True, **kwargs)
    outs, steps = run_counting_buckets(engine)
    assert [o.token_ids for o in outs] == [o.token_ids for o in expected]
    buckets = {bucket for bucket, _, _ in steps}
    (graphs,) = engine.runner._graphs.values()  # one CudaGraphs per policy the engine ran
    assert len(graphs.graphs) == len(buckets) and len(steps) >= 200
    assert engine.pool.all_free


def test_compiled_step_calls_the_triton_kernels_as_custom_ops(tiny_dir):
    """attention="triton" (interpreted here): the compiled step traces the kernels as opaque custom ops,
    with no graph break, and gives the eager Triton path's tokens."""
    torch._dynamo.reset()
    counters.clear()
    kwargs = dict(policy=RaaS(budget=32, pin_prompt=False), kv_cache_tokens=1024, max_batch=1, attention="triton")
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    expected = Engine(tiny_dir, **kwargs).generate(["The quick brown fox"], params)[0]
    got = Engine(tiny_dir, compile="eager", **kwargs).generate(["The quick brown fox"], params)[0]
    assert got.token_ids == expected.token_ids and got.stats.pages_evicted > 0
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 1
