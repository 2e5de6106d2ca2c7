"""The request-level engine: add_request / step / abort from several threads, preemption and recompute,
chunked prefill interleaved with decode, per-request policies, bounded waits, every page back."""

import asyncio
import threading
import time

import pytest

from lemma import Dense, Engine, LemmaError, Quest, RaaS, SamplingParams, StreamingLLM
from lemma.engine.async_engine import AsyncEngine

GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
PROMPTS = [f"story {i}: once upon a time there was" for i in range(4)]


def run_to_end(engine: Engine, limit: int = 10_000) -> list:
    outputs, steps = [], 0
    while engine.has_unfinished():
        outputs += engine.step()
        steps += 1
        assert steps < limit, "the loop does not finish"
    return outputs


def joined(outputs: list, request_id: str) -> list[int]:
    return [t for o in outputs if o.request_id == request_id for t in o.token_ids]


def in_thread(fn, timeout: float = 120.0):
    """Run fn in a thread and return its result; fail (rather than hang) if it does not finish."""
    result: dict = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "blocked: the call did not return"
    if "error" in result:
        raise result["error"]
    return result["value"]


def test_add_step_equals_generate(tiny_dir):
    engine = Engine(tiny_dir, kv_cache_tokens=1024)
    alone = engine.generate(PROMPTS, GREEDY)
    ids = [engine.add_request(p, GREEDY) for p in PROMPTS]
    outputs = run_to_end(engine)
    for rid, out in zip(ids, alone):
        assert joined(outputs, rid) == out.token_ids
        last = [o for o in outputs if o.request_id == rid][-1]
        assert last.finish_reason == "length" and last.stats.generated_tokens == 40 and last.stats.ttft_seconds > 0
        assert "".join(o.text for o in outputs if o.request_id == rid) == out.text
    assert not engine.has_unfinished() and engine.pages.all_free


def test_request_ids_and_bad_requests_fail_at_once(tiny_dir):
    engine = Engine(tiny_dir, kv_cache_tokens=64)
    assert engine.add_request("hello", SamplingParams(max_tokens=4), request_id="a") == "a"
    with pytest.raises(LemmaError, match="request id 'a' is already in use"):
        engine.add_request("hello", SamplingParams(max_tokens=4), request_id="a")
    with pytest.raises(LemmaError, match="the whole pool holds 64"):
        engine.add_request("hello", SamplingParams(max_tokens=100))
    with pytest.raises(LemmaError, match="prompt is empty"):
        engine.add_request("")
    with pytest.raises(LemmaError, match="policy must be a lemma policy"):
        engine.add_request("hello", SamplingParams(max_tokens=4), policy="raas")
    run_to_end(engine)
    assert engine.add_request("hello", SamplingParams(max_tokens=4), request_id="a") == "a"  # free again
    run_to_end(engine)
    assert engine.pages.all_free


def test_abort_waiting_and_running(tiny_dir):
    engine = Engine(tiny_dir, kv_cache_tokens=1024, max_batch=1)
    first, second = (engine.add_request(p, GREEDY) for p in PROMPTS[:2])
    outputs = engine.step() + engine.step()  # first is running, second waits behind max_batch=1
    engine.abort(first)
    engine.abort(second)
    engine.abort("no-such-request")
    outputs += run_to_end(engine)
    finals = {o.request_id: o for o in outputs if o.finished}
    assert finals[first].finish_reason == finals[second].finish_reason == "abort"
    assert joined(outputs, second) == [] and len(joined(outputs, first)) == 2
    assert engine.pages.all_free


def test_add_and_abort_from_another_thread_while_stepping(tiny_dir):
    engine = Engine(tiny_dir, kv_cache_tokens=2048)
    alone = {p: engine.generate([p], GREEDY)[0].token_ids for p in PROMPTS}
    outputs: list = []
    done = threading.Event()

    def stepper():
        while not done.is_set() or engine.has_unfinished():
            outputs.extend(engine.step())  # an idle step returns nothing
            time.sleep(0.001)

    thread = threading.Thread(target=stepper, daemon=True)
    thread.start()
    ids = {}
    for i, prompt in enumerate(PROMPTS * 2):
        ids[engine.add_request(prompt, GREEDY)] = prompt
        if i % 2:
            engine.abort(list(ids)[-2])  # abort the request added just before, wherever it is now
        time.sleep(0.01)
    done.set()
    thread.join(120)
    assert not thread.is_alive()
    finals = {o.request_id: o.finish_reason for o in outputs if o.finished}
    assert set(finals) == set(ids)
    for rid, prompt in ids.items():
        if finals[rid] == "length":
            assert joined(outputs, rid) == alone[prompt]
        else:
            assert finals[rid] == "abort" and joined(outputs, rid) == alone[prompt][: len(joined(outputs, rid))]
    assert list(finals.values()).count("abort") == 4
    assert engine.pages.all_free


