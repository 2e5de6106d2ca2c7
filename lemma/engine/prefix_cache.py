"""Prefix cache: full KV pages of earlier requests, found again by the tokens they hold.

A page is named by a hash chain: the key of logical page i hashes the key of page i-1, the page's
tokens and its *signature*, the per-layer pinned flags the request's policy gives it. The chain makes
a key stand for the whole prefix up to that page, so a lookup walks a new prompt page by page and
stops at the first miss. The signature keeps the cache honest under eviction: a page holds the same
K/V under every policy (prefill attends densely), but its pinned flag is part of what it holds, and
only a page that no sequence can ever evict or overwrite may be shared (engine/pages.py decides which).

The cache only names pages; engine/pages.py counts who holds them. Entries are kept in LRU order
(least recently used first) and leave when the pool needs their pages.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


def page_keys(tokens: list[int], signatures: list[bytes], page_size: int) -> list[bytes]:
    """The chain key of each full page of `tokens` (one signature per page, in order)."""
    keys, parent = [], page_size.to_bytes(4, "little")
    for i, signature in enumerate(signatures):
        block = np.asarray(tokens[i * page_size : (i + 1) * page_size], dtype=np.int64).tobytes()
        parent = hashlib.blake2b(parent + signature + block, digest_size=16).digest()
        keys.append(parent)
    return keys


@dataclass
class CacheStats:
    """What the cache did so far: lookups (requests that asked), tokens asked for and found."""

    lookups: int = 0
    hits: int = 0  # lookups that found at least one page
    queried_tokens: int = 0  # prompt tokens of the requests that asked
    cached_tokens: int = 0  # of those, read from the cache instead of prefilled
    evicted_pages: int = 0  # entries dropped for room (one page per layer each)


class PrefixCache:
    """key -> the page ids (one per layer) holding that logical page, in LRU order."""

    def __init__(self, num_layers: int):
        self.entries: OrderedDict[bytes, list[int]] = OrderedDict()
        self.key_of: list[dict[int, bytes]] = [{} for _ in range(num_layers)]  # per layer: page -> its key
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self.entries)

    def match(self, keys: list[bytes]) -> list[list[int]]:
        """Pages (per logical page, one id per layer) of the longest cached prefix of `keys`."""
        found = []
        for key in keys:
            pages = self.entries.get(key)
            if pages is None:
                break
            found.append(pages)
        return found

    def touch(self, keys: list[bytes]) -> None:
        """Mark entries used now; the last of `keys` becomes the most recent."""
        for key in keys:
            if key in self.entries:
                self.entries.move_to_end(key)

    def add(self, key: bytes, pages: list[int]) -> bool:
        """Name `pages` by `key` (False, and nothing changes, when the key or a page is named already)."""
        if key in self.entries or any(page in names for page, names in zip(pages, self.key_of)):
            return False
        self.entries[key] = list(pages)
        for page, names in zip(pages, self.key_of):
            names[page] = key
        return True

    def holds(self, layer: int, page: int) -> bool:
        return page in self.key_of[layer]

    def oldest_with_idle(self, layer: int, idle: Callable[[int, int], bool]) -> bytes | None:
        """The least recently used entry whose page in `layer` nobody holds (idle(layer, page))."""
        for key, pages in self.entries.items():
            if idle(layer, pages[layer]):
                return key
        return None

    def remove(self, key: bytes) -> list[int]:
        pages = self.entries.pop(key)
        for page, names in zip(pages, self.key_of):
            del names[page]
        return pages
