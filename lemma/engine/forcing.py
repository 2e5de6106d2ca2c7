"""Teacher forcing: a known continuation replayed under a KV policy, as generation would see it, scoring
each target (its log-probability and the model's argmax). Everything the engine does for it is here:
`teacher_force` (what Engine.teacher_force hands off to) submits the requests with their `Forcing`
state; `ChunkedReplay` is the engine step's replay part (a page of targets per forward, exact, see
engine/replay.py; or, for a chunk inside a shared Dense prefix, Dense's recorded attention inputs,
engine/recording.py); the scoring functions turn logits into the forced tokens. The decode loop only
sees sequences that emit given tokens instead of sampled ones.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from lemma.engine.decode_state import CONTINUE
from lemma.engine.policies import Dense, Policy
from lemma.engine.recording import Recorder, Recording
from lemma.engine.replay import ReplayAttention, ReplayBatch
from lemma.engine.sampler import SamplingParams
from lemma.engine.sequence import Failed, Forced, Forcing, RequestOutput, Sequence, Stats
from lemma.errors import LemmaError

if TYPE_CHECKING:
    from lemma.engine.engine import Engine
    from lemma.engine.prompts import Prompt
    from lemma.engine.runner import ModelRunner

CPU_ROWS_PER_UPCAST = 2  # fp32 logits of 2 rows of a 150K vocabulary (1.2 MB) stay in L2: 2.3x faster


class ChunkedReplay:
    """The replay part of an engine step, over the runner's model and pool."""

    def __init__(self, runner: "ModelRunner"):
        self.runner = runner

    def step(self, groups: dict[Policy, list[Sequence]]) -> list[tuple[Sequence, list[int | Failed], float]]:
        """Replay every chunked teacher-forced sequence's next chunk: (sequence, its forced tokens, seconds)."""
        done = []
        for policy, seqs in groups.items():
            start = time.perf_counter()
            replayed = self.replay(seqs, policy)
            elapsed = time.perf_counter() - start
            for seq, rows in zip(seqs, replayed):  # logits [T, V], or T tokens from the shared prefix
                done.append((seq, score_recorded(seq, rows) if isinstance(rows, int) else score_rows(rows, seq), elapsed))
        return done

    @torch.inference_mode()
    def replay(self, seqs: list[Sequence], policy: Policy) -> list[torch.Tensor | int]:
        """Feed each sequence its known tokens up to the end of the current page (one forward for all of
        them); per sequence, the logits [T, V] after each fed token, in the model's dtype. Equals T decode
        steps. A sequence whose chunk lies in its shared prefix is fed Dense's recorded attention inputs
        instead, without the model: the chunk's length T for it."""
        runner = self.runner
        spans = [seq.replay_span(runner.pool.page_size) for seq in seqs]
        shared = [self._shares(seq, policy, span) for seq, span in zip(seqs, spans)]
        modeled = [i for i, s in enumerate(shared) if not s]
        recorded = [i for i, s in enumerate(shared) if s]
        logits: dict[int, torch.Tensor] = {}
        if modeled:
            inputs, lengths = self._inputs([seqs[i] for i in modeled], [spans[i] for i in modeled])
            modeled = [seqs[i] for i in modeled]
            recorders: list[Recorder] = []
            if runner.cluster is not None:
                runner.cluster.send(("replay", policy, inputs))
            else:  # a recording holds one rank's heads under tensor parallelism: none there
                row = 0
                for seq, count in zip(modeled, lengths):
                    if seq.forcing.recording is not None:
                        recorders.append((seq.forcing.recording, row, seq.num_tokens - 1, count))
                    row += count
            rows = runner.collective(runner.replay_forward, policy, *inputs, recorders)
            logits = {seq.uid: part for seq, part in zip(modeled, rows.split(lengths))}
        if recorded:
            self._recorded([seqs[i] for i in recorded], [spans[i] for i in recorded], policy)
        return [logits[seq.uid] if seq.uid in logits else end - start for seq, (start, end) in zip(seqs, spans)]

    def _shares(self, seq: Sequence, policy: Policy, span: tuple[int, int]) -> bool:
        """Whether this chunk replays from the sequence's shared Dense prefix (not under tensor parallelism)."""
        prefix = seq.forcing.shared_prefix
        if prefix is None or self.runner.cluster is not None:
            return False
        start, end = span
        return prefix.start <= start and end <= min(prefix.end, policy.dense_prefix(len(seq.prompt_ids)))

    def _inputs(self, seqs: list[Sequence], spans: list[tuple[int, int]]) -> tuple[tuple, list[int]]:
        """The replay forward's inputs (tokens, positions, ReplayBatch) for each sequence's next chunk
        (its span), with the page open the page owner decided where a chunk starts a page; and the chunk lengths."""
        pool, device = self.runner.pool, self.runner.device
        page, layers = pool.page_size, pool.num_layers
        tokens, positions, tables, modes, new_slots = [], [], [], [], []
        for seq, (start, end) in zip(seqs, spans):
            opening = seq.opening if start % page == 0 else None  # decided by the page owner, as for decode
            modes.append([CONTINUE] * layers if opening is None else opening.modes)
            new_slots.append([0] * layers if opening is None else opening.slots)
            width = max(len(p) for p in seq.pages)
            tables.append(torch.tensor([p + [-1] * (width - len(p)) for p in seq.pages]))
            tokens += (seq.prompt_ids + seq.forcing.targets)[start:end]
            positions.append(torch.arange(start, end))
        lengths = [len(p) for p in positions]
        inputs = (torch.tensor(tokens, device=device), torch.cat(positions).to(device),
                  ReplayBatch.build(tables, modes, new_slots, lengths, device))
        return inputs, lengths

    def _recorded(self, seqs: list[Sequence], spans: list[tuple[int, int]], policy: Policy) -> None:
        """The attention phases alone, per layer, on each sequence's recorded q/k/v of its chunk (span)."""
        runner = self.runner
        (_, positions, batch), _ = self._inputs(seqs, spans)
        attend = ReplayAttention(runner.pool, policy, runner.scale, batch, positions, outputs=False)
        for layer in range(runner.pool.num_layers):
            parts = [seq.forcing.shared_prefix.inputs(layer, start, end) for seq, (start, end) in zip(seqs, spans)]
            attend(layer, *(torch.cat(rows).to(runner.device) for rows in zip(*parts)))


