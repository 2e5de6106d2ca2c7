"""PageOwner: the one place that decides who holds which page of the KV pool.

The pool (engine/pool.py) is tensors; this is the host bookkeeping over them, per layer:

- free pages, and pages *reserved*: promised to admitted sequences and not taken yet, so a running
  sequence never finds its layer empty (the scheduler decides how much to promise);
- references: how many sequences hold each page. A page of the prefix cache (engine/prefix_cache.py)
  may be held by several sequences at once, read-only; when nobody holds it, it stays cached (idle)
  until `take` needs its room, least recently used first. Idle cached pages count as available;
- what a decode step does where a sequence's position opens a page: per layer a free page
  (NEW_SLOT) while it holds fewer than its capacity, else the policy's victim (EVICT), decided here
  once for the decode step and for teacher-forced replay alike;
- the cut of a prompt longer than a layer's capacity, and release.

Which pages may be shared: a prompt page is written by dense prefill under every policy, so its K/V
do not depend on the policy; what does is its pinned flag (part of its cache key) and whether anyone
may evict or overwrite it. So a full page is shareable where, in every layer, nothing evicts it: a
layer that keeps every page (Dense, Quest, a policy's dense layers) or a pinned prompt page (RaaS,
random with pin_prompt). Dense also leaves its generated pages behind when it finishes (their K/V
are what prefill would write, up to rounding), so the next turn of a conversation reads them.
Teacher-forced replays (measurements) neither read nor fill the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lemma.engine.decode_state import EVICT, NEW_SLOT
from lemma.engine.policies import Policy
from lemma.engine.pool import PAGE_SIZE
from lemma.engine.prefix_cache import PrefixCache, page_keys
from lemma.engine.sequence import DECODE, Sequence
from lemma.errors import LemmaError


@dataclass
class PageOpen:
    """What a step does at a sequence's page boundary, per layer: NEW_SLOT (into `slots[layer]`) or EVICT."""

    modes: list[int]
    slots: list[int]


