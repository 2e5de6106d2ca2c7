"""Batched generation against transformers' greedy generate, pages accounting, streaming, seeds."""

import pytest
import torch
import transformers
from transformers import GenerationConfig

from conftest import TINY_CONFIGS
from lemma import Engine, SamplingParams

PROMPTS = [
    "The quick brown fox",
    "Name three primes: 2, 3, 5, 7, 11, 13. Tell me a story about a robot and a dog and a fox, please.",
    "def",
]


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    config = GenerationConfig(max_new_tokens=n, min_new_tokens=0, do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generation_config.eos_token_id = None  # run all n tokens, as ignore_eos does
    out = model.generate(torch.tensor([ids]), generation_config=config)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("kind", list(TINY_CONFIGS))
def test_greedy_batch_matches_transformers(kind, tiny_models):
    engine = Engine(tiny_models[kind], kv_cache_tokens=1024)
    outs = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_models[kind]).eval()
    for prompt, out in zip(PROMPTS, outs):
        ids = engine.tokenizer.encode(prompt)
        assert out.prompt_token_ids == ids
        assert out.token_ids == hf_greedy(hf, ids, 64), prompt
        assert out.finish_reason == "length"
        assert out.stats.generated_tokens == 64 and out.stats.prompt_tokens == len(ids)
        assert out.stats.peak_kv_pages == engine.pool.pages_for(len(ids) + 63)
        assert out.stats.peak_kv_bytes == out.stats.peak_kv_pages * engine.pool.page_bytes
        assert out.stats.decode_tokens_per_second > 0 and out.stats.prefill_seconds > 0
    assert engine.pages.all_free


def test_batch_larger_than_max_batch_and_pool_waits(tiny_dir):
    """More requests than fit at once: they queue, run as room frees, and match a one-by-one run."""
    engine = Engine(tiny_dir, kv_cache_tokens=160, max_batch=2)  # 10 pages: two requests at a time
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompts = [f"story {i}: once upon a time" for i in range(5)]
    batched = engine.generate(prompts, params)
    single = [engine.generate([p], params)[0] for p in prompts]
    assert [o.token_ids for o in batched] == [o.token_ids for o in single]
    assert engine.pages.all_free


def test_failing_request_does_not_disturb_the_batch(tiny_dir):
    engine = Engine(tiny_dir, kv_cache_tokens=256)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    alone = engine.generate(["The quick brown fox"], params)[0]
    outs = engine.generate(["The quick brown fox", "", [1, 2, 10**6], "x " * 300], params)
    assert outs[0].token_ids == alone.token_ids and outs[0].finish_reason == "length"
    assert [o.finish_reason for o in outs[1:]] == ["error"] * 3
    assert "prompt is empty" in outs[1].error
    assert "outside the vocabulary" in outs[2].error
    assert "the whole pool holds 256" in outs[3].error
    assert engine.pages.all_free


def test_a_request_whose_sampling_or_text_fails_fails_alone(tiny_dir, monkeypatch):
    """A step where sampling one request raises (a value the sampler cannot take) or where its text
    cannot be made fails that request only; the others in the same steps go on, token for token."""
    engine = Engine(tiny_dir, kv_cache_tokens=1024)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    alone = engine.generate(["The quick brown fox"], params)[0]
    sampler = engine.sampler

    class Picky:  # the batched sampler raises whenever the batch holds a request with top_k=7
        def __call__(self, logits, batch_params, *rest):
            if any(p.top_k == 7 for p in batch_params):
                raise OverflowError("int too big to convert")
            return sampler(logits, batch_params, *rest)

        def __getattr__(self, name):
            return getattr(sampler, name)

    monkeypatch.setattr(engine, "sampler", Picky())
    bad = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, top_k=7)
    outs = engine.generate(["The quick brown fox", "Once upon a time", "The quick brown fox"], [params, bad, params])
    assert [o.finish_reason for o in outs] == ["length", "error", "length"]
    assert "sampling failed: OverflowError" in outs[1].error
    assert outs[0].token_ids == outs[2].token_ids == alone.token_ids
    monkeypatch.setattr(engine, "sampler", sampler)

    ids = engine.generate(["Once upon a time"], params)[0].token_ids
    detokenizers = []  # the second request's detokenizer breaks on its 5th token
    new_sequence = engine._new_sequence

    def breaking(*args):
        seq = new_sequence(*args)
        detokenizers.append(seq.detok)
        if len(detokenizers) == 2:
            add, count = seq.detok.add, iter(range(100))
            seq.detok.add = lambda token: add(token) if next(count) < 4 else 1 / 0
        return seq

    monkeypatch.setattr(engine, "_new_sequence", breaking)
    outs = engine.generate(["The quick brown fox", "Once upon a time"], params)
    assert outs[0].token_ids == alone.token_ids and outs[1].finish_reason == "error"
    assert "ZeroDivisionError" in outs[1].error and outs[1].token_ids == ids[:5]
    assert engine.pages.all_free