# ---- scoring: logits -> the forced tokens ---------------------------------------------------------------
def score_step(logits: torch.Tensor, seqs: list[Sequence]) -> list[int | Failed]:
    """One decode step's rows [n, V] of teacher-forced sequences (unchunked replay): each emits its next
    target, recording its log-probability and the argmax; Failed where the logits are not finite."""
    targets = [seq.forcing.targets[len(seq.output_ids)] for seq in seqs]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(targets, device=logits.device)[:, None])[:, 0]
    finite = torch.isfinite(logits).all(-1).tolist()
    tokens: list[int | Failed] = []
    for seq, target, lp, top, ok in zip(seqs, targets, chosen.tolist(), logprobs.argmax(-1).tolist(), finite):
        seq.forcing.logprobs.append(lp)
        seq.forcing.predicted.append(top)
        tokens.append(target if ok else Failed.non_finite(seq.num_tokens - 1))
    return tokens


def score_rows(logits: torch.Tensor, seq: Sequence) -> list[int | Failed]:
    """A chunked replay's T forced tokens from its logits [T, V] (any float dtype): records each target's
    log-probability and the model's argmax; Failed at the first row whose logits are not finite."""
    forcing, done = seq.forcing, len(seq.output_ids)
    targets = forcing.targets[done : done + logits.shape[0]]
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
    tokens: list[int | Failed] = []
    for target, lp, top, ok in zip(targets, *rows):
        if not ok:
            tokens.append(Failed.non_finite(done + len(tokens) + len(seq.prompt_ids) - 1))
            break
        forcing.logprobs.append(lp)
        forcing.predicted.append(int(top))
        tokens.append(target)
    return tokens


def score_recorded(seq: Sequence, count: int) -> list[int]:
    """A chunk replayed from the sequence's shared Dense prefix: its next `count` forced tokens, with
    Dense's log-probabilities and argmax for them (engine/recording.py: they are the same)."""
    forcing, done = seq.forcing, len(seq.output_ids)
    logprobs, predicted = forcing.shared_prefix.scores(done, count)
    forcing.logprobs += logprobs
    forcing.predicted += predicted
    forcing.shared_tokens += count
    return forcing.targets[done : done + count]


