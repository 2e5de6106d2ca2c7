"""Cost of keeping the decode step's page tables current at L=24 layers, B=32 sequences, S=512 pages
each: rebuilding an [L, B, S] table from nested lists (what the step did before the persistent
DecodeState) vs the DecodeState updates (one entry when a page opens; a row rewrite when a sequence
joins).

    OMP_NUM_THREADS=1 python bench/page_table_cost.py
"""

from __future__ import annotations

import time

import torch

from lemma.engine.decode_state import DecodeState

LAYERS, BATCH, SLOTS = 24, 32, 512


def median_ms(fn, repeats: int = 20) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return 1000 * sorted(samples)[len(samples) // 2]


def main() -> None:
    pages = [[list(range(b * SLOTS, (b + 1) * SLOTS)) for _ in range(LAYERS)] for b in range(BATCH)]
    rebuild = median_ms(lambda: torch.tensor([[pages[b][layer] for b in range(BATCH)] for layer in range(LAYERS)]))
    state = DecodeState(LAYERS, BATCH, torch.device("cpu"))
    uids = list(range(BATCH))
    state.set_rows(uids, pages)
    page_open = median_ms(lambda: [state.set_page(layer, 5, SLOTS - 1, 7) for layer in range(LAYERS)])
    joins = iter(range(BATCH, BATCH + 1000))

    def join():  # the first sequence leaves, a new one joins at the end: every row moves up
        uids.append(next(joins))
        uids.pop(0)
        state.set_rows(list(uids), [pages[0]] * BATCH)

    join_ms = median_ms(join)
    print(f"L={LAYERS} B={BATCH} S={SLOTS}: rebuild from nested lists {rebuild:.1f} ms; "
          f"DecodeState: a page opens in every layer {page_open:.3f} ms, a sequence leaves and one joins {join_ms:.1f} ms")


if __name__ == "__main__":
    main()
