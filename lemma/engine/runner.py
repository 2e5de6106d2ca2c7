"""ModelRunner: runs the model for a prefill chunk or a decode step over the paged pool.

Between steps the host does bookkeeping only: which sequence sits in which batch row, and the page
opens the page owner decided (engine/pages.py: a new slot or an eviction, per layer), written into
the persistent DecodeState (one per policy). It takes pages, tensors and tokens in and gives logits out.
The decode step itself (`decode_step`) is a pure function of fixed-shape tensors: eager, with its decoder
layers compiled (engine/compiled.py), or, on CUDA, captured once per batch bucket as a CUDA graph and
replayed. Requests under different policies share one step: the rows of each policy are one slice, padded
to a bucket (its own on CPU, the largest slice's on CUDA: `mixed_rows`); projections and MLP run over all
rows, each layer's attention per slice, so a row's policy is a static fact of the graph (the graph of a
mix is keyed by its (policy, bucket) slices).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from lemma.engine.attention import DecodeAttention, PrefillAttention, PrefillSegment
from lemma.engine.compiled import compile_decode
from lemma.engine.decode_state import MIN_SLOTS, NEW_SLOT, DecodeState, StepInputs, batch_bucket
from lemma.engine.graphs import CudaGraphs
from lemma.engine.pages import prompt_pins
from lemma.engine.policies import Policy
from lemma.engine.pool import KVPool
from lemma.engine.recording import Recorder, RecordingAttend
from lemma.engine.replay import ReplayAttention, ReplayBatch
from lemma.errors import LemmaError
from lemma.engine.sequence import Sequence
from lemma.kernels import kernel_ops
from lemma.models.llama import CausalLM, call_head, call_layer

if TYPE_CHECKING:
    from lemma.engine.tensor_parallel import Cluster

PrefillChunk = tuple[Sequence, Policy, int, int]  # (sequence, its policy, first position, end position)
DecodeGroup = tuple[Policy, list[Sequence]]  # sequences decoding under one policy: one row slice of the step
# observer(layer, born [B,Hkv,S], valid, step mass [B,Hkv,S], evicted born [B,Hkv] or -1): for traces
Observer = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
MAX_POLICY_STATES = 8  # distinct KV policies whose decode state (and CUDA graphs) are kept while idle


class ModelRunner:
    def __init__(self, model: CausalLM, pool: KVPool, attention: str = "torch", max_batch: int = 32,
                 compile: bool | str = False, max_slots: int | None = None):
        """max_slots: the most pages a sequence may hold in a layer (the width of the page tables)."""
        self.model, self.pool = model, pool
        self.ops = kernel_ops(attention)
        self.device = pool.device
        self.scale = model.config.head_dim ** -0.5
        self.max_batch = max_batch
        self.max_slots = pool.num_pages if max_slots is None else max_slots
        self.states: dict[Policy, DecodeState] = {}  # one persistent step state per policy in use
        self.cluster: Cluster | None = None  # tensor parallelism: the other ranks, sent each forward's inputs
        self.observer: Observer | None = None  # called outside the step, from the step's trace outputs
        self.run_layer, self.run_head = call_layer, call_head  # how the decode step runs its layers and head
        self._graphs: CudaGraphs | None = None
        backend = "inductor" if compile is True else compile
        if compile and self.device.type == "cuda":
            # launches are what a GPU step loses to: capture the step once per mix of (policy, batch
            # bucket) slices, replay it after; compile="inductor" also fuses its layers with inductor first
            self._graphs = CudaGraphs()
        if compile and not (compile is True and self.device.type == "cuda"):
            self.run_layer, self.run_head = compile_decode(backend, self.device)

    def forget_policies(self, keep: set[Policy]) -> None:
        """Past MAX_POLICY_STATES policies, drop the step states (and CUDA graphs) of those not running,
        so per-request policies cannot grow memory without bound."""
        for policy, state in self.states.items():
            if state.rows and policy not in keep:  # idle: its rows' sequences are gone (warm_up may capture)
                state.set_rows([], [])
        if len(self.states) <= MAX_POLICY_STATES:
            return
        for policy in [p for p in self.states if p not in keep]:
            del self.states[policy]
            if self._graphs is not None:
                self._graphs.forget(lambda key: any(p == policy for p, _ in key))

    def state_for(self, policy: Policy) -> DecodeState:
        """The persistent decode state of the sequences running under `policy`."""
        if policy not in self.states:
            self.states[policy] = self._new_state(policy)
        return self.states[policy]

    def _new_state(self, policy: Policy) -> DecodeState:
        # on CPU a step views only the slots held, so the buffer's width costs nothing; kept wider than any
        # view, every view has the same strides (a view that is the whole buffer is contiguous, and a
        # compiled layer would recompile for it)
        width = self.table_width(policy) if self.device.type == "cuda" else self.max_slots
        return DecodeState(self.pool.num_layers, self.max_batch, width, self.device)

    def table_width(self, policy: Policy) -> int:
        """The width of `policy`'s page tables on CUDA: the most pages any of its sequences can hold in a
        layer after prefill (its budget where every layer evicts, max_slots otherwise). Every CUDA step
        is this wide (one captured graph per batch bucket), so RaaS-1024 reads a 64-slot table, not a
        full-context one."""
        longest = self.max_slots * self.pool.page_size
        widest = max(policy.capacity(longest, 0, layer) for layer in range(self.pool.num_layers))
        return min(self.max_slots, max(widest, MIN_SLOTS))

    # ---- prefill ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, chunks: list[PrefillChunk], all_logits: bool = False) -> torch.Tensor:
        """One forward over prompt chunks of one or more sequences: each chunk's tokens are stored in
        its sequence's pages (which hold the chunk already, engine/pages.py) under dense causal
        attention. Returns the logits of each chunk's last position [n, V] (or of every position [T, V])."""
        pool, page = self.pool, self.pool.page_size
        tokens, segments, last, offset = [], [], [], 0
        for seq, policy, start, end in chunks:
            assert start % page == 0, "prefill chunks start on a page boundary"
            tokens += seq.all_ids[start:end]
            pins = prompt_pins(policy, len(seq.prompt_ids), page, start, end).to(self.device)
            unpinned = torch.zeros_like(pins)
            pinned = [pins if policy.sparse(layer) else unpinned for layer in range(pool.num_layers)]
            tables = torch.tensor([pages[: pool.pages_for(end)] for pages in seq.pages], device=self.device)
            segments.append(PrefillSegment(tables, start, end, offset, pinned))
            offset += end - start
            last.append(offset - 1)
        inputs = (torch.tensor(tokens, device=self.device),
                  torch.cat([torch.arange(s.start, s.end, device=self.device) for s in segments]),
                  segments, None if all_logits else torch.tensor(last, device=self.device))
        if self.cluster is not None:
            self.cluster.send(("prefill", inputs))
        logits = self.collective(self.prefill_forward, *inputs)
        for seq, *_ in chunks:
            seq.track_peak(pool.layer_page_bytes)  # the whole prompt is resident until the cut
        return logits

    def prefill_forward(self, tokens: torch.Tensor, positions: torch.Tensor, segments: list[PrefillSegment],
                        logits_at: torch.Tensor | None) -> torch.Tensor:
        """The prefill forward proper (what every tensor-parallel rank runs)."""
        attend = PrefillAttention(self.pool, self.scale, segments, positions)
        return self.model(tokens, positions, attend, logits_at=logits_at)

    def collective(self, fn: Callable, *args):
        """fn(*args); under tensor parallelism a failed collective is reported as the worker that died."""
        try:
            return fn(*args)
        except RuntimeError:
            if self.cluster is not None:
                self.cluster.check_alive(grace=2.0)  # a collective fails when a peer's socket closes
            raise

    # ---- decode -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, groups: list[DecodeGroup]) -> torch.Tensor:
        """Feed each sequence's last token, every group's rows in one forward (projections and MLP over
        all rows, attention per group under its policy); return next-token logits [n, V], the groups'
        sequences in order."""
        policies = tuple(policy for policy, _ in groups)
        least_rows = 1 if len(groups) == 1 else self.mixed_rows(max(len(seqs) for _, seqs in groups))
        steps = tuple(self.prepare(seqs, policy, least_rows) for policy, seqs in groups)
        trace = self.observer is not None
        if self._graphs is not None and not trace:
            key = tuple(zip(policies, (step.batch for step in steps)))
            logits = self._graphs.run(key, lambda: self.decode_step(policies, False, steps)[0])
        elif self.cluster is not None:
            if trace:
                raise LemmaError("attention traces are not available under tensor parallelism")
            self.cluster.send(("decode", policies, steps))
            logits, _ = self.collective(self.decode_step, policies, False, steps)
        else:
            logits, traces = self.decode_step(policies, trace, steps)
            for (_, seqs), slice_traces in zip(groups, traces):
                n = len(seqs)
                for layer, born, valid, mass, evicted in slice_traces:
                    self.observer(layer, born[:n], valid[:n], mass[:n], evicted[:n])
        return self._real_rows(logits, [len(seqs) for _, seqs in groups], steps)

    def mixed_rows(self, most: int) -> int:
        """The fewest rows each slice of a mixed step gets when its largest slice has `most`: 2, so a
        compiled mix is one graph whatever its sizes; on CUDA that slice's bucket, so a mix of m
        policies has one captured graph per bucket, not one per combination of m buckets."""
        return max(most, 2) if self._graphs is not None else 2

    def _real_rows(self, padded: torch.Tensor, counts: list[int], steps: tuple[StepInputs, ...]) -> torch.Tensor:
        """The rows of `padded` (each step's bucket, one after another) that hold a sequence."""
        if len(steps) == 1:
            return padded[: counts[0]]
        offsets = np.cumsum([0] + [step.batch for step in steps])
        return torch.cat([padded[o : o + n] for o, n in zip(offsets, counts)])

    def positions(self, groups: list[DecodeGroup]) -> torch.Tensor:
        """The positions the last decode step fed its sequences, on the device: [n], in group order."""
        rows = [self.state_for(policy).inputs[1, : len(seqs)] for policy, seqs in groups]
        return rows[0] if len(rows) == 1 else torch.cat(rows)

    def replay_forward(self, policy: Policy, tokens: torch.Tensor, positions: torch.Tensor,
                       batch: ReplayBatch, recorders: list[Recorder] = ()) -> torch.Tensor:
        """The replay forward proper (what every tensor-parallel rank runs): logits at every row; each of
        `recorders` takes its sequence's rows of the attention inputs."""
        attend = ReplayAttention(self.pool, policy, self.scale, batch, positions)
        if recorders:
            attend = RecordingAttend(attend, recorders)
        return self.model(tokens, positions, attend, float_logits=False)  # forcing.score_rows upcasts them

    def prepare(self, seqs: list[Sequence], policy: Policy, least_rows: int = 1) -> StepInputs:
        """Host bookkeeping for one step: batch rows, the page opens the page owner decided (seq.opening),
        then this step's inputs in the persistent state."""
        state, layers = self.state_for(policy), self.pool.num_layers
        uids = [s.uid for s in seqs]
        if uids != state.rows:
            state.set_rows(uids, [s.pages for s in seqs])
        modes = np.zeros((layers, len(seqs)), dtype=np.int64)
        new_slots = np.zeros_like(modes)
        for row, seq in enumerate(seqs):
            if seq.opening is None:
                continue
            modes[:, row], new_slots[:, row] = seq.opening.modes, seq.opening.slots
            for layer, (mode, slot) in enumerate(zip(seq.opening.modes, seq.opening.slots)):
                if mode == NEW_SLOT:
                    state.set_page(layer, row, slot, seq.pages[layer][slot])
        held = max(max(len(p) for p in seq.pages) for seq in seqs)
        # the policy's narrowest table, but never wider than its sequences can ever hold (a huge budget
        # on short requests must not cost every step a budget-wide table)
        slots = max(held, min(policy.least_slots, max(max(seq.capacity) for seq in seqs)))
        return state.step_inputs([s.last_token for s in seqs], [s.num_tokens - 1 for s in seqs], modes, new_slots, slots,
                                 least_rows)

    def decode_step(self, policies: tuple[Policy, ...], trace: bool, steps: tuple[StepInputs, ...]):
        """The decode step proper: fixed-shape tensors in (one StepInputs per row slice, the slice's rows
        under its policy), logits [rows, V] (and, with trace, per slice the per-layer (layer, born, valid,
        mass, evicted)) out. No host sync, no data-dependent Python branch."""
        attention = DecodeAttention(self.pool, policies, self.ops, self.scale, steps, trace)
        tokens = steps[0].tokens if len(steps) == 1 else torch.cat([step.tokens for step in steps])
        positions = steps[0].positions if len(steps) == 1 else torch.cat([step.positions for step in steps])
        logits = self.model(tokens, positions, attention, run_layer=call_layer if trace else self.run_layer,
                            run_head=call_head if trace else self.run_head)
        return logits, attention.traces

    def warm_up(self, policies: tuple[Policy, ...], batches: list[int] | None = None,
                progress: Callable[[int], None] | None = None) -> None:
        """Run one step of every batch bucket (default: all up to max_batch) on padded rows, so a compiled
        step compiles (or loads from the disk cache) now rather than in the middle of a request. Several
        `policies` warm the step that mixes them (a slice per policy, in this order): on CPU at 2 rows a
        slice (its one compiled graph serves every size), on CUDA every bucket (all slices in one). Padded rows write only to the scratch page; no running sequence
        is touched. On CUDA each bucket's graph is captured here on the policies' own states (the buffers
        its replays read), so only while no sequence runs under them. progress(bucket) after each."""
        buckets = sorted({batch_bucket(b, self.max_batch) for b in (batches or bucket_sizes(self.max_batch))})
        if len(policies) > 1:  # a mix's slices share one bucket of at least 2 rows (mixed_rows)
            buckets = sorted({max(b, 2) for b in buckets}) if self._graphs is not None else [2]
        if self._graphs is not None:
            states = [self.state_for(policy) for policy in policies]
            if any(state.rows for state in states):  # their sequences' pages are in the tables: they capture
                return                                # on their first step
        else:  # a compiled graph binds shapes, not buffers: scratch states leave the real ones alone
            states = [self._new_state(policy) for policy in policies]
        layers = self.pool.num_layers
        with torch.inference_mode():
            for bucket in buckets:
                modes = np.zeros((layers, bucket), dtype=np.int64)
                steps = tuple(state.step_inputs([0] * bucket, [0] * bucket, modes, modes, policy.least_slots)
                              for policy, state in zip(policies, states))
                if self._graphs is not None:
                    key = tuple((policy, step.batch) for policy, step in zip(policies, steps))
                    self._graphs.run(key, lambda: self.decode_step(policies, False, steps)[0])
                else:
                    self.decode_step(policies, False, steps)
                if progress is not None:
                    progress(bucket)


def bucket_sizes(max_batch: int) -> list[int]:
    """Every batch bucket up to max_batch: 1, 2, 4, ..., max_batch."""
    return sorted({batch_bucket(n, max_batch) for n in range(1, max_batch + 1)})
