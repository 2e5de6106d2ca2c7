"""`lemma serve`: an OpenAI-compatible HTTP front (FastAPI) on an AsyncEngine.

/v1/chat/completions and /v1/completions (streamed as server-sent events or whole), /v1/models,
/health. With an API key, every route but /health checks it first (APIKeyCheck), before a byte of the
body is read; a body over 32 MiB is refused with 413 (BodyLimit). Malformed requests get an
OpenAI-style JSON error with status 400 before anything reaches the engine; a client that goes away
aborts its request, so its pages return to the pool.
"""

from __future__ import annotations

import hmac
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from lemma.engine.async_engine import AsyncEngine
from lemma.engine.policies import Policy, policy_from_spec
from lemma.engine.sequence import RequestOutput, Stats
from lemma.errors import LemmaError
from lemma.reasoning import ThinkSplitter, opens_thinking, split_reasoning
from lemma.server.protocol import (APIError, ChatCompletionRequest, CompletionRequest, GenerationRequest,
                                   lemma_stats, now, usage)
from lemma.server.streams import Outputs, Reply, collect, event_stream

OPEN_PATHS = ("/health",)  # the only routes a client without the key may use


class APIKeyCheck:
    """ASGI middleware: with a key, an HTTP request to any route but OPEN_PATHS needs `Authorization:
    Bearer <key>`, checked before the route runs, so a stranger's body is never read or parsed. The
    header's bytes are compared with the key's UTF-8 bytes in constant time (a non-ASCII key matches
    what a client sends as UTF-8)."""

    def __init__(self, app: ASGIApp, api_key: str | None):
        self.app = app
        self.expected = None if api_key is None else api_key.encode("utf-8")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.expected is None or scope["type"] != "http" or scope["path"] in OPEN_PATHS or self.admits(scope):
            await self.app(scope, receive, send)
            return
        error = APIError(401, "missing or wrong API key (send Authorization: Bearer <key>)",
                         kind="authentication_error", code="invalid_api_key")
        response = JSONResponse(error.body(), status_code=401, headers={"www-authenticate": "Bearer"})
        await response(scope, receive, send)

    def admits(self, scope: Scope) -> bool:
        raw = Headers(scope=scope).get("authorization", "").encode("latin-1")  # the header's bytes as sent
        scheme, _, token = raw.strip().partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.expected)