def test_a_callback_that_steps_its_own_engine_gets_an_error_not_a_deadlock(tiny_dir):
    import threading

    from lemma import LemmaError

    engine = Engine(tiny_dir, kv_cache_tokens=256)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    refused = []

    def callback(out):
        for call in (lambda: engine.generate(["hi"], params), engine.step, lambda: engine.logits("hi")):
            try:
                call()
            except LemmaError as exc:
                refused.append(str(exc))

    def run():
        engine.add_request("The quick brown fox", params, on_output=callback)
        while engine.has_unfinished():
            engine.step()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "deadlocked"
    assert len(refused) == 3 * 4 and all("from inside a step of the same engine" in m for m in refused), refused
    assert "Engine.step was called" in refused[1] and "Engine.logits" in refused[2]
    assert engine.pages.all_free and not engine.has_unfinished()

    # a stream closed early delivers its aborts itself, outside any step: callbacks there are refused too
    late = []
    engine.add_request("Once upon a time", SamplingParams(max_tokens=200, ignore_eos=True),
                       on_output=lambda out: out.finished and late.append(refusal(engine.step)))
    engine.step()
    done = threading.Event()

    def close_a_stream():
        for _ in engine.stream("The quick brown fox", SamplingParams(max_tokens=50, ignore_eos=True)):
            engine.abort_all()
            break
        done.set()

    threading.Thread(target=close_a_stream, daemon=True).start()
    assert done.wait(60), "deadlocked"
    assert late and "from inside a step of the same engine" in late[0]
    assert engine.pages.all_free


def refusal(call) -> str:
    from lemma import LemmaError

    try:
        call()
    except LemmaError as exc:
        return str(exc)
    return "not refused"


def test_max_batch_and_prefill_chunk_are_bounded_by_the_pool_the_model_and_memory(tiny_dir, monkeypatch):
    from lemma import LemmaError
    from lemma.engine import options

    engine = Engine(tiny_dir, kv_cache_tokens=256, max_batch=10**9, prefill_chunk=10**12)
    assert engine.max_batch == 16  # 16 pages: at most 16 requests run
    assert engine.scheduler.step_tokens == engine.config.max_position_embeddings  # one context a step
    outs = engine.generate(["hi"] * 3, SamplingParams(max_tokens=4, ignore_eos=True))
    assert [o.finish_reason for o in outs] == ["length"] * 3
    monkeypatch.setattr(options, "free_memory", lambda device: 8 * 2**30)  # page tables may take 2 GiB
    options.check_step_tables(30, 512, 2048, torch.device("cpu"), 8)  # 1.9 GiB: a 32K-context model, 8 policies
    with pytest.raises(LemmaError, match=r"max_batch=1024 needs 3.8 GiB of page tables for 8 KV policies .* "
                                         r"use max_batch <= 546 or a smaller kv_cache_tokens"):
        options.check_step_tables(30, 1024, 2048, torch.device("cpu"), 8)


