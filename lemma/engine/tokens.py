"""The token each sequence emits after a forward: sampled (with the histories penalties need), or, for
a teacher-forced request, the forced token (engine/forcing.py)."""

from __future__ import annotations

import logging

import torch

from lemma.engine.forcing import score_step
from lemma.engine.sampler import Sampler
from lemma.engine.sequence import Failed, Sequence

log = logging.getLogger("lemma")


def next_tokens(sampler: Sampler, logits: torch.Tensor, seqs: list[Sequence],
                counters: torch.Tensor) -> list[int | Failed]:
    """Sampled tokens, or for teacher-forced requests the forced token (engine/forcing.py records what
    the model gave it); Failed where the logits are not finite (NaN/inf: broken weights) or sampling
    that request raised."""
    forced = [i for i, s in enumerate(seqs) if s.forcing is not None]
    if not forced:
        return sample(sampler, logits, seqs, counters)
    tokens: list[int | Failed] = [0] * len(seqs)
    sampled = [i for i, s in enumerate(seqs) if s.forcing is None]
    if sampled:
        rows = torch.tensor(sampled, device=logits.device)
        for i, token in zip(sampled, sample(sampler, logits[rows], [seqs[i] for i in sampled], counters[rows])):
            tokens[i] = token
    rows = torch.tensor(forced, device=logits.device)
    for i, token in zip(forced, score_step(logits[rows], [seqs[i] for i in forced])):
        tokens[i] = token
    return tokens


def sample(sampler: Sampler, logits: torch.Tensor, seqs: list[Sequence], counters: torch.Tensor) -> list[int | Failed]:
    """The batch sampled at once; if that raises, each request alone, so only the one at fault fails."""
    try:
        return sample_batch(sampler, logits, seqs, counters)
    except Exception as exc:  # noqa: BLE001 - a request's own values; the step goes on without it
        if len(seqs) == 1:
            log.exception("sampling request %s failed", seqs[0].request_id)
            return [Failed(f"sampling failed: {type(exc).__name__}: {exc}")]
    return [token for i in range(len(seqs)) for token in sample(sampler, logits[i : i + 1], seqs[i : i + 1], counters[i : i + 1])]


def sample_batch(sampler: Sampler, logits: torch.Tensor, seqs: list[Sequence], counters: torch.Tensor) -> list[int | Failed]:
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
    return [token if ok else Failed.non_finite(seq.num_tokens - 1) for token, ok, seq in zip(*rows, seqs)]
