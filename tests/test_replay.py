"""Exact page-chunked replay: equal to token-by-token teacher forcing (the oracle) for every policy —
the same retained pages, stamps and mass at every page boundary, log-probs within 1e-4 (fp32) —
including prompts that do not fill a page and partial last pages."""

import pytest
import torch

from lemma import H2O, Dense, Engine, Quest, RaaS, StreamingLLM
from lemma.engine.policies import RaaSCapped, RandomEviction
from lemma.errors import LemmaError

PAGE = 16
POLICIES = [Dense(), RaaS(budget=128), RaaS(budget=128, refresh="mass"), RaaS(budget=128, dense_layers=1),
            RaaS(budget=48, pin_prompt=False), StreamingLLM(budget=48), H2O(budget=64), Quest(budget=48),
            RandomEviction(budget=128), RaaS(budget=128, refresh="ema", recent=2), RaaS(budget=64, pin_share=0.5), RaaSCapped(budget=64)]
# prompt lengths: within a page, exactly a page, several pages with a partial one, longer than a budget
PROMPT_LENS = [5, 16, 37, 70]
TARGET_LENS = [1, 16, 75, 130]


def snapshots(engine: Engine) -> dict:
    """Spy on both decode paths: per (request, positions fed so far) at each page boundary and at the
    end, each layer's retained (logical page, stamp, mass) per KV head."""
    seen: dict = {}
    pool = engine.pool

    def record(seq, fed: int) -> None:
        if fed % PAGE and fed != len(seq.prompt_ids) + len(seq.forced) - 1:
            return
        state = []
        for layer, pages in enumerate(seq.pages):
            ids = torch.tensor(pages)
            rows = [sorted(zip(pool.born[layer][ids, h].tolist(), pool.stamp[layer][ids, h].tolist(),
                               pool.mass[layer][ids, h].tolist())) for h in range(pool.heads.numel())]
            state.append(rows)
        seen[(len(seq.prompt_ids), len(seq.forced), fed)] = state

    decode, replay = engine.runner.decode, engine.forcing.replay

    def spy_decode(groups):
        logits = decode(groups)
        for seq in (seq for _, group in groups for seq in group):
            record(seq, seq.num_tokens)
        return logits

    def spy_replay(seqs, policy):
        spans = [seq.replay_span(PAGE) for seq in seqs]
        logits = replay(seqs, policy)
        for seq, (_, end) in zip(seqs, spans):
            record(seq, end)
        return logits

    engine.runner.decode, engine.forcing.replay = spy_decode, spy_replay
    return seen


def assert_same_state(chunked: dict, stepped: dict) -> None:
    assert chunked.keys() == stepped.keys()
    for key in stepped:
        for layer, (a, b) in enumerate(zip(chunked[key], stepped[key])):
            for head, (rows_a, rows_b) in enumerate(zip(a, b)):
                where = f"{key} layer {layer} head {head}"
                assert [r[:2] for r in rows_a] == [r[:2] for r in rows_b], where  # pages and stamps
                assert [r[2] for r in rows_a] == pytest.approx([r[2] for r in rows_b], abs=1e-4), where


def assert_same_replays(runs: list, oracle: list) -> None:
    """Two teacher_force results of the same requests: no errors, log-probs within 1e-4, same argmax
    and evictions."""
    for a, b in zip(runs, oracle, strict=True):
        assert a.error is None and b.error is None
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
        assert a.predicted == b.predicted
        assert a.stats.pages_evicted == b.stats.pages_evicted


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.describe())
def test_chunked_replay_equals_token_by_token(policy, tiny_dir):
    torch.manual_seed(0)
    prompts = [torch.randint(3, 200, (n,)).tolist() for n in PROMPT_LENS]
    targets = [torch.randint(3, 200, (n,)).tolist() for n in TARGET_LENS]
    runs = []
    for chunked in (False, True):
        engine = Engine(tiny_dir, policy=policy, kv_cache_tokens=4096, dtype="float32")
        seen = snapshots(engine)
        runs.append((engine.teacher_force(prompts, targets, chunked=chunked), seen))
        assert engine.pages.all_free
    (stepped, stepped_state), (chunked, chunked_state) = runs
    assert_same_replays(chunked, stepped)
    assert_same_state(chunked_state, stepped_state)
    if policy.evicts:
        assert sum(f.stats.pages_evicted for f in stepped) > 0  # the budgets really evict


