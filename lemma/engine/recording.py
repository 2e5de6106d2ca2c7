"""Shared replay prefixes: a policy replays the positions where it attends exactly what Dense attends
from Dense's recorded attention inputs, instead of running the model there.

Before its first eviction an evicting policy holds every page, and Quest selects every page while it
holds at most its budget: their attention, hence every layer's hidden states and the logits, equal
Dense's up to `Policy.dense_prefix` (page-chunked replay is exact, engine/replay.py). What differs is
only the policy's own bookkeeping (page opens, key bounds, stamps, mass), which is a function of each
layer's post-RoPE q, k and v. So a Dense teacher-forced replay records those per layer at its first
positions, with what it scored there; a policy replay of the same prompt and targets then feeds its
chunks before that position to the attention phases alone (no projections, MLP or LM head) and takes
Dense's log-probs and argmax for them. The pool ends up with the same keys, values and metadata, and
the replay goes on through the model from there. Evaluating 24 configs against one Dense reference
this skips the shared part of every config's trace.
"""

from __future__ import annotations

import torch

from lemma.errors import LemmaError
from lemma.models.llama import ByLayer

Recorder = tuple["Recording", int, int, int]  # (recording, its first row in the forward, first position, rows)


class Recording:
    """Dense's q, k, v [rows, heads, dim] per layer at one teacher-forced sequence's replayed positions
    [start, end) (end <= limit), and its log-probs and argmax per target (set when the replay finishes).
    Memory: 2 bytes (bf16) x layers x (q + k + v heads) x head dim per position: ~55 KB for
    Qwen2.5-0.5B, so 1024 positions of 32 traces hold ~1.8 GB, on the model's device."""

    def __init__(self, prompt_ids: list[int], targets: list[int], limit: int, layers: int,
                 source: tuple[str, str] = ("", "")):
        self.prompt_ids, self.targets = list(prompt_ids), list(targets)
        self.source = source  # (model folder, dtype) that recorded it: only the same may share it
        self.start = self.end = len(prompt_ids)  # the first replayed position (prefill scores target 0)
        self.limit = min(limit, len(prompt_ids) + len(targets) - 1)  # the last target is never fed
        self.layers = layers
        self.logprobs: list[float] = []
        self.predicted: list[int] = []
        # one buffer [layers, positions, q heads + 2 kv heads, dim], allocated at the first put: one
        # large allocation per recording, not thousands of small ones (which fragment the CPU heap)
        self._rows: torch.Tensor | None = None
        self._heads = (0, 0)

    def put(self, layer: int, start: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Layer `layer`'s inputs at positions [start, start + rows). Kept only while they extend the
        recording without a gap (a preempted and re-prefilled sequence stops it) and before `limit`."""
        last = layer == self.layers - 1
        if start != self.end or start >= self.limit:
            if last:
                self.limit = min(self.limit, self.end)  # a gap: nothing past it is recorded
            return
        if self._rows is None:
            self._heads = (q.shape[1], k.shape[1])
            self._rows = torch.empty(self.layers, self.limit - self.start, q.shape[1] + 2 * k.shape[1], q.shape[2],
                                     dtype=q.dtype, device=q.device)
        rows = min(q.shape[0], self.limit - start)
        at = slice(start - self.start, start - self.start + rows)
        torch.cat([q[:rows], k[:rows], v[:rows]], dim=1, out=self._rows[layer, at])
        if last:
            self.end = start + rows

    def inputs(self, layer: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q, k, v) of `layer` at positions [start, end), which must lie within [self.start, self.end)."""
        if not self.start <= start <= end <= self.end or self._rows is None:
            raise LemmaError(f"positions [{start}, {end}) are outside the recording [{self.start}, {self.end})")
        rows = self._rows[layer, start - self.start : end - self.start]
        heads, kv_heads = self._heads
        return rows[:, :heads], rows[:, heads : heads + kv_heads], rows[:, heads + kv_heads :]

    def scores(self, first: int, count: int) -> tuple[list[float], list[int]]:
        """Dense's log-probs and argmax of targets [first, first + count)."""
        if first + count > len(self.logprobs):
            raise LemmaError(f"the recording has Dense's scores of {len(self.logprobs)} targets, not of "
                             f"[{first}, {first + count}): its replay has not finished")
        return self.logprobs[first : first + count], self.predicted[first : first + count]

    def finish_as(self, targets: list[int], logprobs: list[float], predicted: list[int]) -> None:
        """Take a finished reference replay's targets and scores: a recording made by replaying only
        the targets' first part (what the recording needs) stands for the whole replay."""
        if len(targets) < len(self.targets) or targets[: len(self.targets)] != self.targets:
            raise LemmaError("finish_as needs targets that extend the recorded ones")
        if len(logprobs) != len(targets) or len(predicted) != len(targets):
            raise LemmaError(f"finish_as needs one score per target: {len(targets)} targets, "
                             f"{len(logprobs)} log-probs, {len(predicted)} argmax")
        self.targets, self.logprobs, self.predicted = list(targets), list(logprobs), list(predicted)

    def covers(self, prompt_ids: list[int], targets: list[int]) -> bool:
        """Whether this recording is of the same prompt and targets."""
        return prompt_ids == self.prompt_ids and targets == self.targets


class RecordingAttend(ByLayer):
    """`attend`, also handing each recording its sequence's rows of every layer's q, k, v."""

    def __init__(self, attend: ByLayer, recorders: list[Recorder]):
        self.attend, self.recorders = attend, recorders

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        for recording, row, position, count in self.recorders:
            recording.put(layer, position, q[row : row + count], k[row : row + count], v[row : row + count])
        return self.attend(layer, q, k, v)
