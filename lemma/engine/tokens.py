"""The token each sequence emits after a forward: sampled (with the histories penalties need), or,
for a teacher-forced request, the forced token, recording its log-probability and the model's argmax."""

from __future__ import annotations

import torch

from lemma.engine.sampler import Sampler
from lemma.engine.sequence import Sequence


def next_tokens(sampler: Sampler, logits: torch.Tensor, seqs: list[Sequence],
                counters: torch.Tensor) -> list[int | None]:
    """Sampled tokens, or for teacher-forced requests the forced token (recording what the model
    gave it and what it predicted); None where the logits are not finite (NaN/inf: broken weights)."""
    forced = [i for i, s in enumerate(seqs) if s.forced is not None]
    if not forced:
        return sample(sampler, logits, seqs, counters)
    tokens: list[int | None] = [0] * len(seqs)
    sampled = [i for i, s in enumerate(seqs) if s.forced is None]
    if sampled:
        rows = torch.tensor(sampled, device=logits.device)
        for i, token in zip(sampled, sample(sampler, logits[rows], [seqs[i] for i in sampled], counters[rows])):
            tokens[i] = token
    rows = torch.tensor(forced, device=logits.device)
    targets = [seqs[i].forced[len(seqs[i].output_ids)] for i in forced]
    logprobs = torch.log_softmax(logits[rows].float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(targets, device=logits.device)[:, None])[:, 0]
    for i, target, lp, top in zip(forced, targets, chosen.tolist(), logprobs.argmax(-1).tolist()):
        seqs[i].forced_logprobs.append(lp)
        seqs[i].predicted.append(top)
        tokens[i] = target
    finite = torch.isfinite(logits[rows]).all(-1).tolist()
    for i, ok in zip(forced, finite):
        tokens[i] = tokens[i] if ok else None
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


CPU_ROWS_PER_UPCAST = 2  # fp32 logits of 2 rows of a 150K vocabulary (1.2 MB) stay in L2: 2.3x faster


def force_rows(logits: torch.Tensor, seq: Sequence) -> list[int | None]:
    """A chunked replay's T forced tokens from its logits [T, V] (any float dtype): records each target's
    log-probability and the model's argmax; None from the first row whose logits are not finite."""
    done = len(seq.output_ids)
    targets = seq.forced[done : done + logits.shape[0]]
    index = torch.tensor(targets, device=logits.device)[:, None]
    step = CPU_ROWS_PER_UPCAST if logits.device.type == "cpu" else logits.shape[0]
    scored = []
    for at in range(0, logits.shape[0], step):  # upcast to fp32 a few rows at a time on CPU (cache-sized)
        block = logits[at : at + step].float()
        # log p(target) = logit - logsumexp: no [T, V] log-softmax; a row's sum is finite iff every logit is
        chosen = block.gather(1, index[at : at + step])[:, 0] - torch.logsumexp(block, -1)
        top, finite = block.argmax(-1).to(chosen.dtype), torch.isfinite(block.sum(-1)).to(chosen.dtype)
        scored.append(torch.stack([chosen, top, finite]))
    rows = torch.cat(scored, 1).tolist()  # one host transfer
    tokens: list[int | None] = []
    for target, lp, top, ok in zip(targets, *rows):
        if not ok:
            tokens.append(None)
            break
        seq.forced_logprobs.append(lp)
        seq.predicted.append(int(top))
        tokens.append(target)
    return tokens


def force_recorded(seq: Sequence, count: int) -> list[int]:
    """A chunk replayed from the sequence's shared Dense prefix: its next `count` forced tokens, with
    Dense's log-probabilities and argmax for them (engine/recording.py: they are the same)."""
    done = len(seq.output_ids)
    logprobs, predicted = seq.shared_prefix.scores(done, count)
    seq.forced_logprobs += logprobs
    seq.predicted += predicted
    seq.shared_tokens += count
    return seq.forced[done : done + count]
