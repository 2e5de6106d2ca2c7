"""KV policies: each rule against a direct computation, invariants under random runs, equivalence
with Dense when nothing needs evicting, and bad input."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lemma import H2O, Dense, Engine, LemmaError, Quest, RaaS, SamplingParams, StreamingLLM, make_policy
from lemma.engine.policies import SlotMeta
from lemma.kernels import reference

PAGE = 16


def meta(born, stamp=None, mass=None, pinned=None, valid=None) -> SlotMeta:
    born = torch.tensor(born)[None, None]
    like = lambda x, default: torch.tensor(x)[None, None] if x is not None else default  # noqa: E731
    return SlotMeta(born=born, stamp=like(stamp, born * PAGE), mass=like(mass, torch.zeros(born.shape)),
                    pinned=like(pinned, torch.zeros_like(born, dtype=torch.bool)),
                    valid=like(valid, torch.ones_like(born, dtype=torch.bool)))


# ---- each rule against a direct computation -------------------------------------------------------

def test_raas_evicts_the_oldest_timestamp_unpinned_page():
    m = meta(born=[0, 1, 2, 3, 4], stamp=[0, 40, 17, 17, 70], pinned=[True, False, False, False, False])
    assert RaaS(budget=80).victim(m, torch.tensor([5])).item() == 2  # stamps 17 tie: the older page goes
    m = meta(born=[0, 1, 2, 3], stamp=[0, 5, 9, 3], pinned=[True, True, False, False], valid=[True, True, True, True])
    assert RaaS(budget=64).victim(m, torch.tensor([4])).item() == 3
    m = meta(born=[0, 1, 2, 3], stamp=[0, 5, 1, 3], valid=[True, True, False, True])
    assert RaaS(budget=64).victim(m, torch.tensor([4])).item() == 0  # empty slots are never victims


def test_raas_refreshes_exactly_the_top_half_by_bound():
    torch.manual_seed(0)
    budget_pages = 8
    born = torch.arange(10)
    m = SlotMeta(born=born.expand(2, 3, 10), stamp=(born * PAGE).expand(2, 3, 10).clone(), mass=torch.zeros(2, 3, 10),
                 pinned=torch.zeros(2, 3, 10, dtype=torch.bool), valid=torch.ones(2, 3, 10, dtype=torch.bool))
    m.valid[1, :, 9] = False
    bound = torch.randn(2, 3, 10)
    bound[1, :, 9] = float("-inf")
    stamp, _ = RaaS(budget=budget_pages * PAGE).update(m, bound, None, torch.tensor([500, 600]))
    for b in range(2):
        for h in range(3):
            order = sorted(range(10), key=lambda s: -bound[b, h, s].item())
            top = set(order[: budget_pages // 2])
            for s in range(10):
                expected = (500, 600)[b] if s in top and m.valid[b, h, s] else m.stamp[b, h, s].item()
                assert stamp[b, h, s].item() == expected


def test_raas_mass_refresh_uses_the_threshold():
    m = meta(born=[0, 1, 2, 3])
    stamp, _ = RaaS(budget=64, refresh="mass", refresh_threshold=0.3).update(m, None, torch.tensor([[[0.1, 0.5, 0.31, 0.09]]]), torch.tensor([99]))
    assert stamp.tolist() == [[[0, 99, 99, 48]]]


def test_quest_picks_the_brute_force_top_k_plus_the_current_page():
    torch.manual_seed(1)
    q = torch.randn(2, 6, 32)
    k_cache = torch.randn(20, 2, PAGE, 32)
    ids = torch.stack([torch.randperm(20)[:9] for _ in range(4)]).view(2, 2, 9)
    fill = torch.full((2, 2), PAGE)
    key_max, key_min = torch.empty(20, 2, 32), torch.empty(20, 2, 32)
    for p in range(20):
        for h in range(2):
            key_max[p, h], key_min[p, h] = k_cache[p, h].amax(0), k_cache[p, h].amin(0)
    bound = reference.page_scores(q, key_max, key_min, ids)
    write_slot = torch.tensor([[0, 4], [8, 2]])
    chosen = Quest(budget=4 * PAGE).select(bound, None, write_slot)
    for b in range(2):
        for h in range(2):
            scores = []
            for s in range(9):  # the bound by its definition, max over the group's 3 query heads
                M, mn = key_max[ids[b, h, s], h], key_min[ids[b, h, s], h]
                scores.append(max(torch.maximum(q[b, g] * M, q[b, g] * mn).sum().item() for g in range(3 * h, 3 * h + 3)))
            assert torch.allclose(bound[b, h], torch.tensor(scores), atol=1e-5)
            others = sorted((s for s in range(9) if s != write_slot[b, h]), key=lambda s: -scores[s])[:3]
            assert set(chosen[b, h].tolist()) == {write_slot[b, h].item(), *others}
    assert fill.sum() > 0


def test_quest_attends_at_least_three_pages():
    bound = torch.randn(1, 1, 6)
    assert Quest(budget=32).select(bound, None, torch.tensor([[5]])).shape[-1] == 3


def test_h2o_mass_is_the_sum_of_softmax_weights():
    torch.manual_seed(2)
    q = torch.randn(2, 4, 16)
    k_cache, v_cache = torch.randn(12, 2, PAGE, 16), torch.randn(12, 2, PAGE, 16)
    ids = torch.tensor([[[3, 7, -1], [1, 2, 5]], [[0, 4, 6], [8, 9, -1]]])
    fill = torch.tensor([[[16, 5, 0], [16, 16, 3]], [[16, 16, 16], [16, 1, 0]]])
    _, mass = reference.paged_decode_attention(q, k_cache, v_cache, ids, fill, 0.25, return_mass=True)
    for b in range(2):
        for h in range(2):
            keys = [(s, r) for s in range(3) if ids[b, h, s] >= 0 for r in range(fill[b, h, s])]
            expected = torch.zeros(3)
            for g in (2 * h, 2 * h + 1):
                logits = torch.stack([q[b, g] @ k_cache[ids[b, h, s], h, r] * 0.25 for s, r in keys])
                weights = logits.softmax(0)
                for (s, _), w in zip(keys, weights):
                    expected[s] += w / 2
            assert torch.allclose(mass[b, h], expected, atol=1e-6)


def test_h2o_evicts_the_lightest_page_outside_the_recent_window():
    # budget 6 pages: 3 heavy + 3 recent; the new page 6 takes one recent place, so pages 4 and 5 stay
    m = meta(born=[0, 1, 2, 3, 4, 5], mass=[0.9, 0.2, 0.4, 0.3, 0.01, 0.0])
    assert H2O(budget=6 * PAGE).victim(m, torch.tensor([6])).item() == 1
    m = meta(born=[0, 1, 2, 3, 4, 5], mass=[0.9, 0.5, 0.4, 0.3, 0.01, 0.0])
    assert H2O(budget=6 * PAGE).victim(m, torch.tensor([6])).item() == 3


def test_h2o_accumulates_the_step_mass():
    m = meta(born=[0, 1, 2], mass=[1.0, 2.0, 3.0], valid=[True, True, False])
    _, mass = H2O(budget=64).update(m, None, torch.tensor([[[0.5, 0.25, 0.25]]]), torch.tensor([40]))
    assert mass.tolist() == [[[1.5, 2.25, 3.0]]]


def test_streaming_evicts_the_oldest_non_sink_page():
    m = meta(born=[0, 7, 3, 5])
    assert StreamingLLM(budget=64).victim(m, torch.tensor([8])).item() == 2


# ---- the engine under each policy ------------------------------------------------------------------

ALL = [Dense(), RaaS(budget=1024), RaaS(budget=1024, refresh="mass"), StreamingLLM(budget=1024), H2O(budget=1024),
       Quest(budget=1024), RaaS(budget=1024, dense_layers=1)]
PROMPTS = ["The quick brown fox", "Name three primes: 2, 3, 5, 7, 11, 13. Tell me a story about a robot.", "def"]


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_every_policy_equals_dense_when_the_budget_holds_everything(kind, tiny_models):
    engine = Engine(tiny_models[kind], kv_cache_tokens=4096)
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    dense = [o.token_ids for o in engine.generate(PROMPTS, params)]
    for policy in ALL[1:]:
        engine.policy = policy
        outs = engine.generate(PROMPTS, params)
        assert [o.token_ids for o in outs] == dense, policy
        assert all(o.stats.pages_evicted == 0 for o in outs)
    assert engine.pages.all_free


def test_memory_stays_flat_under_eviction(tiny_dir):
    engine = Engine(tiny_dir, policy=RaaS(budget=64), kv_cache_tokens=4096)
    out = engine.generate(["hi"], SamplingParams(temperature=0, max_tokens=300, ignore_eos=True))[0]
    assert out.stats.peak_kv_pages == 4
    assert out.stats.peak_kv_bytes == 4 * engine.pool.page_bytes
    assert out.stats.pages_evicted == -(-300 // PAGE) - 4
    engine.policy = Dense()
    dense = engine.generate(["hi"], SamplingParams(temperature=0, max_tokens=300, ignore_eos=True))[0]
    assert dense.stats.peak_kv_pages == -(-300 // PAGE)


def test_a_huge_budget_costs_a_short_request_only_the_pages_it_holds(tiny_dir):
    """Page tables are as wide as the step's requests can ever hold, not as the budget: RaaS with a
    million-token budget on a 20-token request runs 4-slot tables, like Dense."""
    engine = Engine(tiny_dir, policy=RaaS(budget=2**20), kv_cache_tokens=4096)
    widths, decode_step = set(), engine.runner.decode_step
    engine.runner.decode_step = lambda policies, trace, steps: widths.update(s.tables.shape[2] for s in steps) or \
        decode_step(policies, trace, steps)
    out = engine.generate(["hi"], SamplingParams(max_tokens=20, ignore_eos=True))[0]
    assert out.finish_reason == "length" and widths == {4}
    assert engine.pages.all_free


def test_dense_layers_keep_every_page(tiny_dir):
    engine = Engine(tiny_dir, policy=RaaS(budget=32, pin_prompt=False, dense_layers=1), kv_cache_tokens=4096)
    seen = {}
    decode = engine.runner.decode

    def spy(groups):
        seen["pages"] = [len(p) for p in groups[0][1][0].pages]
        return decode(groups)

    engine.runner.decode = spy
    engine.generate(["hi"], SamplingParams(max_tokens=100, ignore_eos=True))
    assert seen["pages"] == [-(-100 // PAGE), 2]


def test_a_long_prompt_without_pinning_keeps_sink_and_recent_pages(tiny_dir):
    engine = Engine(tiny_dir, policy=StreamingLLM(budget=48), kv_cache_tokens=4096)
    ids = list(range(3, 3 + 90))  # 6 pages of prompt, capacity 3
    seen = {}
    decode = engine.runner.decode

    def spy(groups):
        layer0 = groups[0][1][0].pages[0]
        seen.setdefault("born", engine.pool.born[0][torch.tensor(layer0)][:, 0].tolist())
        return decode(groups)

    engine.runner.decode = spy
    out = engine.generate([ids], SamplingParams(max_tokens=3, ignore_eos=True))[0]
    assert seen["born"] == [0, 4, 5]
    assert out.stats.peak_kv_pages == 6 and out.stats.pages_evicted == 3
    assert engine.pages.all_free


# ---- invariants under random runs ------------------------------------------------------------------

def policy_strategy():
    budget = st.sampled_from([32, 48, 64, 96])
    return st.one_of(
        st.builds(RaaS, budget=budget, pin_prompt=st.booleans(), refresh=st.sampled_from(["bound", "mass"]),
                  dense_layers=st.sampled_from([0, 1])),
        st.builds(StreamingLLM, budget=budget), st.builds(H2O, budget=budget), st.builds(Quest, budget=budget),
        st.just(Dense()))


@pytest.fixture(scope="module")
def checked_engine(tiny_models):
    return Engine(tiny_models["qwen2"], kv_cache_tokens=2048, max_batch=3)


def run_mixed(engine, prompts, policies, params) -> list:
    """Each prompt under its policy, all through add_request/step: per prompt (token ids, stats) or the
    LemmaError add_request raised."""
    results: list = []
    index = {}
    for prompt, policy in zip(prompts, policies):
        try:
            index[engine.add_request(prompt, params, policy=policy)] = len(results)
            results.append(([], None))
        except LemmaError as exc:
            results.append(exc)
    while engine.has_unfinished():
        for out in engine.step():
            tokens, _ = results[index[out.request_id]]
            tokens += out.token_ids
            if out.finished:
                assert out.finish_reason == "length", out.error
                results[index[out.request_id]] = (tokens, out.stats)
    return results


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(policies=st.lists(policy_strategy(), min_size=1, max_size=3),
       prompt_lens=st.lists(st.integers(1, 70), min_size=1, max_size=4),
       max_tokens=st.integers(1, 60), seed=st.integers(0, 1000))
def test_invariants_under_random_runs(checked_engine, policies, prompt_lens, max_tokens, seed):
    """Requests under one to three policies (request i under policies[i % n]) decode in shared steps."""
    engine = checked_engine
    pool = engine.pool
    rng = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, engine.config.vocab_size, (n,), generator=rng).tolist() for n in prompt_lens]
    last_stamp: dict[tuple[int, int, int, int], tuple[int, int]] = {}
    written: list[torch.Tensor] = []
    ops = engine.runner.ops
    store, attend, decode = ops.store_decode, ops.paged_decode_attention, engine.runner.decode

    def spy_store(k_cache, v_cache, k, v, page_ids, *rest):
        written.append(page_ids)
        return store(k_cache, v_cache, k, v, page_ids, *rest)

    def spy_attend(q, k_cache, v_cache, page_ids, fill, scale, return_mass=False, listed=None):
        current = written[-1]  # the page this layer (and slice) just wrote is always attended
        padded = current == pool.scratch  # a padded row writes the scratch page and attends nothing
        assert ((page_ids == current[..., None]).any(-1) | padded).all()
        return attend(q, k_cache, v_cache, page_ids, fill, scale, return_mass, listed=listed)

    def checked_decode(groups):
        logits = decode(groups)
        seqs = [seq for _, group in groups for seq in group]
        for policy, group in groups:  # tables fill front to back: the Triton kernel walks logical + 1 slots
            state = engine.runner.states[policy]
            for s in group:
                logical = (s.num_tokens - 1) // PAGE  # the page this step wrote
                assert (state.tables[:, state.rows.index(s.uid), logical + 1 :] == -1).all(), "a page past listed"
        for layer in range(pool.num_layers):
            held = [p for s in seqs for p in s.pages[layer]]
            for s in seqs:
                assert len(s.pages[layer]) == len(set(s.pages[layer])), "a page listed twice"
            shared = {p for p in held if held.count(p) > 1}
            assert all(engine.pages.cache.holds(layer, p) for p in shared), "an uncached page is shared"
            assert not set(held) & set(engine.pages.free[layer]), "a held page is also free"
            for s in seqs:
                assert len(s.pages[layer]) <= s.capacity[layer], "resident pages above the reservation"
                prompt_pages = -(-len(s.prompt_ids) // PAGE)
                ids = torch.tensor(s.pages[layer])
                born = pool.born[layer][ids]  # [pages, Hkv]
                pol = s.policy
                if isinstance(pol, RaaS) and pol.pin_prompt and pol.sparse(layer):
                    for h in range(born.shape[1]):  # pinned prompt pages are all still there
                        assert set(range(prompt_pages)) <= set(born[:, h].tolist())
                stamp = pool.stamp[layer][ids]
                for i, page in enumerate(s.pages[layer]):
                    for h in range(born.shape[1]):
                        if pool.pinned[layer][page, h]:
                            continue  # a pinned page's stamp is never read (and a shared one is written by all)
                        key, now = (s.uid, layer, page, h), (born[i, h].item(), stamp[i, h].item())
                        if key in last_stamp and last_stamp[key][0] == now[0]:
                            assert now[1] >= last_stamp[key][1], "a timestamp went back"
                        last_stamp[key] = now
        return logits

    ops.store_decode, ops.paged_decode_attention, engine.runner.decode = spy_store, spy_attend, checked_decode
    try:
        params = SamplingParams(temperature=0.8, max_tokens=max_tokens, ignore_eos=True, seed=seed)
        outs = run_mixed(engine, prompts, [policies[i % len(policies)] for i in range(len(prompts))], params)
    finally:
        ops.store_decode, ops.paged_decode_attention, engine.runner.decode = store, attend, decode
    assert written or max_tokens == 1 or all(isinstance(o, LemmaError) for o in outs)  # the spies saw the steps
    for i, (out, n) in enumerate(zip(outs, prompt_lens)):
        policy = policies[i % len(policies)]
        if isinstance(out, LemmaError):
            assert "pin_prompt=False" in str(out)
        else:
            tokens, stats = out
            assert len(tokens) == max_tokens
            if policy.evicts:
                assert stats.peak_kv_pages <= max(-(-n // PAGE), policy.budget_pages) or policy.dense_layers
    assert engine.pages.all_free


# ---- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("make, message", [
    (lambda: make_policy("lru", 512), "unknown policy 'lru'; known: dense, raas, raas-capped, streaming, h2o, quest, random"),
    (lambda: RaaS(budget=16), "raas budget must be at least 2 pages (32 tokens), got 16"),
    (lambda: H2O(budget=500), "h2o budget must be a multiple of the page size 16, got 500 (use 496 or 512)"),
    (lambda: Quest(budget=512, dense_layers=-1), "dense_layers must be an integer >= 0, got -1"),
    (lambda: RaaS(budget=512, refresh="lru"), "raas refresh must be 'bound', 'mass' or 'ema', got 'lru'"),
    (lambda: make_policy("dense", 512), "dense keeps every page and takes no budget"),
])
def test_bad_policies(make, message):
    with pytest.raises(LemmaError) as info:
        make()
    assert str(info.value) == message


def test_one_spec_parser_for_text_and_json():
    from lemma.engine.policies import POLICIES, policy_from_spec, policy_help

    for name, cls in POLICIES.items():  # every policy, with every option it has, is reachable by spec
        assert type(policy_from_spec(name, 256)) is cls and name in policy_help()
    text = policy_from_spec("raas-capped:budget=512:recent=1", 1024, {"pin_prompt": False, "seed": 4})
    assert text == policy_from_spec({"name": "raas-capped", "budget": 512, "recent": 1}, defaults={"pin_prompt": False})
    assert text.describe() == "raas-capped-512(pin_prompt=False,recent=1)"  # seed is not a raas option: not applied
    assert policy_from_spec("random", 128, {"pin_prompt": False}).describe() == "random-128(pin_prompt=False)"
    assert policy_from_spec("dense", 128, {"dense_layers": 0}) == Dense()
    for spec, message in [("lru", "unknown policy 'lru'"), ({"budget": 64}, "a policy needs a name"),
                          ("quest:topk=4", "quest has no option 'topk'"), ("", "a policy spec must be a name")]:
        with pytest.raises(LemmaError, match=message):
            policy_from_spec(spec, 256)


def test_prompt_longer_than_the_raas_budget(tiny_dir):
    engine = Engine(tiny_dir, policy=RaaS(budget=32), kv_cache_tokens=1024)
    out = engine.generate([list(range(3, 40))], SamplingParams(max_tokens=50))[0]
    assert out.finish_reason == "error"
    assert out.error == ("prompt of 37 tokens (3 pages) does not fit the raas budget of 32 tokens with the prompt "
                         "pinned; use a budget of at least 64 or pin_prompt=False (--no-pin-prompt)")
    engine.policy = RaaS(budget=32, pin_prompt=False)
    assert engine.generate([list(range(3, 40))], SamplingParams(max_tokens=50, ignore_eos=True))[0].finish_reason == "length"
