"""The token each sequence emits after a forward: sampled (with the histories penalties need), or, for
a teacher-forced request, the forced token (engine/forcing.py)."""

from __future__ import annotations

import torch

from lemma.engine.forcing import score_step
from lemma.engine.sampler import Sampler
from lemma.engine.sequence import Sequence


def next_tokens(sampler: Sampler, logits: torch.Tensor, seqs: list[Sequence],
                counters: torch.Tensor) -> list[int | None]:
    """Sampled tokens, or for teacher-forced requests the forced token (engine/forcing.py records what
    the model gave it); None where the logits are not finite (NaN/inf: broken weights)."""
    forced = [i for i, s in enumerate(seqs) if s.forcing is not None]
    if not forced:
        return sample(sampler, logits, seqs, counters)
    tokens: list[int | None] = [0] * len(seqs)
    sampled = [i for i, s in enumerate(seqs) if s.forcing is None]
    if sampled:
        rows = torch.tensor(sampled, device=logits.device)
        for i, token in zip(sampled, sample(sampler, logits[rows], [seqs[i] for i in sampled], counters[rows])):
            tokens[i] = token
    rows = torch.tensor(forced, device=logits.device)
    for i, token in zip(forced, score_step(logits[rows], [seqs[i] for i in forced])):
        tokens[i] = token
    return tokens


def sample(sampler: Sampler, logits: torch.Tensor, seqs: list[Sequence], counters: torch.Tensor) -> list[int | None]:
    params = [s.params for s in seqs]

    def padded(rows: list[list[int]]) -> torch.Tensor:
        width = max(map(len, rows), default=0)
        return torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.int64, device=logits.device)

    history = reply = torch.empty(0)
    if any(p.repetition_penalty != 1.0 for p in params):
        history = padded([s.all_ids for s in seqs])
    if any(p.presence_penalty or p.frequency_penalty for p in params):
        reply = padded([s.output_ids for s in seqs])
    tokens = sampler(logits, params, [s.seed for s in seqs], counters, history, reply)
    finite = torch.isfinite(logits).all(-1)
    rows = torch.stack([tokens, finite.to(tokens.dtype)]).tolist()  # one host transfer for both
    return [token if ok else None for token, ok in zip(*rows)]
