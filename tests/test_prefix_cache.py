"""The prefix cache and the page owner: a cached request equals an uncached one token for token (Dense,
Quest, pinned RaaS), only pages nobody can evict are shared, chat turns prefill only their new tokens,
concurrent requests with one prompt share it, and references never leak (random op sequences)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lemma import Dense, Engine, Quest, RaaS, SamplingParams, StreamingLLM
from lemma.engine.pages import PageOwner

PAGE = 16
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def system_prompt(engine: Engine, tokens: int, seed: int = 0) -> list[int]:
    rng = torch.Generator().manual_seed(seed)
    return torch.randint(0, engine.config.vocab_size, (tokens,), generator=rng).tolist()


def check_references(engine: Engine) -> None:
    """Each page's count is the number of running sequences holding it; free, idle and held add up."""
    pages = engine.pages
    running = engine.scheduler.running
    for layer in range(pages.num_layers):
        held: dict[int, int] = {}
        for seq in running:
            for page in seq.pages[layer]:
                held[page] = held.get(page, 0) + 1
        assert all(pages.refs[layer][p] == n for p, n in held.items())
        assert sum(pages.refs[layer]) == sum(held.values())
        free = pages.free[layer]
        assert len(free) == len(set(free)) and not set(free) & set(held)
        idle = [p for p in range(pages.num_pages) if pages.refs[layer][p] == 0 and pages.cache.holds(layer, p)]
        assert len(idle) == pages.idle[layer] and not set(idle) & set(free)
        assert len(free) + len(idle) + len(held) == pages.num_pages
        assert pages.reserved[layer] == sum(seq.reserved[layer] for seq in running)
        for p in held:  # a page two sequences hold is a cached one
            if held[p] > 1:
                assert pages.cache.holds(layer, p)


def test_shared_system_prompt_equals_uncached_under_dense_quest_and_pinned_raas(tiny_dir):
    cached = Engine(tiny_dir, kv_cache_tokens=2048)
    plain = Engine(tiny_dir, kv_cache_tokens=2048, prefix_cache=False)
    shared = system_prompt(cached, 70)  # 4 full pages and a part
    prompts = [shared + [5 + i, 9, 11 + i] for i in range(3)]
    for policy in (Dense(), Quest(budget=64), RaaS(budget=128), RaaS(budget=128, dense_layers=1)):
        cached.policy = plain.policy = policy
        cached.pages.clear_cache()
        outs = [cached.generate([p], GREEDY)[0] for p in prompts]
        want = plain.generate(prompts, GREEDY)
        assert [o.token_ids for o in outs] == [o.token_ids for o in want], policy.describe()
        assert outs[0].stats.cached_tokens == 0
        assert [o.stats.cached_tokens for o in outs[1:]] == [4 * PAGE, 4 * PAGE], policy.describe()
        assert all(o.stats.cached_tokens == 0 for o in want)
        assert cached.pages.all_free and plain.pages.all_free
    stats = cached.prefix_cache_stats()
    assert stats["hits"] >= 8 and stats["cached_tokens"] >= 8 * 4 * PAGE and stats["cached_pages"] > 0


def test_pages_an_evicting_policy_may_overwrite_are_never_shared(tiny_dir):
    engine = Engine(tiny_dir, kv_cache_tokens=2048)
    prompt = system_prompt(engine, 70)
    for policy in (StreamingLLM(budget=64), RaaS(budget=256, pin_prompt=False)):
        engine.policy = policy
        engine.pages.clear_cache()
        outs = [engine.generate([prompt + [i]], GREEDY)[0] for i in range(2)]
        assert [o.stats.cached_tokens for o in outs] == [0, 0], policy.describe()
        assert len(engine.pages.cache) == 0
    # a Dense page carries no pin: pinned RaaS does not read it (its key differs), Quest does
    engine.policy = Dense()
    engine.generate([prompt], GREEDY)
    engine.policy = RaaS(budget=256)
    assert engine.generate([prompt + [1]], GREEDY)[0].stats.cached_tokens == 0
    engine.policy = Quest(budget=64)
    assert engine.generate([prompt + [2]], GREEDY)[0].stats.cached_tokens == 4 * PAGE


def test_a_whole_cached_prompt_still_prefills_its_last_page(tiny_dir):
    engine = Engine(tiny_dir, kv_cache_tokens=1024)
    prompt = system_prompt(engine, 4 * PAGE)
    first, again = (engine.generate([prompt], GREEDY)[0] for _ in range(2))
    assert again.stats.cached_tokens == 3 * PAGE and again.token_ids == first.token_ids


