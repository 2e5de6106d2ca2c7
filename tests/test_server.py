"""`lemma serve` on 127.0.0.1 with the demo model, driven by the real `openai` client: chat and
completions (streamed and whole), 16 concurrent seeded clients, a client leaving mid-stream, bad
requests, per-request KV policies, the API key, reasoning_content; and over the tiny model, every
numeric field checked at its real limit and the key checked before the body."""

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

from lemma import Engine, LemmaError, SamplingParams
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

    def counting(*args, **kwargs):  # rows decoded together, whatever the runner's signature
        logits = decode(*args, **kwargs)
        batches.append(logits.shape[0])
        return logits

    engine.runner.decode = counting

    def ask(i: int) -> str:
        messages = [{"role": "user", "content": f"Tell me a fact about the number {i}."}]
        reply = client.chat.completions.create(model=MODEL, messages=messages, temperature=0.8, top_p=0.95,
                                               seed=1000 + i, max_tokens=24)
        return reply.choices[0].message.content

    try:
        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(ask, range(16)))
        peak = max(batches)
        alone = [ask(i) for i in range(0, 16, 3)]  # a third of them again, one at a time (the suite's time)
    finally:
        engine.runner.decode = decode
    assert together[::3] == alone
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


# ---- every field checked at the boundary; the key checked before the body -----------------------------

@pytest.fixture(scope="module")
def tiny_app(tiny_dir):
    """The app over the tiny model (no server process); `added` counts requests that reached the engine."""
    engine = Engine(tiny_dir, kv_cache_tokens=1024, max_batch=4)
    added, add = [], engine.add_request
    engine.add_request = lambda *a, **k: added.append(1) or add(*a, **k)
    async_engine = AsyncEngine(engine)
    with TestClient(build_app(async_engine, "tiny")) as client:
        yield SimpleNamespace(client=client, engine=engine, added=added)


PROMPT = {"prompt": "Tell me a story", "max_tokens": 2}


@pytest.mark.parametrize("fields, param", [
    ({"top_k": 2**63}, "top_k"), ({"top_k": 10**30}, "top_k"), ({"top_k": True}, "top_k"), ({"top_k": 1.5}, "top_k"),
    ({"max_tokens": True}, "max_tokens"), ({"max_tokens": 2.0}, "max_tokens"), ({"max_tokens": "2"}, "max_tokens"),
    ({"seed": True}, "seed"), ({"seed": 2**64}, "seed"), ({"seed": -(2**63) - 1}, "seed"),
    ({"n": True}, "n"), ({"temperature": True}, "temperature"), ({"temperature": "0.5"}, "temperature"),
    ({"top_p": False}, "top_p"), ({"repetition_penalty": 1e300}, "repetition_penalty"),
    ({"repetition_penalty": 1e-40}, "repetition_penalty"), ({"presence_penalty": True}, "presence_penalty"),
    ({"prompt": [True, 2]}, "prompt"), ({"prompt": [1, 2**63]}, "prompt"), ({"prompt": [1, -1]}, "prompt"),
    ({"ignore_eos": 1}, "ignore_eos"), ({"stream": "yes"}, "stream"),
])
def test_a_bad_number_is_400_naming_the_field_and_never_reaches_the_engine(tiny_app, fields, param):
    response = tiny_app.client.post("/v1/completions", json={**PROMPT, **fields})
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"].split(".")[0] == param, error
    assert error["message"].startswith(param) and "\n" not in error["message"]
    assert not tiny_app.added


def test_not_a_number_is_400(tiny_app):
    for literal in ("NaN", "Infinity", "-Infinity"):
        body = json.dumps(PROMPT)[:-1] + f', "temperature": {literal}}}'
        response = tiny_app.client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        assert response.status_code == 400 and response.json()["error"]["param"] == "temperature"
    assert not tiny_app.added