# ---- the blocking call -------------------------------------------------------------------------------------
def recording_source(engine: "Engine") -> tuple[str, str]:
    """(model folder, dtype): only an engine of the same may share a recording."""
    return str(engine.model_dir), str(engine.dtype).removeprefix("torch.")


def teacher_force(engine: "Engine", prompts: list["Prompt"], targets: list[list[int]], chunked: bool = True,
                  record_until: int = 0, shared: list[Recording | None] | None = None,
                  on_finished: Callable[[int, Forced], None] | None = None) -> list[Forced]:
    """Engine.teacher_force (see there): check, submit one forced request per prompt, follow them."""
    if not isinstance(prompts, (list, tuple)) or not isinstance(targets, (list, tuple)) or len(prompts) != len(targets):
        raise LemmaError("teacher_force needs a list of prompts and one target list per prompt")
    if shared is not None and len(shared) != len(prompts):
        raise LemmaError(f"teacher_force got {len(shared)} shared recordings for {len(prompts)} prompts")
    if isinstance(record_until, bool) or not isinstance(record_until, int) or record_until < 0:
        raise LemmaError(f"record_until must be a position >= 0, got {record_until!r}")
    if not chunked and (record_until or shared is not None):
        raise LemmaError("record_until and shared work on chunked replay only (chunked=True)")
    if record_until and not isinstance(engine.policy, Dense):
        raise LemmaError(f"record_until records Dense's attention inputs, but the policy is {engine.policy.describe()}")
    vocab = engine.config.vocab_size
    for i, target in enumerate(targets):
        if not isinstance(target, (list, tuple)) or not target:
            raise LemmaError(f"targets[{i}] must be a non-empty list of token ids")
        bad = [t for t in target if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise LemmaError(f"targets[{i}] token id {bad[0]!r} is outside the vocabulary [0, {vocab})")
    params = [SamplingParams(max_tokens=len(t), ignore_eos=True) for t in targets]
    box: deque[RequestOutput] = deque()
    forced = [list(t) for t in targets]
    source = recording_source(engine)

    def prepare(i: int, seq: Sequence) -> None:
        seq.forcing = Forcing(forced[i], chunked)
        seq.uses_prefix_cache = False  # a measurement: its prompt is computed, not read from the cache
        if record_until and engine.shares_prefixes:  # a rank's recording would hold only its heads
            seq.forcing.recording = Recording(seq.prompt_ids, forced[i], record_until, engine.config.num_layers, source)
        prefix = None if shared is None else shared[i]
        if prefix is not None:
            if not prefix.covers(seq.prompt_ids, forced[i]):
                raise LemmaError(f"shared[{i}] is a recording of other tokens than prompts[{i}] and targets[{i}]")
            if len(prefix.logprobs) < len(forced[i]):
                raise LemmaError(f"shared[{i}] is the recording of a replay that did not finish")
            if prefix.source != source:
                raise LemmaError(f"shared[{i}] was recorded with {prefix.source[0]} in {prefix.source[1]}, "
                                 f"not with this engine's {source[0]} in {source[1]}")
            seq.forcing.shared_prefix = prefix

    seqs, failed = engine._submit_all(list(prompts), params, box, prepare=prepare)
    results = {i: Forced([], [], Stats(), out.error) for i, out in failed.items()}
    index = {s.request_id: i for i, s in enumerate(seqs) if s is not None}
    if on_finished is not None:
        for i, f in results.items():
            on_finished(i, f)
    for out in engine._follow(list(index), box):
        if out.finished:
            i = index[out.request_id]
            results[i] = forced_result(seqs[i])
            if on_finished is not None:
                on_finished(i, results[i])
    return [results[i] for i in range(len(seqs))]


def forced_result(seq: Sequence) -> Forced:
    forcing = seq.forcing
    if forcing.recording is not None:
        forcing.recording.logprobs, forcing.recording.predicted = forcing.logprobs, forcing.predicted
    return Forced(forcing.logprobs, forcing.predicted, seq.stats, seq.error, forcing.recording, forcing.shared_tokens)