@pytest.mark.parametrize("policy", [Dense(), RaaS(budget=512)], ids=["dense", "pinned-raas"])
def test_chat_turns_prefill_only_their_new_tokens(tiny_dir, policy):
    """Dense keeps every page of a turn (its reply's too); pinned RaaS keeps the pinned prompt of the last
    turn, so a turn prefills the previous reply and its own message. Either way a turn equals a fresh run."""
    engine = Engine(tiny_dir, kv_cache_tokens=4096, policy=policy)
    fresh = Engine(tiny_dir, kv_cache_tokens=4096, prefix_cache=False, policy=policy)
    params = SamplingParams(temperature=0, max_tokens=20)
    messages = [{"role": "system", "content": "You answer briefly. " * 8}]
    for turn in range(3):
        messages.append({"role": "user", "content": f"question number {turn}: what comes next in 1 2 3?"})
        out = engine.chat(messages, params)
        assert out.token_ids == fresh.chat(messages, params).token_ids
        prompt = len(out.prompt_token_ids)
        if turn:  # the full pages of the earlier turn's prompt came from the cache (the tiny model's reply
            # text does not encode back to its tokens; the demo model's does, bench/prefix_cache.py)
            assert out.stats.cached_tokens >= (previous - 1) // PAGE * PAGE, (out.stats.cached_tokens, previous)
        previous = prompt
        messages.append({"role": "assistant", "content": out.text})
    assert engine.pages.all_free


def test_dense_leaves_its_reply_pages_for_the_next_turn(tiny_dir):
    engine = Engine(tiny_dir, kv_cache_tokens=2048)
    first = system_prompt(engine, 37)
    reply = engine.generate([first], GREEDY)[0].token_ids
    turn = first + reply + [7, 8, 9]
    out = engine.generate([turn], GREEDY)[0]
    assert out.stats.cached_tokens == (len(first) + len(reply) - 1) // PAGE * PAGE  # all but the unfed last token
    assert out.token_ids == Engine(tiny_dir, kv_cache_tokens=2048, prefix_cache=False).generate([turn], GREEDY)[0].token_ids


def test_requests_with_one_prompt_at_once_share_it(tiny_dir):
    engine = Engine(tiny_dir, kv_cache_tokens=2048)
    prompt = system_prompt(engine, 100)
    outs = engine.generate([prompt] * 3, SamplingParams(temperature=0.8, max_tokens=12, seed=3))
    assert sorted(o.stats.cached_tokens for o in outs) == [0, 6 * PAGE, 6 * PAGE]
    alone = Engine(tiny_dir, kv_cache_tokens=2048, prefix_cache=False)
    assert outs[0].token_ids == alone.generate([prompt], SamplingParams(temperature=0.8, max_tokens=12, seed=3))[0].token_ids
    assert engine.pages.all_free


def test_cached_pages_give_way_when_the_pool_needs_them(tiny_dir):
    engine = Engine(tiny_dir, kv_cache_tokens=20 * PAGE)  # room for about two of these requests
    prompts = [system_prompt(engine, 8 * PAGE, seed) for seed in range(4)]
    for prompt in prompts:
        assert engine.generate([prompt], GREEDY)[0].finish_reason == "length"
        check_references(engine)
    stats = engine.prefix_cache_stats()
    assert stats["evicted_pages"] > 0 and stats["cached_pages"] <= 20
    # the most recent prompt is still cached, the first one is gone
    assert engine.generate([prompts[-1]], GREEDY)[0].stats.cached_tokens == 7 * PAGE
    assert engine.generate([prompts[0]], GREEDY)[0].stats.cached_tokens == 0
    assert engine.pages.all_free


def test_teacher_forcing_and_logits_leave_the_cache_alone(tiny_dir):
    engine = Engine(tiny_dir, kv_cache_tokens=2048)
    prompt = system_prompt(engine, 50)
    engine.teacher_force([prompt], [[1, 2, 3]])
    engine.logits(prompt)
    assert len(engine.pages.cache) == 0 and engine.pages.all_free


def test_page_owner_refuses_what_it_cannot_promise():
    owner = PageOwner(num_layers=2, num_pages=4, page_size=PAGE)
    assert owner.available(0) == 4 and owner.can_reserve([4, 4]) and not owner.can_reserve([5, 0])


OPS = st.lists(st.tuples(st.sampled_from(["add", "add", "add", "abort", "step", "step", "step"]),
                         st.integers(0, 3), st.integers(1, 49)), min_size=1, max_size=30)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS, policy=st.sampled_from([Dense(), RaaS(budget=64), Quest(budget=48), StreamingLLM(budget=48)]))
def test_references_never_leak_under_random_requests_aborts_and_preemption(tiny_dir, ops, policy):
    """Requests sharing one of a few prefixes, added, aborted and stepped in random order on a pool small
    enough to preempt; after every step the counts match what the running sequences hold."""
    engine = _small_engine(tiny_dir)
    engine.policy = policy
    prefixes = [system_prompt(engine, 40, seed) for seed in range(2)]
    ids: list[str] = []
    for op, which, size in ops:
        if op == "add":
            prompt = prefixes[which % 2][: 20 + size % 20] + [which, size]  # <= 7 pages with its reply
            ids.append(engine.add_request(prompt, SamplingParams(temperature=0.7, max_tokens=20 + size, ignore_eos=True, seed=size)))
        elif op == "abort" and ids:
            engine.abort(ids[which % len(ids)])
        else:
            for _ in range(size % 12 + 1):
                engine.step()
                check_references(engine)
    while engine.has_unfinished():  # the rest run to their end, preempting each other on the way
        engine.step()
        check_references(engine)
    assert engine.pages.all_free


_ENGINES: dict = {}


def _small_engine(tiny_dir) -> Engine:
    if "small" not in _ENGINES:
        _ENGINES["small"] = Engine(tiny_dir, kv_cache_tokens=8 * PAGE, max_batch=4, prefill_chunk=32)
    return _ENGINES["small"]