def test_two_threads_generate_on_one_small_pool(tiny_dir):
    engine = Engine(tiny_dir, kv_cache_tokens=128)  # 8 pages: the two requests cannot all run at full length
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    alone = [engine.generate([p], params)[0].token_ids for p in PROMPTS[:2]]
    results: dict = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, engine.generate([PROMPTS[i]], params)[0]))
               for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert [results[i].token_ids for i in range(2)] == alone
    assert engine.pages.all_free


def test_paused_stream_does_not_block_generate(tiny_dir):
    """A paused stream holds pages; generate on a tiny pool steps both until they finish instead of
    spinning forever."""
    engine = Engine(tiny_dir, kv_cache_tokens=64)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    stream = engine.stream("Tell me", params)
    first = next(stream)
    out = in_thread(lambda: engine.generate(["Hello there"], params)[0])
    assert out.finish_reason == "length" and len(out.token_ids) == 30
    rest = list(stream)  # the stream's reply was computed meanwhile, nothing is lost
    assert len(first.token_ids) + sum(len(c.token_ids) for c in rest) == 30
    assert engine.pages.all_free


@pytest.mark.parametrize("policy", [Dense(), RaaS(budget=64)])
def test_preemption_resumes_with_identical_output(tiny_dir, policy):
    """Dense grows on demand: on a pool too small for all, the newest is preempted and recomputed
    later from prompt + generated tokens, with the same greedy tokens as an unpreempted run. Evicting
    policies reserve their budget and are never preempted."""
    params = SamplingParams(temperature=0, max_tokens=70, ignore_eos=True)
    big = Engine(tiny_dir, kv_cache_tokens=4096, policy=policy)
    alone = [big.generate([p], params)[0].token_ids for p in PROMPTS[:3]]
    small = Engine(tiny_dir, kv_cache_tokens=16 * 14, policy=policy)  # 14 pages; each request ends at 6
    outs = in_thread(lambda: small.generate(PROMPTS[:3], params))
    assert [o.token_ids for o in outs] == alone
    preemptions = sum(o.stats.preemptions for o in outs)
    assert preemptions > 0 if policy == Dense() else preemptions == 0
    assert small.pages.all_free


def test_resume_on_other_pages_after_other_requests_left(tiny_dir):
    """A Dense request preempts itself while RaaS requests hold the pool; one of them finishes, and the
    Dense request resumes on the pages it left behind (other page ids than before): still the same
    tokens, and the RaaS requests are undisturbed."""
    params = {"d": SamplingParams(temperature=0, max_tokens=100, ignore_eos=True),
              "r1": SamplingParams(temperature=0, max_tokens=80, ignore_eos=True),
              "r2": SamplingParams(temperature=0, max_tokens=150, ignore_eos=True)}
    policies = {"d": Dense(), "r1": RaaS(budget=64), "r2": RaaS(budget=64)}
    alone = {rid: Engine(tiny_dir, kv_cache_tokens=4096, policy=policies[rid]).generate([PROMPTS[0]], params[rid])[0]
             for rid in params}
    engine = Engine(tiny_dir, kv_cache_tokens=16 * 12)  # 12 pages: two RaaS budgets leave 4 for Dense
    for rid in ("r1", "r2", "d"):
        engine.add_request(PROMPTS[0], params[rid], policy=policies[rid], request_id=rid)
    outputs = run_to_end(engine)
    finals = {o.request_id: o for o in outputs if o.finished}
    assert finals["d"].stats.preemptions == 1
    for rid in params:
        assert joined(outputs, rid) == alone[rid].token_ids, rid
    assert engine.pages.all_free


def test_quest_grows_on_demand_and_survives_preemption(tiny_dir):
    params = SamplingParams(temperature=0, max_tokens=70, ignore_eos=True)
    small = Engine(tiny_dir, kv_cache_tokens=16 * 14, policy=Quest(budget=48))
    outs = in_thread(lambda: small.generate(PROMPTS[:3], params))
    assert all(o.finish_reason == "length" and len(o.token_ids) == 70 for o in outs)
    assert sum(o.stats.preemptions for o in outs) > 0 and small.pages.all_free


def test_sampled_request_resumes_identically_after_preemption(tiny_dir):
    params = [SamplingParams(temperature=0.9, top_p=0.95, max_tokens=70, ignore_eos=True, seed=s) for s in (1, 2, 3)]
    alone = [Engine(tiny_dir, kv_cache_tokens=4096).generate([p], q)[0].token_ids for p, q in zip(PROMPTS, params)]
    small = Engine(tiny_dir, kv_cache_tokens=16 * 14)
    outs = small.generate(PROMPTS[:3], params)
    assert sum(o.stats.preemptions for o in outs) > 0
    assert [o.token_ids for o in outs] == alone