MAX_BODY_BYTES = 32 * 2**20  # far above any prompt a model's context can take, as JSON


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` is refused with 413, by its Content-Length before
    a byte is read, or as soon as a chunked body passes the limit (nothing more of it is read)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            await self.too_large()(scope, receive, send)
            return
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise StarletteHTTPException(413, self.too_large_message)
            return message

        await self.app(scope, counted, send)

    @property
    def too_large_message(self) -> str:
        return f"request body over {self.max_bytes} bytes"

    def too_large(self) -> JSONResponse:
        return JSONResponse(APIError(413, self.too_large_message).body(), status_code=413)


class Server:
    """What the routes share: the engine, the served model's name, the key, the reasoning switch."""

    def __init__(self, engine: AsyncEngine, model_name: str, api_key: str | None = None,
                 reasoning: bool | None = None, default_max_tokens: int | None = None):
        self.engine, self.model_name, self.api_key = engine, model_name, api_key
        self.default_max_tokens = default_max_tokens
        tokenizer = engine.engine.tokenizer
        if reasoning is None:  # models that think in <think> ... </think>
            reasoning = tokenizer.token_id("<think>") is not None and tokenizer.token_id("</think>") is not None
        self.reasoning = reasoning

    # ---- request -> engine ----------------------------------------------------------------------------
    def max_tokens(self, requested: int | None, prompt_len: int, policy: Policy) -> int:
        engine = self.engine.engine
        context = engine.config.max_position_embeddings
        if prompt_len >= context:
            raise APIError(400, f"prompt of {prompt_len} tokens fills the model's context of {context} tokens", "messages")
        if requested is not None:
            if prompt_len + requested > context:
                raise APIError(400, f"prompt ({prompt_len} tokens) + max_tokens ({requested}) exceeds the model's "
                                    f"context of {context} tokens", "max_tokens")
            return requested
        room = context - prompt_len  # as vLLM: the rest of the context
        if self.default_max_tokens is not None:
            room = min(room, self.default_max_tokens)
        if not policy.evicts or policy.dense_layers:  # layers that keep every page must fit the pool
            room = min(room, engine.pool.capacity_tokens - prompt_len - 1)
        if room < 1:
            raise APIError(400, f"prompt of {prompt_len} tokens leaves no room in the KV pool", "messages")
        return room

    def policy(self, req: GenerationRequest) -> Policy:
        if req.kv_policy is None:
            return self.engine.engine.policy
        try:
            return policy_from_spec(req.kv_policy)
        except LemmaError as exc:
            raise APIError(400, f"kv_policy: {exc}", "kv_policy") from None

    def submit(self, req: GenerationRequest, prompt_ids: list[int], requested: int | None,
               request_id: str) -> list[Outputs]:
        """One engine request per choice (n of them; with a seed, choice i samples with seed + i). Admitted
        together, the later choices read the prompt's pages from the first (engine/pages.py)."""
        policy = self.policy(req)
        max_tokens = self.max_tokens(requested, len(prompt_ids), policy)
        streams: list[Outputs] = []
        ids = [request_id] if req.n == 1 else [f"{request_id}-{choice}" for choice in range(req.n)]
        try:
            for choice, choice_id in enumerate(ids):
                streams.append(self.engine.submit(prompt_ids, req.sampling(max_tokens, choice), policy, choice_id))
        except LemmaError as exc:
            for choice_id in ids[: len(streams)]:  # the choices already queued are aborted
                self.engine.abort(choice_id)
            raise APIError(400, str(exc)) from None
        return streams

    def check_model(self, req: GenerationRequest) -> None:
        if req.model not in (None, "", self.model_name):
            raise APIError(404, f"model {req.model!r} is not served here (this server serves {self.model_name!r})",
                           "model", code="model_not_found")


def whole_usage(prompt_len: int, replies: list[Reply]) -> dict[str, Any]:
    """usage (the prompt once, every choice's tokens) and lemma's stats (per choice when n > 1)."""
    stats = [r.last.stats for r in replies]
    extra = lemma_stats(stats[0]) if len(stats) == 1 else [lemma_stats(s) for s in stats]
    return {"usage": usage(prompt_len, sum(len(r.token_ids) for r in replies), stats), "lemma": extra}


def finish_reason(out: RequestOutput) -> str:
    if out.finish_reason == "error":
        raise APIError(500, out.error or "generation failed", kind="server_error")
    return out.finish_reason  # "stop" or "length"


def build_app(engine: AsyncEngine, model_name: str, api_key: str | None = None,
              reasoning: bool | None = None, default_max_tokens: int | None = None,
              max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The app over a running AsyncEngine (closed when the app shuts down). reasoning: None = on when
    the tokenizer knows <think>. default_max_tokens caps requests that give none (default: the rest of
    the model's context, within the pool for layers that keep every page)."""
    if api_key is not None and not api_key.strip():
        raise LemmaError("api_key is empty: give a key, or None to serve without one")
    server = Server(engine, model_name, api_key, reasoning, default_max_tokens)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await run_in_threadpool(engine.close)
        engine.engine.close()  # tensor-parallel workers, if any

    app = FastAPI(title="lemma", lifespan=lifespan)
    app.state.server = server
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(APIKeyCheck, api_key=api_key)  # added last, so it runs first: a stranger gets 401

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        if first.get("type") == "json_invalid":
            message, where = "the body is not valid JSON", None
        elif first.get("type") == "missing":
            message = f"{where} is required"
        elif where and not message.startswith(where.split(".")[0]):
            message = f"{where}: {message}"
        return JSONResponse(APIError(400, message, where or None).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        """The engine's queue, pool and prefix cache right now (for load tests and dashboards)."""
        scheduler, pages = engine.engine.scheduler, engine.engine.pages
        return {"running": len(scheduler.running), "waiting": len(scheduler.waiting),
                "peak_running": scheduler.peak_running, "preemptions": scheduler.preemptions,
                "mean_decode_batch": scheduler.decoded / max(scheduler.decode_steps, 1),
                "kv_pages": pages.num_pages, "kv_pages_free": min(map(pages.available, range(pages.num_layers))),
                "prefix_cache": engine.engine.prefix_cache_stats()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "lemma"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, http: Request) -> Response:
        server.check_model(req)
        tokenizer = engine.engine.tokenizer
        messages = [m.as_template_message() for m in req.messages]
        try:
            text = await run_in_threadpool(tokenizer.apply_chat_template, messages, True)
        except LemmaError as exc:
            raise APIError(400, str(exc), "messages") from None
        prompt_ids = await run_in_threadpool(tokenizer.encode, text, False)
        thinking = server.reasoning and opens_thinking(text)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        outputs = server.submit(req, prompt_ids, req.requested_max_tokens, request_id)
        if req.stream:
            return StreamingResponse(chat_events(req, outputs, request_id, len(prompt_ids), thinking),
                                     media_type="text/event-stream")
        replies = await collect(outputs, http)
        if replies is None:
            return Response(status_code=499)
        choices = []
        for index, reply in enumerate(replies):
            reason = finish_reason(reply.last)
            reasoning_content, content = split_reasoning(reply.text, thinking) if server.reasoning else (None, reply.text)
            message = {"role": "assistant", "content": content}
            if reasoning_content is not None:
                message["reasoning_content"] = reasoning_content
            choices.append({"index": index, "message": message, "finish_reason": reason, "logprobs": None})
        return JSONResponse({"id": request_id, "object": "chat.completion", "created": now(), "model": model_name,
                             "choices": choices, **whole_usage(len(prompt_ids), replies)})

    def chat_events(req: ChatCompletionRequest, outputs: list[Outputs], request_id: str,
                    prompt_len: int, thinking: bool) -> AsyncIterator[str]:
        created = now()
        splitters = [ThinkSplitter(thinking) if server.reasoning else None for _ in outputs]

        def chunk(index: int, delta: dict[str, Any], reason: str | None = None, **extra: Any) -> dict[str, Any]:
            body = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": [{"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}], **extra}
            if req.include_usage:
                body["usage"] = None
            return body

        def render(index: int, out: RequestOutput) -> list[dict[str, Any]]:
            splitter = splitters[index]
            runs = splitter.feed(out.text, final=out.finished) if splitter else [(out.text, False)]
            bodies = [chunk(index, {"reasoning_content": text} if inside else {"content": text})
                      for text, inside in runs if text]
            if out.finished:
                bodies.append(chunk(index, {}, out.finish_reason, lemma=lemma_stats(out.stats)))
            return bodies

        def usage_event(generated: int, stats: list[Stats]) -> dict[str, Any] | None:
            if not req.include_usage:
                return None
            return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": [], "usage": usage(prompt_len, generated, stats)}

        opening = [chunk(i, {"role": "assistant", "content": ""}) for i in range(len(outputs))]
        return event_stream(outputs, opening, render, usage_event)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, http: Request) -> Response:
        server.check_model(req)
        if isinstance(req.prompt, str):
            prompt_ids = await run_in_threadpool(engine.engine.tokenizer.encode, req.prompt, True)
        else:
            prompt_ids = list(req.prompt)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        outputs = server.submit(req, prompt_ids, req.requested_max_tokens, request_id)
        if req.stream:
            return StreamingResponse(completion_events(req, outputs, request_id, len(prompt_ids)),
                                     media_type="text/event-stream")
        replies = await collect(outputs, http)
        if replies is None:
            return Response(status_code=499)
        choices = [{"index": i, "text": r.text, "finish_reason": finish_reason(r.last), "logprobs": None}
                   for i, r in enumerate(replies)]
        return JSONResponse({"id": request_id, "object": "text_completion", "created": now(), "model": model_name,
                             "choices": choices, **whole_usage(len(prompt_ids), replies)})

    def completion_events(req: CompletionRequest, outputs: list[Outputs], request_id: str,
                          prompt_len: int) -> AsyncIterator[str]:
        created = now()

        def body(choices: list[dict[str, Any]]) -> dict[str, Any]:
            return {"id": request_id, "object": "text_completion", "created": created, "model": model_name,
                    "choices": choices}

        def render(index: int, out: RequestOutput) -> list[dict[str, Any]]:
            if not (out.text or out.finished):
                return []
            event = body([{"index": index, "text": out.text, "finish_reason": out.finish_reason, "logprobs": None}])
            if out.finished:
                event["lemma"] = lemma_stats(out.stats)
            if req.include_usage:
                event["usage"] = None
            return [event]

        def usage_event(generated: int, stats: list[Stats]) -> dict[str, Any] | None:
            return {**body([]), "usage": usage(prompt_len, generated, stats)} if req.include_usage else None

        return event_stream(outputs, [], render, usage_event)

    return app
