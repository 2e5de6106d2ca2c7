"""AsyncEngine: an Engine's step loop in one background thread, with a per-request async stream for
asyncio callers (the HTTP server uses it).

The thread steps while there is work and otherwise sleeps on an event (woken by a submit or an abort),
so an idle server uses no CPU. Outputs cross back into the event loop with call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from collections.abc import AsyncIterator

from lemma.engine.engine import Engine
from lemma.engine.policies import Policy
from lemma.engine.prompts import Prompt
from lemma.engine.sampler import SamplingParams
from lemma.engine.sequence import RequestOutput
from lemma.errors import LemmaError

log = logging.getLogger("lemma")
IDLE_WAIT_SECONDS = 1.0  # the loop rechecks for work at least this often, even without a wake-up


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._wake = threading.Event()
        self._closing = False
        self._lifecycle = threading.Lock()  # a submit sees the engine open or closed, never half closed
        self._thread = threading.Thread(target=self._loop, name="lemma-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._closing:
            if not self.engine.has_unfinished():
                self._wake.wait(IDLE_WAIT_SECONDS)
                self._wake.clear()
                continue
            try:
                self.engine.step()
            except Exception:  # the step's requests already got an "error" output; keep serving the rest
                log.exception("engine step failed")

    def submit(self, prompt: Prompt, params: SamplingParams | None = None, policy: Policy | None = None,
               request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Queue a request and return its outputs as an async iterator; call from the event loop. Bad
        requests raise LemmaError here, before anything is queued. Leaving the iterator before the last
        output (a closed connection, a cancelled task), or dropping it unread, aborts the request. A
        request id may be any value; it is used as str(request_id), as Engine does. After close(), raises
        LemmaError."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()

        def post(out: RequestOutput) -> None:  # on the engine thread
            if not loop.is_closed():
                loop.call_soon_threadsafe(queue.put_nowait, out)

        with self._lifecycle:
            if self._closing:
                raise LemmaError("this AsyncEngine is closed; it takes no more requests")
            request_id = self.engine.add_request(prompt, params, policy, None if request_id is None else str(request_id),
                                                 on_output=post)
        self._wake.set()
        finished = [False]
        outputs = self._outputs(request_id, queue, finished)
        weakref.finalize(outputs, self._abort_unless, finished, request_id)
        return outputs

    async def _outputs(self, request_id: str, queue: asyncio.Queue[RequestOutput],
                       finished: list[bool]) -> AsyncIterator[RequestOutput]:
        try:
            while not finished[0]:
                out = await queue.get()
                finished[0] = out.finished
                yield out
        finally:
            self._abort_unless(finished, request_id)

    def _abort_unless(self, finished: list[bool], request_id: str) -> None:
        if not finished[0]:
            finished[0] = True
            self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self.engine.abort(str(request_id))
        self._wake.set()

    def close(self) -> None:
        """Stop the loop thread (requests still running are aborted and their pages returned). Closing
        again does nothing; submit() after close raises."""
        with self._lifecycle:
            if self._closing:
                return
            self._closing = True
            self.engine.abort_all()
        self._wake.set()
        self._thread.join()
        self.engine.step()  # apply the aborts
