"""`lemma serve` on 127.0.0.1 with the demo model, driven by the real `openai` client: chat and
completions (streamed and whole), 16 concurrent seeded clients, a client leaving mid-stream, bad
requests, per-request KV policies, the API key, reasoning_content."""

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import openai
import pytest
from fastapi.testclient import TestClient
from serving import serving

from lemma import Engine, SamplingParams
from lemma.engine.async_engine import AsyncEngine
from lemma.engine.sequence import RequestOutput, Stats
from lemma.models.store import pull
from lemma.reasoning import split_reasoning
from lemma.server.app import build_app

MODEL = "smollm2-135m-instruct"
ASK = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def served():
    engine = Engine(pull(MODEL, quiet=True), kv_cache_tokens=16 * 1024, max_batch=16)
    with serving(build_app(AsyncEngine(engine), MODEL)) as port:
        url = f"http://127.0.0.1:{port}/v1"
        yield SimpleNamespace(url=url, engine=engine, client=openai.OpenAI(base_url=url, api_key="unused", max_retries=0))


def http(url: str, body: bytes | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def wait_idle(engine: Engine, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while (engine.has_unfinished() or not engine.pages.all_free) and time.time() < deadline:
        time.sleep(0.02)
    assert not engine.has_unfinished() and engine.pages.all_free, "pages did not come back"


def test_health_and_models(served):
    assert http(served.url.removesuffix("/v1") + "/health") == (200, {"status": "ok"})
    assert [m.id for m in served.client.models.list()] == [MODEL]


def test_chat_whole_and_streamed_equal_the_engine(served):
    engine, client = served.engine, served.client
    expected = engine.generate([engine.chat_prompt(ASK)], SamplingParams(temperature=0, max_tokens=24))[0]
    whole = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=24)
    choice = whole.choices[0]
    assert choice.message.content == expected.text and choice.message.role == "assistant"
    assert choice.finish_reason == {"length": "length", "stop": "stop"}[expected.finish_reason]
    assert whole.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert whole.usage.completion_tokens == len(expected.token_ids)
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    stats = whole.model_extra["lemma"]
    assert stats["policy"] == "dense" and stats["peak_kv_bytes"] > 0 and stats["ttft_seconds"] > 0

    chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=24, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].model_extra["lemma"]["pages_evicted"] == 0
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.token_ids)
    wait_idle(engine)


def test_completions_whole_and_streamed(served):
    engine, client = served.engine, served.client
    expected = engine.generate(["Once upon a time"], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    whole = client.completions.create(model=MODEL, prompt="Once upon a time", temperature=0, max_tokens=20,
                                      extra_body={"ignore_eos": True})
    assert whole.choices[0].text == expected.text and whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 20
    by_ids = client.completions.create(model=MODEL, prompt=expected.prompt_token_ids, temperature=0, max_tokens=20,
                                       extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == expected.text
    streamed = client.completions.create(model=MODEL, prompt="Once upon a time", temperature=0, max_tokens=20,
                                         stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected.text
    wait_idle(engine)


def test_sixteen_concurrent_seeded_clients_equal_each_alone(served):
    engine, client = served.engine, served.client
    batches: list[int] = []
    decode = engine.runner.decode
    engine.runner.decode = lambda seqs, policy: batches.append(len(seqs)) or decode(seqs, policy)

    def ask(i: int) -> str:
        messages = [{"role": "user", "content": f"Tell me a fact about the number {i}."}]
        reply = client.chat.completions.create(model=MODEL, messages=messages, temperature=0.8, top_p=0.95,
                                               seed=1000 + i, max_tokens=24)
        return reply.choices[0].message.content

    try:
        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(ask, range(16)))
        peak = max(batches)
        alone = [ask(i) for i in range(16)]
    finally:
        engine.runner.decode = decode
    assert together == alone
    assert peak >= 8, f"the requests did not share decode steps (largest batch {peak})"
    assert len(set(together)) > 8  # distinct seeds and prompts, distinct replies
    wait_idle(engine)


def test_client_leaving_mid_stream_aborts_and_returns_pages(served):
    engine, client = served.engine, served.client
    stream = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=3000, stream=True,
                                            extra_body={"ignore_eos": True})
    received = 0
    for chunk in stream:
        received += 1
        if received == 4:
            break
    assert engine.has_unfinished()  # still generating its 3000 tokens
    stream.close()
    wait_idle(engine, timeout=15)
    reply = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=4)
    assert reply.choices[0].message.content  # and the server keeps serving


def test_bad_requests_get_400_json_and_never_reach_the_engine(served):
    engine, client = served.engine, served.client
    added = []
    add = engine.add_request
    engine.add_request = lambda *a, **k: added.append(1) or add(*a, **k)
    cases = [
        (dict(messages=ASK, temperature=5), "temperature"),
        (dict(messages=[]), "messages"),
        (dict(messages=ASK, n=0), "n"),
        (dict(messages=ASK, n=17), "n"),
        (dict(messages=ASK, extra_body={"kv_policy": {"name": "raas", "refreshh": "mass"}}), "no option 'refreshh'"),
        (dict(messages=ASK, max_tokens=0), "max_tokens"),
        (dict(messages=ASK, max_tokens=100_000), "exceeds the model's context"),
        (dict(messages=[{"role": "wizard", "content": "hi"}]), "role"),
        (dict(messages=ASK, extra_body={"kv_policy": {"name": "raas", "budget": 7}}), "at least 2 pages"),
        (dict(messages=ASK, extra_body={"kv_policy": {"name": "nope"}}), "unknown policy 'nope'"),
        (dict(messages=ASK, top_p=0), "top_p"),
        (dict(messages=ASK, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "tool calling"),
    ]
    try:
        for kwargs, fragment in cases:
            with pytest.raises(openai.BadRequestError) as info:
                client.chat.completions.create(model=MODEL, **kwargs)
            error = info.value.body
            assert info.value.status_code == 400 and fragment in error["message"], (kwargs, error)
            assert error["type"] == "invalid_request_error"
        status, error = http(served.url + "/chat/completions", b"{not json")
        assert status == 400 and "not valid JSON" in error["error"]["message"]
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="gpt-4", messages=ASK)
        with pytest.raises(openai.BadRequestError, match="one prompt per request"):
            client.completions.create(model=MODEL, prompt=["a", "b"])
    finally:
        engine.add_request = add
    assert not added
    reply = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=4)
    assert reply.choices[0].finish_reason in ("length", "stop")