def test_chunked_replay_takes_a_page_per_forward(tiny_dir):
    engine = Engine(tiny_dir, policy=RaaS(budget=64), kv_cache_tokens=4096)
    calls = []
    replay = engine.forcing.replay
    engine.forcing.replay = lambda seqs, policy: calls.append(len(seqs)) or replay(seqs, policy)
    engine.teacher_force([[5] * 10], [[7] * 100])
    # 99 fed positions 10..108: the rest of page 0, pages 1-5, and 13 of page 6
    assert len(calls) == 7


def test_chunked_replay_shares_steps_with_generation(tiny_dir):
    """A replay and a sampled request in the same steps: the replay still equals its oracle."""
    from lemma import SamplingParams

    engine = Engine(tiny_dir, policy=RaaS(budget=64), kv_cache_tokens=4096)
    oracle = engine.teacher_force([[9] * 20], [[11] * 90], chunked=False)[0]
    box = []
    engine.add_request("hello there", SamplingParams(max_tokens=60, ignore_eos=True, temperature=0),
                       on_output=box.append)
    forced = engine.teacher_force([[9] * 20], [[11] * 90])[0]
    while engine.has_unfinished():
        engine.step()
    assert forced.logprobs == pytest.approx(oracle.logprobs, abs=1e-4)
    assert box[-1].finished and engine.pages.all_free


def test_chunk_attention_is_decode_attention_per_query():
    from lemma.kernels import reference

    torch.manual_seed(1)
    batch, tokens, heads, kv_heads, dim, pages, slots = 3, 5, 4, 2, 8, 12, 4
    k_cache, v_cache = torch.randn(pages, kv_heads, PAGE, dim), torch.randn(pages, kv_heads, PAGE, dim)
    ids = torch.randint(0, pages, (batch, kv_heads, slots))
    ids[0, :, -1] = -1  # an empty slot
    fill = torch.randint(0, PAGE + 1, (batch, tokens, kv_heads, slots))
    q = torch.randn(batch, tokens, heads, dim)
    out, mass = reference.paged_chunk_attention(q, k_cache, v_cache, ids, fill, 0.3, return_mass=True)
    for t in range(tokens):
        want, want_mass = reference.paged_decode_attention(q[:, t], k_cache, v_cache, ids, fill[:, t], 0.3, return_mass=True)
        torch.testing.assert_close(out[:, t], want)
        torch.testing.assert_close(mass[:, t], want_mass)


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.describe())
def test_shared_dense_prefix_equals_full_replay(policy, tiny_dir):
    """Replaying the positions where a policy attends what Dense attends from Dense's recorded q/k/v
    (engine/recording.py) leaves the same pages, stamps and mass at every page boundary and the same
    log-probs as running the model there."""
    torch.manual_seed(1)
    prompts = [torch.randint(3, 200, (n,)).tolist() for n in PROMPT_LENS]
    targets = [torch.randint(3, 200, (n,)).tolist() for n in TARGET_LENS]
    dense = Engine(tiny_dir, policy=Dense(), kv_cache_tokens=4096, dtype="float32")
    recordings = [f.recording for f in dense.teacher_force(prompts, targets, record_until=1000)]
    assert [r.end for r in recordings] == [len(p) + len(t) - 1 for p, t in zip(prompts, targets)]
    runs = []
    for shared in (None, recordings):
        engine = Engine(tiny_dir, policy=policy, kv_cache_tokens=4096, dtype="float32")
        seen = snapshots(engine)
        recorded = engine.forcing._recorded
        calls = []
        engine.forcing._recorded = lambda seqs, spans, p: calls.append(len(seqs)) or recorded(seqs, spans, p)
        runs.append((engine.teacher_force(prompts, targets, shared=shared), seen, calls))
        assert engine.pages.all_free
    (full, full_state, none), (reused, reused_state, calls) = runs
    assert not none and calls  # the shared run really skipped the model somewhere
    assert_same_replays(reused, full)
    assert_same_state(reused_state, full_state)


def test_shared_prefix_of_other_tokens_is_refused(tiny_dir):
    dense = Engine(tiny_dir, policy=Dense(), kv_cache_tokens=4096)
    recording = dense.teacher_force([[5] * 10], [[7] * 40], record_until=64)[0].recording
    engine = Engine(tiny_dir, policy=RaaS(budget=64), kv_cache_tokens=4096)
    out = engine.teacher_force([[5] * 10], [[8] * 40], shared=[recording])[0]
    assert out.error is not None and "shared[0]" in out.error
    other = Engine(tiny_dir, policy=RaaS(budget=64), kv_cache_tokens=4096, dtype="bfloat16")
    assert "in bfloat16" in other.teacher_force([[5] * 10], [[7] * 40], shared=[recording])[0].error
    with pytest.raises(LemmaError, match="record_until"):
        engine.teacher_force([[5] * 10], [[7] * 40], record_until=64)
    with pytest.raises(LemmaError, match="chunked"):
        dense.teacher_force([[5] * 10], [[7] * 40], record_until=64, chunked=False)


