"""A request's choices (one engine request each) read whole or as server-sent events.

Leaving early, because the client went away or a choice failed, aborts every choice still running.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from lemma.engine.sequence import RequestOutput, Stats
from lemma.server.protocol import APIError

DISCONNECT_POLL_SECONDS = 0.25
Outputs = AsyncIterator[RequestOutput]


@dataclass
class Reply:
    """One choice read whole."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    last: RequestOutput | None = None


async def merged(streams: list[Outputs]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(choice index, output) of every choice as they come."""
    queue: asyncio.Queue[tuple[int, RequestOutput | None]] = asyncio.Queue()

    async def pump(index: int, stream: Outputs) -> None:
        try:
            async for out in stream:
                await queue.put((index, out))
        finally:
            await queue.put((index, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(streams)
        while running:
            index, out = await queue.get()
            if out is None:
                running -= 1
            else:
                yield index, out
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await stream.aclose()


async def collect(streams: list[Outputs], http: Request) -> list[Reply] | None:
    """Every choice whole; None when the client went away (its requests are aborted)."""
    replies = [Reply() for _ in streams]

    async def drain() -> None:
        async for index, out in merged(streams):
            reply = replies[index]
            reply.text += out.text
            reply.token_ids += out.token_ids
            if out.finished:
                reply.last = out

    task = asyncio.ensure_future(drain())
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
        if done:
            task.result()
            return replies
        if await http.is_disconnected():
            task.cancel()  # leaving the outputs aborts the requests
            await asyncio.gather(task, return_exceptions=True)
            return None


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def event_stream(streams: list[Outputs], first: list[dict[str, Any]],
                       render: Callable[[int, RequestOutput], list[dict[str, Any]]],
                       usage_event: Callable[[int, list[Stats]], dict[str, Any] | None]) -> AsyncIterator[str]:
    """One request as server-sent events: `first`, then render(choice, out) for every output, then the
    usage event (if any, from the tokens generated and each choice's final stats) and [DONE]."""
    generated, stats = 0, []
    outputs = merged(streams)
    try:
        for body in first:
            yield sse(body)
        async for index, out in outputs:
            generated += len(out.token_ids)
            if out.stats is not None and out.finished:
                stats.append(out.stats)
            if out.finish_reason == "error":
                yield sse(APIError(500, out.error or "generation failed", kind="server_error").body())
                return
            for body in render(index, out):
                yield sse(body)
        last = usage_event(generated, stats)
        if last is not None:
            yield sse(last)
        yield sse("[DONE]")
    finally:
        await outputs.aclose()