def is_pinned(policy: Policy, prompt_len: int, page_size: int, logical: int) -> bool:
    """Whether logical page `logical` of a prompt is pinned (never evicted): every prompt page, or where
    the policy pins fewer, the first one and the last ones."""
    prompt_pages = -(-prompt_len // page_size)
    count = policy.pinned_prompt_pages(prompt_pages)
    return logical < prompt_pages and (logical >= prompt_pages - count + 1 or (logical == 0 and count > 0))


def prompt_pins(policy: Policy, prompt_len: int, page: int, start: int, end: int) -> torch.Tensor:
    """[n] whether each logical page a prefill chunk [start, end) writes is pinned."""
    return torch.tensor([is_pinned(policy, prompt_len, page, i) for i in range(start // page, -(-end // page))],
                        dtype=torch.bool)


class PageOwner:
    def __init__(self, num_layers: int, num_pages: int, page_size: int = PAGE_SIZE, prefix_cache: bool = True):
        self.num_layers, self.num_pages, self.page_size = num_layers, num_pages, page_size
        self.free: list[list[int]] = [list(range(num_pages - 1, -1, -1)) for _ in range(num_layers)]  # pop(): low ids first
        self.refs: list[list[int]] = [[0] * num_pages for _ in range(num_layers)]  # sequences holding each page
        self.reserved = [0] * num_layers  # promised to admitted sequences, not taken yet
        self.idle = [0] * num_layers  # cached pages nobody holds
        self.cache = PrefixCache(num_layers) if prefix_cache else None
        self.pending: dict[bytes, int] = {}  # cache keys a running sequence is prefilling -> its uid

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    # ---- reservations ---------------------------------------------------------------------------------
    def available(self, layer: int) -> int:
        return len(self.free[layer]) + self.idle[layer] - self.reserved[layer]

    def can_reserve(self, pages: list[int]) -> bool:
        return all(n <= self.available(layer) for layer, n in enumerate(pages))

    def reserve(self, seq: Sequence, pages: list[int]) -> None:
        """Promise `seq` pages[layer] more pages per layer."""
        if not self.can_reserve(pages):
            raise LemmaError(f"KV pool cannot reserve {max(pages)} pages per layer "
                             f"({min(map(self.available, range(self.num_layers)))} available)")
        for layer, n in enumerate(pages):
            self.reserved[layer] += n
            seq.reserved[layer] += n

    def admit(self, seq: Sequence, need: list[int]) -> bool:
        """Give `seq` its admission promise of need[layer] pages per layer: the longest cached prefix of
        its tokens, held at once (seq.prefilled moves past it), and a reservation for the rest. False,
        with nothing changed, when the pool cannot, or when the page after the cached prefix is being
        written by a running sequence (it is admitted after that page is cached)."""
        shared = self._lookup(seq)
        if shared is None:
            return False
        count, layers = len(shared), range(self.num_layers)
        new = [max(n - count, 0) for n in need]
        woken = [sum(self.refs[layer][pages[layer]] == 0 for pages in shared) for layer in layers]
        if any(new[layer] > self.available(layer) - woken[layer] for layer in layers):
            return False
        seq.pages, seq.reserved = [[] for _ in layers], [0] * self.num_layers
        for pages in shared:
            for layer in layers:
                self._hold(layer, pages[layer])
                seq.pages[layer].append(pages[layer])
        self.reserve(seq, new)
        seq.prefilled = count * self.page_size
        if not seq.stats.preemptions:  # readmitted, it may find its own pages: those are not the prompt's
            seq.stats.cached_tokens = seq.prefilled
        if self.cache is not None and self.caches(seq):
            keys = self._keys(seq)
            self.cache.touch(keys[:count])
            stats = self.cache.stats
            stats.lookups, stats.hits = stats.lookups + 1, stats.hits + (count > 0)
            stats.queried_tokens += seq.num_tokens
            stats.cached_tokens += seq.prefilled
            for key in keys[count:]:
                self.pending.setdefault(key, seq.uid)
        return True

    # ---- pages of one sequence -----------------------------------------------------------------------
    def take(self, seq: Sequence, layer: int) -> int:
        """A page of `layer` from seq's reservation, appended as its next slot; returns the slot."""
        assert seq.reserved[layer] > 0 and self.reserved[layer] > 0, "take() without a reservation"
        seq.reserved[layer] -= 1
        self.reserved[layer] -= 1
        if not self.free[layer]:
            self._evict_cached(layer)
        page = self.free[layer].pop()
        self.refs[layer][page] = 1
        seq.pages[layer].append(page)
        return len(seq.pages[layer]) - 1

    def fill_to(self, seq: Sequence, end: int) -> None:
        """Pages for a prefill chunk ending at `end`: every layer holds the pages of positions [0, end)."""
        need = self.pages_for(end)
        for layer in range(self.num_layers):
            while len(seq.pages[layer]) < need:
                self.take(seq, layer)

    def open(self, seq: Sequence) -> PageOpen | None:
        """Where seq's next position starts a page: per layer a new slot while it holds fewer pages than
        its capacity, else an eviction (None inside a page)."""
        if (seq.num_tokens - 1) % self.page_size:
            return None
        modes, slots = [EVICT] * self.num_layers, [0] * self.num_layers
        for layer in range(self.num_layers):
            if len(seq.pages[layer]) < seq.capacity[layer]:
                modes[layer], slots[layer] = NEW_SLOT, self.take(seq, layer)
        seq.stats.pages_evicted += EVICT in modes
        return PageOpen(modes, slots)

    def cut_to_capacity(self, seq: Sequence) -> None:
        """The prompt is in: a layer over its capacity keeps its first page (the sink) and its most recent
        pages, the same for every KV head; the rest are let go."""
        most = 0
        for layer, cap in enumerate(seq.capacity):
            pages = seq.pages[layer]
            if len(pages) > cap:
                dropped = pages[1 : len(pages) - cap + 1]
                seq.pages[layer] = pages[:1] + pages[len(pages) - cap + 1 :]
                for page in dropped:
                    self._drop(layer, page)
                most = max(most, len(dropped))
        seq.stats.pages_evicted += most

    def publish(self, seq: Sequence, end: int) -> None:
        """Cache seq's shareable full pages of positions [0, end), all written (after a prefill chunk, or
        when a Dense sequence finishes); their logical order is still their slot order here."""
        if self.cache is None or not self.caches(seq):
            return
        keys = self._keys(seq)[: end // self.page_size]
        for i, key in enumerate(keys):
            self.cache.add(key, [seq.pages[layer][i] for layer in range(self.num_layers)])
            if self.pending.get(key) == seq.uid:
                del self.pending[key]

    def release(self, seq: Sequence) -> None:
        """Let go of everything seq holds and was promised (finished, aborted, failed or preempted)."""
        if self.cache is not None and self.caches(seq):
            if keeps_every_page(seq.policy) and seq.finish_reason != "error":
                # positions in the pool: all but the last token (sampled, never fed), or the prefill so far
                self.publish(seq, seq.num_tokens - 1 if seq.status == DECODE else seq.prefilled)
            keys = self._keys(seq)
            self.cache.touch(keys[::-1])  # its first pages leave the cache last
        for key in [k for k, uid in self.pending.items() if uid == seq.uid]:
            del self.pending[key]
        for layer, (pages, unused) in enumerate(zip(seq.pages, seq.reserved)):
            for page in reversed(pages):
                self._drop(layer, page)
            self.reserved[layer] -= unused
        seq.pages, seq.reserved = [[] for _ in seq.pages], [0] * len(seq.reserved)

    # ---- the cache ------------------------------------------------------------------------------------
    def caches(self, seq: Sequence) -> bool:
        """Whether seq reads and fills the prefix cache (not a teacher-forced replay)."""
        return self.cache is not None and seq.uses_prefix_cache

    def shareable(self, policy: Policy, prompt_len: int, logical: int) -> bool:
        """Whether no sequence under `policy` ever evicts or overwrites this full page in any layer."""
        if not policy.evicts:
            return True
        pinned = is_pinned(policy, prompt_len, self.page_size, logical)
        return pinned or not any(policy.sparse(layer) for layer in range(self.num_layers))

    def signature(self, policy: Policy, prompt_len: int, logical: int) -> bytes:
        pinned = is_pinned(policy, prompt_len, self.page_size, logical)
        return bytes(int(pinned and policy.sparse(layer)) for layer in range(self.num_layers))

    def _keys(self, seq: Sequence) -> list[bytes]:
        """Cache keys of seq's full pages that may be shared, up to the first that may not."""
        tokens = seq.all_ids
        if seq.page_keys_for != len(tokens):
            prompt_len, signatures = len(seq.prompt_ids), []
            for logical in range(len(tokens) // self.page_size):
                if not self.shareable(seq.policy, prompt_len, logical):
                    break
                signatures.append(self.signature(seq.policy, prompt_len, logical))
            seq.page_keys, seq.page_keys_for = page_keys(tokens, signatures, self.page_size), len(tokens)
        return seq.page_keys

    def _lookup(self, seq: Sequence) -> list[list[int]] | None:
        """Pages of seq's longest cached prefix (at least one token is left to prefill: its logits are
        needed), or None when the next page is being written by a running sequence."""
        if not self.caches(seq):
            return []
        usable = self._keys(seq)[: (seq.num_tokens - 1) // self.page_size]
        found = self.cache.match(usable)
        if len(found) < len(usable) and self.pending.get(usable[len(found)], seq.uid) != seq.uid:
            return None
        return found

    def _hold(self, layer: int, page: int) -> None:
        if self.refs[layer][page] == 0:
            self.idle[layer] -= 1  # only cached pages are held without being taken
        self.refs[layer][page] += 1

    def _drop(self, layer: int, page: int) -> None:
        self.refs[layer][page] -= 1
        assert self.refs[layer][page] >= 0, f"page {page} of layer {layer} released twice"
        if self.refs[layer][page] == 0:
            if self.cache is not None and self.cache.holds(layer, page):
                self.idle[layer] += 1
            else:
                self.free[layer].append(page)

    def _evict_cached(self, layer: int) -> None:
        """Room in `layer`: the least recently used cached entry whose page there nobody holds leaves the cache."""
        key = self.cache.oldest_with_idle(layer, lambda l, p: self.refs[l][p] == 0) if self.cache else None
        assert key is not None, f"layer {layer} has no free or idle page for a reservation"
        self._uncache(key)
        self.cache.stats.evicted_pages += 1

    def _uncache(self, key: bytes) -> None:
        """Drop one entry: its idle pages in every layer go free; pages still held stay with their holders."""
        for layer, page in enumerate(self.cache.remove(key)):
            if self.refs[layer][page] == 0:
                self.idle[layer] -= 1
                self.free[layer].append(page)

    def clear_cache(self) -> None:
        """Forget every cached page (pages held stay with their holders, uncached)."""
        if self.cache is not None:
            for key in list(self.cache.entries):
                self._uncache(key)

    # ---- what the pool holds ------------------------------------------------------------------------------
    @property
    def cached_pages(self) -> int:
        """Logical pages in the cache (each one page per layer)."""
        return 0 if self.cache is None else len(self.cache)

    @property
    def all_free(self) -> bool:
        """Nothing held by a sequence and nothing promised: every page is free or idle in the cache."""
        for layer in range(self.num_layers):
            free = self.free[layer]
            if any(self.refs[layer]) or self.reserved[layer] or len(free) != len(set(free)):
                return False
            if len(free) + self.idle[layer] != self.num_pages:
                return False
        return not self.pending


def keeps_every_page(policy: Policy) -> bool:
    """Dense: decodes attending every page, so its generated pages hold what prefill would write."""
    return not policy.evicts and policy.budget is None