@pytest.mark.parametrize("policy", [Quest(budget=48), RaaS(budget=64), H2O(budget=48)], ids=lambda p: p.describe())
def test_shared_prefix_with_preemption_and_a_limit_inside_a_page(policy, tiny_dir):
    """A pool so small that Dense (and Quest) requests are preempted and prefilled again, and a
    recording limit that ends inside a page: the shared replay still equals the full one."""
    torch.manual_seed(2)
    prompts = [torch.randint(3, 200, (n,)).tolist() for n in [5, 20, 37, 21, 9, 30]]
    targets = [torch.randint(3, 200, (n,)).tolist() for n in [100, 90, 75, 100, 120, 60]]
    dense = Engine(tiny_dir, policy=Dense(), kv_cache_tokens=256, dtype="float32")
    recordings = [f.recording for f in dense.teacher_force(prompts, targets, record_until=40)]
    assert dense.scheduler.preemptions > 0
    assert all(r.end <= 40 for r in recordings) and recordings[0].end == 40  # 5-token prompt: cut inside page 2
    runs = []
    for shared in (None, recordings):
        engine = Engine(tiny_dir, policy=policy, kv_cache_tokens=256, dtype="float32")
        runs.append(engine.teacher_force(prompts, targets, shared=shared))
        assert engine.pages.all_free
        if isinstance(policy, Quest):
            assert engine.scheduler.preemptions > 0
    assert_same_replays(runs[1], runs[0])


def test_recording_keeps_rows_without_gaps_and_before_its_limit():
    from lemma.engine.recording import Recording

    rec = Recording([1] * 5, [2] * 60, limit=30, layers=2)
    rows = lambda n, at: torch.arange(at, at + n, dtype=torch.float32)[:, None, None].expand(n, 2, 4)  # noqa: E731
    for layer in range(2):
        rec.put(layer, 5, rows(11, 5), rows(11, 5), rows(11, 5))  # positions 5..15
    for layer in range(2):
        rec.put(layer, 16, rows(16, 16), rows(16, 16), rows(16, 16))  # 16..31, kept up to the limit 30
    assert rec.end == 30
    q, k, v = rec.inputs(1, 14, 30)
    assert q[:, 0, 0].tolist() == list(range(14, 30))
    with pytest.raises(LemmaError, match="outside the recording"):
        rec.inputs(0, 14, 31)
    gap = Recording([1] * 5, [2] * 60, limit=100, layers=2)
    for layer in range(2):
        gap.put(layer, 5, rows(11, 5), rows(11, 5), rows(11, 5))
    for layer in range(2):  # a preempted sequence comes back further on: nothing past the gap is kept
        gap.put(layer, 40, rows(8, 40), rows(8, 40), rows(8, 40))
    assert gap.end == 16 and gap.limit == 16
    with pytest.raises(LemmaError, match="not of"):
        gap.scores(0, 3)


def test_recording_of_a_cut_replay_stands_for_the_whole_one():
    from lemma.engine.recording import Recording

    cut = Recording([1] * 5, [2] * 26, limit=30, layers=2)  # a replay of the targets' first part only
    cut.finish_as([2] * 60, [-1.0] * 60, [2] * 60)
    assert cut.covers([1] * 5, [2] * 60) and cut.scores(50, 10) == ([-1.0] * 10, [2] * 10)
    with pytest.raises(LemmaError, match="extend"):
        cut.finish_as([3] * 60, [-1.0] * 60, [3] * 60)
    with pytest.raises(LemmaError, match="one score per target"):
        cut.finish_as([2] * 60, [-1.0] * 59, [2] * 60)


def test_teacher_force_reports_each_replay_as_it_finishes(tiny_dir):
    engine = Engine(tiny_dir, kv_cache_tokens=256)
    seen = []
    targets = [[7] * 100, [7] * 300, [7] * 20]  # the second can never fit the 256-token pool under Dense
    forced = engine.teacher_force([[5] * 10] * 3, targets, on_finished=lambda i, f: seen.append((i, f)))
    assert [i for i, _ in seen] == [1, 2, 0]  # the refused one at once, then the shortest replay first
    assert all(f is forced[i] for i, f in seen)
    assert "KV cache" in forced[1].error and [len(f.logprobs) for f in forced] == [100, 0, 20]