def test_long_prompt_prefills_in_chunks_while_others_decode(tiny_dir):
    engine = Engine(tiny_dir, kv_cache_tokens=4096, prefill_chunk=64)
    long_prompt = list(range(5, 305))  # 300 tokens: at least 5 steps of prefill at 64 tokens a step
    alone_long = engine.generate([long_prompt], GREEDY)[0].token_ids
    alone_short = engine.generate([PROMPTS[0]], GREEDY)[0].token_ids
    engine.pages.clear_cache()  # the runs alone left their pages cached: prefill again
    short = engine.add_request(PROMPTS[0], GREEDY)
    outputs = engine.step()  # the short prompt prefills and samples its first token
    long = engine.add_request(long_prompt, GREEDY)
    per_step = []
    while engine.has_unfinished():
        step = engine.step()
        per_step.append({o.request_id for o in step})
        outputs += step
    before_first_long = per_step[: next(i for i, ids in enumerate(per_step) if long in ids)]
    assert len(before_first_long) >= 4 and all(short in ids for ids in before_first_long)
    assert joined(outputs, long) == alone_long and joined(outputs, short) == alone_short
    assert engine.pages.all_free


def test_several_prompts_share_one_prefill_forward(tiny_dir):
    engine = Engine(tiny_dir, kv_cache_tokens=2048)
    calls = []
    prefill = engine.runner.prefill
    engine.runner.prefill = lambda chunks, **kw: calls.append(len(chunks)) or prefill(chunks, **kw)
    outs = engine.generate(PROMPTS, GREEDY)
    assert calls == [len(PROMPTS)]
    engine.runner.prefill = prefill
    assert [o.token_ids for o in outs] == [o.token_ids for o in (engine.generate([p], GREEDY)[0] for p in PROMPTS)]


def test_requests_with_different_policies_share_the_engine(tiny_dir):
    policies = [Dense(), RaaS(budget=64), StreamingLLM(budget=64), RaaS(budget=64)]
    params = SamplingParams(temperature=0, max_tokens=80, ignore_eos=True)
    alone = []
    for prompt, policy in zip(PROMPTS, policies):
        alone.append(Engine(tiny_dir, kv_cache_tokens=2048, policy=policy).generate([prompt], params)[0])
    engine = Engine(tiny_dir, kv_cache_tokens=2048)
    ids = [engine.add_request(p, params, policy=pol) for p, pol in zip(PROMPTS, policies)]
    outputs = run_to_end(engine)
    for rid, out in zip(ids, alone):
        assert joined(outputs, rid) == out.token_ids
        final = [o for o in outputs if o.request_id == rid][-1]
        assert final.stats.policy == out.stats.policy and final.stats.peak_kv_pages == out.stats.peak_kv_pages
    assert sorted(engine.runner.states, key=str) == sorted(set(policies), key=str)  # one step state per policy
    assert engine.pages.all_free


def test_async_engine_streams_and_aborts(tiny_dir):
    engine = Engine(tiny_dir, kv_cache_tokens=1024)
    alone = engine.generate(PROMPTS[:2], GREEDY)
    async_engine = AsyncEngine(engine)

    async def main():
        async def collect(prompt):
            return [o async for o in async_engine.submit(prompt, GREEDY)]

        full = await asyncio.gather(*(collect(p) for p in PROMPTS[:2]))
        stream = async_engine.submit(PROMPTS[2], SamplingParams(temperature=0, max_tokens=500, ignore_eos=True))
        async for _ in stream:
            break
        await stream.aclose()  # leaving early aborts
        async_engine.submit(PROMPTS[3], SamplingParams(temperature=0, max_tokens=500, ignore_eos=True))  # dropped unread
        return full

    try:
        full = asyncio.run(asyncio.wait_for(main(), 120))
        deadline = time.time() + 30
        while engine.has_unfinished() and time.time() < deadline:
            time.sleep(0.01)
        assert [[t for o in outs for t in o.token_ids] for outs in full] == [o.token_ids for o in alone]
        assert all(outs[-1].finish_reason == "length" for outs in full)
        assert engine.pages.all_free
        steps = []
        step = engine.step
        engine.step = lambda: steps.append(1) or step()
        time.sleep(0.3)
        assert not steps, "an idle engine loop must not step"
        engine.step = step
    finally:
        async_engine.close()


def test_async_engine_takes_int_request_ids_and_nothing_after_close(tiny_dir):
    """A request id given as an int is str(id) everywhere (submit, its outputs, abort); submit after close
    raises; closing twice is fine."""
    engine = Engine(tiny_dir, kv_cache_tokens=1024)
    async_engine = AsyncEngine(engine)

    async def main():
        outputs = [o async for o in async_engine.submit("hello", SamplingParams(max_tokens=3, ignore_eos=True), request_id=7)]
        stream = async_engine.submit("hello", SamplingParams(max_tokens=500, ignore_eos=True), request_id=8)
        first = await stream.__anext__()
        async_engine.abort(8)
        rest = [o async for o in stream]
        return outputs, first, rest

    try:
        outputs, first, rest = asyncio.run(asyncio.wait_for(main(), 60))
        assert {o.request_id for o in outputs} == {"7"} and outputs[-1].finish_reason == "length"
        assert first.request_id == "8" and rest[-1].finish_reason == "abort"
    finally:
        async_engine.close()
    async_engine.close()  # again: nothing happens

    async def late():
        async_engine.submit("hello", SamplingParams(max_tokens=3))

    with pytest.raises(LemmaError, match="^this AsyncEngine is closed; it takes no more requests$"):
        asyncio.run(late())
    assert engine.pages.all_free and not engine.has_unfinished()