def test_an_int_request_id_is_its_text_in_add_request_and_abort(tiny_dir):
    engine = Engine(tiny_dir, kv_cache_tokens=1024)
    assert engine.add_request("hello", SamplingParams(max_tokens=500, ignore_eos=True), request_id=5) == "5"
    engine.step()
    engine.abort(5)
    (out,) = engine.step()
    assert out.request_id == "5" and out.finish_reason == "abort" and engine.pages.all_free


def test_pages_return_when_the_step_raises(tiny_dir, monkeypatch):
    engine = Engine(tiny_dir, kv_cache_tokens=256)
    calls = {"n": 0}
    decode = engine.runner.decode

    def flaky(groups):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return decode(groups)

    monkeypatch.setattr(engine.runner, "decode", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        engine.generate(["a b c", "d e f"], SamplingParams(max_tokens=10, ignore_eos=True))
    assert engine.pages.all_free


def test_abandoned_stream_returns_pages(tiny_dir):
    engine = Engine(tiny_dir, kv_cache_tokens=256)
    stream = engine.stream("Tell me a story", SamplingParams(max_tokens=50, ignore_eos=True, temperature=0))
    next(stream)
    stream.close()
    assert engine.pages.all_free


def test_stream_equals_generate(tiny_dir):
    engine = Engine(tiny_dir, kv_cache_tokens=512)
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=48, seed=7, ignore_eos=True)
    chunks = list(engine.stream("Tell me a story", params))
    out = engine.generate(["Tell me a story"], params)[0]
    assert "".join(c.text for c in chunks) == out.text
    assert [t for c in chunks for t in c.token_ids] == out.token_ids
    assert chunks[-1].finish_reason == "length" and chunks[-1].stats.generated_tokens == 48
    assert all(c.finish_reason is None for c in chunks[:-1])


def test_seed_is_deterministic_and_independent_of_the_batch(tiny_dir):
    engine = Engine(tiny_dir, kv_cache_tokens=1024)
    seeded = SamplingParams(temperature=1.0, max_tokens=30, seed=123, ignore_eos=True)
    a = engine.generate(["Tell me a story"], seeded)[0].token_ids
    b = engine.generate(["Tell me a story"], seeded)[0].token_ids
    other = SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True)
    c = engine.generate(["Name three primes", "Tell me a story"], [other, seeded])[1].token_ids
    d = engine.generate(["Tell me a story"], SamplingParams(temperature=1.0, max_tokens=30, seed=124, ignore_eos=True))[0]
    assert a == b == c
    assert d.token_ids != a


def test_eos_stops_generation(tiny_dir):
    engine = Engine(tiny_dir, kv_cache_tokens=512)
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    tokens = engine.generate(["The quick brown fox"], greedy)[0].token_ids
    engine.eos_ids = [tokens[5]]  # pretend the sixth generated token is the model's EOS
    out = engine.generate(["The quick brown fox"], SamplingParams(temperature=0, max_tokens=30))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == tokens[: tokens.index(tokens[5]) + 1]


def test_chat_renders_template_and_generates(tiny_dir):
    engine = Engine(tiny_dir, kv_cache_tokens=512)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    out = engine.chat(messages, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    prompt = engine.tokenizer.decode(out.prompt_token_ids, skip_special_tokens=False)
    assert prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert len(out.token_ids) == 8


def test_repetition_penalty_matches_transformers(tiny_dir):
    engine = Engine(tiny_dir, kv_cache_tokens=512)
    out = engine.generate(["The quick brown fox"], SamplingParams(temperature=0, max_tokens=24, repetition_penalty=1.3, ignore_eos=True))[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    ids = out.prompt_token_ids
    config = GenerationConfig(max_new_tokens=24, do_sample=False, repetition_penalty=1.3, eos_token_id=None, pad_token_id=0)
    assert out.token_ids == hf.generate(torch.tensor([ids]), generation_config=config)[0, len(ids):].tolist()