def test_per_request_kv_policy_evicts(served):
    client = served.client
    reply = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=120,
                                           extra_body={"ignore_eos": True, "kv_policy": {"name": "raas", "budget": 64}})
    stats = reply.model_extra["lemma"]
    assert stats["policy"] == "raas-64" and stats["pages_evicted"] > 0 and stats["peak_kv_pages"] == 4
    assert reply.usage.completion_tokens == 120
    wait_idle(served.engine)


def test_n_choices_share_the_prompt_and_repeats_report_cached_tokens(served):
    client, engine = served.client, served.engine
    engine.pages.clear_cache()
    many = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0.9, max_tokens=16, n=3, seed=7,
                                          extra_body={"ignore_eos": True})
    assert [c.index for c in many.choices] == [0, 1, 2] and len({c.message.content for c in many.choices}) > 1
    cached = sorted(s["cached_tokens"] for s in many.model_extra["lemma"])
    assert cached[0] == 0 and cached[1] > 0, cached  # the later choices read the first one's prompt pages
    assert many.usage.completion_tokens == 48 and many.usage.prompt_tokens == len(engine.chat_prompt(ASK))
    again = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0.9, max_tokens=16, seed=7,
                                           extra_body={"ignore_eos": True})
    assert again.choices[0].message.content == many.choices[0].message.content  # choice 0 samples with the seed itself
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    streamed = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0.9, max_tokens=16, n=2, seed=7,
                                              stream=True, stream_options={"include_usage": True},
                                              extra_body={"ignore_eos": True})
    texts, usage = ["", ""], None
    for event in streamed:
        for choice in event.choices:
            texts[choice.index] += choice.delta.content or ""
        usage = event.usage or usage
    assert texts == [c.message.content for c in many.choices[:2]]
    assert usage.completion_tokens == 32
    assert usage.prompt_tokens_details.cached_tokens > 0
    stats = http(served.url.removesuffix("/v1") + "/stats")[1]["prefix_cache"]
    assert stats["enabled"] and stats["hits"] >= 3 and stats["cached_pages"] > 0
    wait_idle(engine)


def test_kv_policy_as_a_spec_with_any_of_its_options(served):
    reply = served.client.chat.completions.create(
        model=MODEL, messages=ASK, temperature=0, max_tokens=40,
        extra_body={"ignore_eos": True, "kv_policy": "raas-capped:budget=64:recent=1"})
    assert reply.model_extra["lemma"]["policy"] == "raas-capped-64(recent=1)"
    reply = served.client.chat.completions.create(
        model=MODEL, messages=ASK, temperature=0, max_tokens=8,
        extra_body={"kv_policy": {"name": "random", "budget": 64, "seed": 3}})
    assert reply.model_extra["lemma"]["policy"] == "random-64(seed=3)"
    wait_idle(served.engine)


def fake_outputs(pieces: list[str]):
    async def outputs():
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            yield RequestOutput("fake", piece, [1], "stop" if last else None, Stats() if last else None)
    return outputs()


def test_api_key_and_reasoning_content(tiny_dir):
    async_engine = AsyncEngine(Engine(tiny_dir, kv_cache_tokens=1024))
    pieces = ["<th", "ink>Let me add: 2", "+2=4.</th", "ink>The answer", " is 4."]
    async_engine.submit = lambda *args, **kwargs: fake_outputs(pieces)
    app = build_app(async_engine, "tiny", api_key="secret", reasoning=True)
    with TestClient(app) as client:
        body = {"messages": [{"role": "user", "content": "2+2?"}], "max_tokens": 8}
        denied = client.post("/v1/chat/completions", json=body)
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
        auth = {"authorization": "Bearer secret"}
        message = client.post("/v1/chat/completions", json=body, headers=auth).json()["choices"][0]["message"]
        assert message["reasoning_content"] == "Let me add: 2+2=4." and message["content"] == "The answer is 4."
        events = client.post("/v1/chat/completions", json={**body, "stream": True}, headers=auth).text.split("\n\n")
        deltas = [json.loads(e[6:])["choices"][0]["delta"] for e in events if e.startswith("data: {")]
        assert "".join(d.get("reasoning_content", "") for d in deltas) == "Let me add: 2+2=4."
        assert "".join(d.get("content", "") for d in deltas) == "The answer is 4."
        assert client.get("/health").status_code == 200  # no key needed
    assert split_reasoning("no thinking here") == (None, "no thinking here")
    assert split_reasoning("still thinking</think>done", thinking=True) == ("still thinking", "done")