def test_numbers_at_their_limits_are_served_next_to_an_ordinary_request(tiny_app):
    """A top_k past the vocabulary and seeds at both ends of 64 bits (n = 2 wraps seed + 1) sample in the
    same steps as an ordinary request, and every one of them ends well."""
    bodies = [{**PROMPT, "top_k": 2**63 - 1, "seed": 2**64 - 1, "n": 2, "ignore_eos": True},
              {**PROMPT, "seed": -(2**63), "temperature": 2, "repetition_penalty": 100, "ignore_eos": True},
              {**PROMPT, "temperature": 0, "ignore_eos": True}]
    with ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(lambda body: tiny_app.client.post("/v1/completions", json=body), bodies))
    assert [r.status_code for r in replies] == [200, 200, 200], [r.text for r in replies]
    assert [c["finish_reason"] for r in replies for c in r.json()["choices"]] == ["length"] * 4
    tiny_app.added.clear()
    wait_idle(tiny_app.engine)


def asgi_call(app, headers: list[tuple[bytes, bytes]], path: str = "/v1/completions", body: bytes = b"{not json"):
    """One POST straight through the ASGI app. -> (status, JSON answer, how often the app read the body)."""
    import asyncio

    reads, sent = [], []

    async def receive():
        reads.append(1)
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), *headers], "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    answer = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(answer), len(reads)


def test_a_body_over_the_limit_is_413_and_a_strangers_is_401(tiny_dir):
    async_engine = AsyncEngine(Engine(tiny_dir, kv_cache_tokens=256))
    app = build_app(async_engine, "tiny", api_key="k", max_body_bytes=1000)
    key = [(b"authorization", b"Bearer k")]
    big = json.dumps({"prompt": "x" * 2000, "max_tokens": 1}).encode()
    try:
        status, answer, reads = asgi_call(app, key + [(b"content-length", str(len(big)).encode())], body=big)
        assert (status, reads) == (413, 0) and "over 1000 bytes" in answer["error"]["message"]  # by its header
        status, answer, reads = asgi_call(app, key, body=big)  # no length given: counted as it is read
        assert (status, reads) == (413, 1) and "over 1000 bytes" in answer["error"]["message"]
        assert asgi_call(app, [(b"content-length", str(len(big)).encode())], body=big)[:1] == (401,)
        small = json.dumps({"prompt": "hello", "max_tokens": 2, "ignore_eos": True}).encode()
        status, answer, _ = asgi_call(app, key, body=small)
        assert status == 200 and answer["usage"]["completion_tokens"] == 2
    finally:
        async_engine.close()


def test_the_key_is_checked_before_the_body_is_read(tiny_dir):
    engine = Engine(tiny_dir, kv_cache_tokens=256)
    async_engine = AsyncEngine(engine)
    key = "clé-🙂-secret"
    app = build_app(async_engine, "tiny", api_key=key)
    try:
        for headers in ([], [(b"authorization", b"Bearer wrong")], [(b"authorization", b"Bearer " + key.encode()[:-1])],
                        [(b"authorization", key.encode())], [(b"authorization", b"Basic " + key.encode())]):
            status, answer, reads = asgi_call(app, headers)
            assert (status, answer["error"]["code"], reads) == (401, "invalid_api_key", 0), headers
        for path in ("/stats", "/v1/models", "/v1/chat/completions", "/nowhere"):
            assert asgi_call(app, [], path)[:1] == (401,)
        good = [(b"authorization", b"Bearer " + key.encode("utf-8"))]  # a non-ASCII key, sent as UTF-8
        status, answer, reads = asgi_call(app, good)
        assert status == 400 and "not valid JSON" in answer["error"]["message"] and reads == 1
        status, _, _ = asgi_call(app, [(b"authorization", b"bearer  " + key.encode("utf-8"))])
        assert status == 400  # the scheme is case-insensitive (RFC 9110)
    finally:
        async_engine.close()
    with TestClient(build_app(AsyncEngine(Engine(tiny_dir, kv_cache_tokens=256)), "tiny", api_key=key)) as client:
        reply = client.get("/v1/models", headers={"authorization": f"Bearer {key}".encode()})
        assert reply.status_code == 200 and client.get("/health").status_code == 200
        assert client.get("/v1/models").headers["www-authenticate"] == "Bearer"
    with pytest.raises(LemmaError, match="api_key is empty"):
        build_app(async_engine, "tiny", api_key=" ")
