"""The blocking calls of an Engine — generate, stream, chat, teacher_force, logits — as layers on its
request loop: each submits its requests with a listener, then steps until they finish (other threads'
requests advance in the same steps). Mixed into Engine; uses its add/step internals."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import torch

from lemma.engine.forcing import teacher_force
from lemma.engine.policies import Dense
from lemma.engine.prompts import Prompt, chat_ids, is_conversation
from lemma.engine.recording import Recording
from lemma.engine.sampler import SamplingParams
from lemma.engine.sequence import Chunk, Forced, Output, RequestOutput, Sequence, Stats
from lemma.errors import LemmaError


class BlockingCalls:
    # ---- blocking layers on add_request / step ---------------------------------------------------------
    def _follow(self, request_ids: list[str], box: deque[RequestOutput]) -> Iterator[RequestOutput]:
        """Step until every request in `request_ids` finished, yielding their outputs (delivered to `box`)
        as they come. Other threads' requests advance in the same steps. Requests still running when the
        caller stops iterating are aborted and their pages are back before this returns."""
        pending = set(request_ids)
        try:
            while pending:
                while box:
                    out = box.popleft()
                    if out.finished:
                        pending.discard(out.request_id)
                    yield out
                if pending:
                    with self._stepping("generate (or stream, chat, teacher_force)"):  # another thread's step may have delivered ours meanwhile
                        if not box:
                            self._step()
        finally:
            if pending:
                for request_id in pending:
                    self.abort(request_id)
                # apply the aborts now unless a step is running (then that step's successor does); never
                # wait here: this may run from a generator finalised inside a step
                with self._stepping_if_free() as free:
                    if free:
                        self._deliver(self._take_inbox())

    def _submit_all(self, prompts: list[Prompt], params: list[SamplingParams], box: deque[RequestOutput],
                    prepare: Callable[[int, Sequence], None] | None = None) -> tuple[list[Sequence | None], dict[int, Output]]:
        """Submit a batch (`prepare(i, seq)` sets request i up before it is queued); requests that fail
        validation become error Outputs at once."""
        seqs: list[Sequence | None] = []
        failed: dict[int, Output] = {}
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            try:
                seq = self._new_sequence(None, prompt, p, self.policy)
                if prepare is not None:
                    prepare(i, seq)
                self._submit(seq, box.append)
                seqs.append(seq)
            except LemmaError as exc:
                seqs.append(None)
                failed[i] = Output("", [], "error", Stats(), [], str(exc))
        return seqs, failed

    # ---- public API --------------------------------------------------------------------------------
    def generate(self, prompts: Prompt | list[Prompt], params: SamplingParams | list[SamplingParams] | None = None) -> list[Output]:
        """Run a batch of prompts to completion; one Output per prompt, in order. A prompt is raw text (a
        completion), token ids, or a conversation ([{"role": "user", "content": ...}], rendered with the
        chat template: what an instruct model needs to answer).
        Safe to call from several threads at once: their requests share the engine's steps."""
        if isinstance(prompts, str) or is_conversation(prompts) or (
                isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise LemmaError(f"prompts must be a prompt or a list of prompts, got {type(prompts).__name__}")
        prompts = list(prompts)
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise LemmaError(f"got {len(prompts)} prompts but {len(plist)} SamplingParams")
        box: deque[RequestOutput] = deque()
        seqs, outputs = self._submit_all(prompts, plist, box)
        for _ in self._follow([s.request_id for s in seqs if s is not None], box):
            pass
        for i, seq in enumerate(seqs):
            if seq is not None:
                outputs[i] = self._output(seq)
        return [outputs[i] for i in range(len(prompts))]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[Chunk]:
        """Yield the reply piece by piece; the last Chunk carries finish_reason and stats. Closing the
        iterator early aborts the request and returns its pages."""
        box: deque[RequestOutput] = deque()
        seq = self._new_sequence(None, prompt, params or SamplingParams(), self.policy)
        self._submit(seq, box.append)
        held: list[int] = []  # token ids whose text is not released yet (partial UTF-8, maybe a stop string)
        for out in self._follow([seq.request_id], box):
            if out.finish_reason == "error":
                raise LemmaError(out.error)
            held += out.token_ids
            if out.text or out.finished:
                yield Chunk(out.text, held, out.finish_reason, out.stats)
                held = []

    @torch.inference_mode()
    def logits(self, prompt: Prompt) -> torch.Tensor:
        """Next-token logits [T, V] (fp32) at every position of a prompt, through the paged pool."""
        seq = self._new_sequence(None, prompt, SamplingParams(max_tokens=1), Dense())
        seq.uses_prefix_cache = False  # every position is computed here
        with self._stepping("logits"):
            self.pages.reserve(seq, [self.pages.pages_for(seq.num_tokens)] * self.config.num_layers)
            try:
                chunk, n, logits = self.scheduler.step_tokens, seq.num_tokens, []
                for start in range(0, n, chunk):
                    self.pages.fill_to(seq, min(start + chunk, n))
                    logits.append(self.runner.prefill([(seq, seq.policy, start, min(start + chunk, n))], all_logits=True))
                return torch.cat(logits)
            finally:
                self.pages.release(seq)

    @property
    def shares_prefixes(self) -> bool:
        """Whether teacher_force can record and share Dense prefixes (not under tensor parallelism)."""
        return self.runner.cluster is None

    def teacher_force(self, prompts: list[Prompt], targets: list[list[int]], chunked: bool = True,
                      record_until: int = 0, shared: list[Recording | None] | None = None,
                      on_finished: Callable[[int, Forced], None] | None = None) -> list[Forced]:
        """Replay each target continuation under the current policy (eviction active), as generation
        would see it; per token: log-probability of the target and the model's argmax. `chunked` feeds a
        page of targets per forward (exact: the same evictions as one token per step, see
        engine/replay.py); chunked=False runs one decode step per token, the oracle.
        Shared prefixes (engine/recording.py): under Dense, `record_until` > 0 records each replay's
        attention inputs before that position (Forced.recording; None under tensor parallelism); `shared`
        hands such recordings, made by this engine of the same prompt ids and targets (or None), to
        another policy's replay, which skips the model where it attends what Dense attends.
        `on_finished(i, forced)` is called as each replay finishes (in finishing order), so a caller can
        keep each result before the slowest one is done. (engine/forcing.py does the work.)"""
        return teacher_force(self, prompts, targets, chunked, record_until, shared, on_finished)

    def chat_prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        """Token ids of a conversation rendered with the chat template (generate accepts it directly)."""
        return chat_ids(self.tokenizer, messages)

    def chat(self, messages: list[dict[str, Any]], params: SamplingParams | None = None) -> Output:
        """One assistant reply to a conversation, rendered with the model's chat template."""
        out = self.generate([self.chat_prompt(messages)], params)[0]
        if out.finish_reason == "error":
            raise LemmaError(out.error)
        return out

    @staticmethod
    def _output(seq: Sequence) -> Output:
        return Output(seq.text, list(seq.output_ids), seq.finish_reason, seq.stats, list(seq.prompt_ids), seq.error)
