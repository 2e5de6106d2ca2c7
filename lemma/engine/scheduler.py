"""Scheduler: which requests run, who gets pages, and what one engine step computes.

Host bookkeeping only (no model, no tensors); the pages themselves are engine/pages.py's. Requests
wait in FIFO order and are admitted while the batch has room and the pool can promise their pages
(a request whose prompt starts with cached pages holds those and is promised the rest):

- an evicting policy reserves its whole budget at admission (it never needs more, so it is never
  preempted);
- Dense and Quest take pages on demand: admission reserves the tokens present plus the next one, and
  each later page is reserved when the sequence reaches it. When the pool cannot give one, the newest
  running on-demand request is preempted: its pages go back and it waits at the head of the queue, to
  be recomputed from its prompt and the tokens it already generated. Dense continues as if nothing
  happened (the same greedy tokens, up to prefill/decode rounding on near-ties in low precision);
  Quest's rebuilt cache comes from dense prefill, while its decode-time K/V above layer 0 came from
  sparse attention, so its later tokens may differ from an unpreempted run.

Each step decodes every decoding sequence in one forward (the rows of each policy a contiguous slice
with its own page tables; where a sequence's position starts a page, the page owner decides per layer
between a new slot and an eviction) and prefills
chunks of the prefilling ones under a token budget, several prompts in one forward, so long prompts
never stall the running batch.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from lemma.engine.pages import PageOwner
from lemma.engine.policies import Policy
from lemma.engine.sequence import DECODE, FINISHED, PREFILL, WAITING, Sequence


@dataclass
class StepPlan:
    decode: dict[Policy, list[Sequence]] = field(default_factory=dict)  # admission order within a policy
    replay: dict[Policy, list[Sequence]] = field(default_factory=dict)  # teacher-forced, a page per step
    prefill: list[tuple[Sequence, Policy, int, int]] = field(default_factory=list)  # (seq, policy, start, end)


class Scheduler:
    def __init__(self, pages: PageOwner, max_batch: int, step_tokens: int):
        self.pages, self.max_batch = pages, max_batch
        page = pages.page_size
        self.step_tokens = max(page, step_tokens // page * page)  # prefill chunks end on page boundaries
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order, prefilling and decoding
        self.peak_running = 0  # most requests running at once so far
        self.preemptions = 0
        self.decode_steps = 0  # steps that decoded, and the tokens they fed (one per sequence, a page per replay)
        self.decoded = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def find(self, request_id: str) -> Sequence | None:
        for seq in (*self.running, *self.waiting):
            if seq.request_id == request_id:
                return seq
        return None

    def remove(self, seq: Sequence) -> None:
        """Take a request out (finished, aborted or failed): its pages go back to the pool."""
        if seq in self.running:
            self.running.remove(seq)
            self.pages.release(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = FINISHED

    # ---- one step ----------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        self._grow()  # running requests get their next pages before anyone new is admitted
        self._admit()
        plan = StepPlan()
        decoding = 0
        for seq in self.running:
            if seq.status == DECODE:
                (plan.replay if seq.replays else plan.decode).setdefault(seq.policy, []).append(seq)
                seq.opening = self.pages.open(seq)
                start, end = seq.replay_span(self.pages.page_size) if seq.replays else (0, 1)
                decoding += end - start
        self.decode_steps += decoding > 0
        self.decoded += decoding
        plan.prefill = self._chunks(self.step_tokens - decoding)
        for seq, _, _, end in plan.prefill:
            self.pages.fill_to(seq, end)
        return plan

    def reservation(self, seq: Sequence) -> list[int]:
        """Pages per layer to promise `seq` at admission."""
        tokens = seq.num_tokens  # the prompt, plus what it generated before a preemption
        if seq.grows:  # what it holds after prefill and its first decode step
            return [self.pages.pages_for(tokens + 1)] * self.pages.num_layers
        return [max(self.pages.pages_for(tokens), cap) for cap in seq.capacity]  # prefill holds the whole prompt

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            if not self.pages.admit(seq, self.reservation(seq)):
                # requests are checked against the whole pool when added, so with nothing running it fits
                assert self.running, f"request {seq.request_id} cannot be admitted into an idle pool"
                return
            self.waiting.popleft()
            seq.status = PREFILL
            self.running.append(seq)
            self.peak_running = max(self.peak_running, len(self.running))

    def _page_needs(self, seq: Sequence) -> list[int]:
        """Pages per layer `seq` must still be promised for its next decode step."""
        if not seq.grows or (seq.num_tokens - 1) % self.pages.page_size:
            return [0] * self.pages.num_layers
        return [int(len(pages) < cap and left == 0) for pages, cap, left in zip(seq.pages, seq.capacity, seq.reserved)]

    def _grow(self) -> None:
        """Promise every decoding sequence that opens a page this step one more page per layer, oldest
        first; preempt the newest on-demand requests when the pool runs out."""
        for seq in list(self.running):
            if seq.status != DECODE or seq not in self.running:
                continue
            need = self._page_needs(seq)
            if not any(need):
                continue
            while not self.pages.can_reserve(need):
                victim = next(s for s in reversed(self.running) if s.grows)  # seq itself grows
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.pages.reserve(seq, need)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.pages.release(seq)
        seq.status, seq.prefilled = WAITING, 0
        seq.new_uid()  # its old batch row (and page table) must not be taken for its new pages
        seq.stats.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def _chunks(self, budget: int) -> list[tuple[Sequence, Policy, int, int]]:
        """Prefill chunks for this step within `budget` tokens; the first prefilling sequence always
        moves by at least a page, whatever the decode batch takes."""
        page, chunks = self.pages.page_size, []
        for seq in self.running:
            if seq.status != PREFILL:
                continue
            room = budget if chunks else max(budget, page)
            start, total = seq.prefilled, seq.num_tokens
            end = min(total, start + room)
            if end < total:
                end = start + (end - start) // page * page
            if end <= start:
                break
            chunks.append((seq, seq.policy, start, end))
            budget -= end - start
        return chunks
