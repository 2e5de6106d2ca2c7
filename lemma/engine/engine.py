"""Engine: a model, its static KV pool and a step-driven loop.

Requests come in through `add_request` (from any thread) and advance one `step` at a time: the
scheduler admits what fits, every running sequence decodes one token, waiting prompts prefill in
chunks. `generate`, `stream`, `chat` and `teacher_force` are blocking layers on that loop;
`lemma.engine.async_engine.AsyncEngine` runs it in a background thread for asyncio callers.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from lemma.engine.blocking import BlockingCalls
from lemma.engine.pages import PageOwner
from lemma.engine.forcing import ChunkedReplay
from lemma.engine.options import check_limits, check_step_tables, pool_pages, resolve_compile, resolve_device, resolve_dtype
from lemma.engine.policies import Dense, Policy, check_policy
from lemma.engine.pool import PAGE_SIZE, KVPool
from lemma.engine.prompts import Prompt, prompt_ids
from lemma.engine.runner import MAX_POLICY_STATES, ModelRunner
from lemma.engine.sampler import Sampler, SamplingParams
from lemma.engine.scheduler import Scheduler, StepPlan
from lemma.engine.sequence import DECODE, Failed, RequestOutput, Sequence
from lemma.engine.tensor_parallel import Cluster, check_world, rank_device
from lemma.engine.tokens import next_tokens
from lemma.errors import LemmaError
from lemma.kernels import resolve_attention
from lemma.models.config import ModelConfig
from lemma.models.llama import CausalLM
from lemma.models.loader import load_model
from lemma.models.quantized import check_quantize
from lemma.models.shard import Shard
from lemma.models.tokenizer import StreamingDetokenizer, Tokenizer

log = logging.getLogger("lemma")


class Engine(BlockingCalls):
    """A decode engine over one model.

    Engine(model_dir, policy=Dense(), device=None, dtype=None, kv_cache_tokens=None, max_batch=32,
    prefill_chunk=512, attention=None, compile=None, tensor_parallel=1, warm_up=True, quantize=None).
    `engine.policy`
    (the policy of requests that name none) may be changed between calls. `prefill_chunk` is the token
    budget of one step: the decode batch plus chunks of waiting prompts (so a long prompt never stalls
    the running ones). `attention` is "triton" or "torch" (default: $LEMMA_ATTENTION, else triton on
    CUDA, torch elsewhere). `quantize="int8"|"int4"` runs the projections on weight-only quantized
    weights (groups of 32; the output head in int8; models/quantized.py).

    `compile=True` compiles the decode step's layers with inductor on CPU (per policy and kind of layer,
    one graph for batch 1 and one for larger batches, kept on disk under $LEMMA_HOME/compile) and
    captures the step as CUDA graphs (one per batch bucket) on CUDA; a backend name ("eager", "aot_eager",
    "inductor") picks the torch.compile backend. The default (None) captures CUDA graphs on a GPU and
    stays eager on CPU, where the 15-25 s cold warm-up is the program's to choose (the CLI does). The
    eager step stays the reference. A compiling engine warms up every batch bucket of its policy at
    start (`warm_up=False` leaves that to `warm_up()` or to the first step of each bucket); a request
    under another policy compiles on its first step unless that policy was warmed up too, and so does
    the first step that mixes policies (requests under different policies decode in one forward)
    unless `warm_up(policies=[...])` was given them all.

    `tensor_parallel=N` shards the model and the KV pool by heads over N processes (this one is rank 0;
    see engine/tensor_parallel.py); `close()` stops them.

    Threads: add_request, abort, abort_all and has_unfinished may be called from any thread; step runs
    one at a time (a second caller blocks until the first returns); generate, stream, chat and
    teacher_force may run in several threads at once on one engine (their requests share steps).
    """

    def __init__(self, model_dir: str | Path, policy: Policy | None = None, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, kv_cache_tokens: int | None = None,
                 max_batch: int = 32, prefill_chunk: int = 512, attention: str | None = None,
                 compile: bool | str | None = None, tensor_parallel: int = 1, warm_up: bool = True,
                 quantize: str | None = None, prefix_cache: bool = True):
        device = resolve_device(device)
        quantize = check_quantize(quantize)
        if quantize is not None and tensor_parallel > 1:
            raise LemmaError(f"quantize={quantize!r} does not combine with tensor_parallel={tensor_parallel} yet")
        compile = resolve_compile(compile, device, tensor_parallel)
        dtype = resolve_dtype(dtype, device)
        check_limits(max_batch, prefill_chunk, compile)
        if not isinstance(model_dir, (str, Path)):
            raise LemmaError(f"model_dir must be a path to a model folder, got {model_dir!r}")
        config = ModelConfig.from_dir(Path(model_dir))
        check_world(tensor_parallel, config, device, compile)
        shard, cluster = None, None
        if tensor_parallel > 1:  # workers first: they load their shards while this process loads rank 0's
            shard = Shard(0, tensor_parallel)
            page_bytes = KVPool.bytes_per_page(config.num_layers, shard.size(config.num_kv_heads), config.head_dim, dtype)
            kv_cache_tokens = pool_pages(kv_cache_tokens, page_bytes, device) * PAGE_SIZE
            cluster = Cluster.start(tensor_parallel, device, dict(
                model_dir=str(model_dir), dtype=dtype, num_pages=kv_cache_tokens // PAGE_SIZE, max_batch=max_batch,
                attention=resolve_attention(attention, device), threads=torch.get_num_threads()))
            device = rank_device(device, 0)
        try:
            model = load_model(Path(model_dir), device, dtype, shard, quantize)
            self._setup(model, Tokenizer(model_dir), Path(model_dir), policy, kv_cache_tokens, max_batch,
                        prefill_chunk, attention, compile, prefix_cache)
            if compile and warm_up:
                self.warm_up()
        except BaseException:
            if cluster is not None:
                cluster.stop()
            raise
        if cluster is not None:
            self.runner.cluster = cluster
            weakref.finalize(self, cluster.stop)

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (also done when the engine is garbage collected)."""
        if self.runner.cluster is not None:
            self.runner.cluster.stop()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def from_model(cls, model: CausalLM, tokenizer: Tokenizer, policy: Policy | None = None,
                   kv_cache_tokens: int | None = None, max_batch: int = 32, prefill_chunk: int = 512,
                   attention: str | None = None, compile: bool | str | None = None, warm_up: bool = True,
                   prefix_cache: bool = True) -> "Engine":
        """An engine over a model already built in memory (benchmarks on random weights); its device and
        dtype are the model's. On CPU in bf16 the model's linears are packed in place (models/linear.py)."""
        engine = cls.__new__(cls)
        compile = resolve_compile(compile, model.model.embed_tokens.weight.device, 1)
        engine._setup(model, tokenizer, Path(f"<{model.config.model_type} in memory>"), policy, kv_cache_tokens,
                      max_batch, prefill_chunk, attention, compile, prefix_cache)
        if compile and warm_up:
            engine.warm_up()
        return engine

    def _setup(self, model: CausalLM, tokenizer: Tokenizer, model_dir: Path, policy: Policy | None,
               kv_cache_tokens: int | None, max_batch: int, prefill_chunk: int, attention: str | None,
               compile: bool | str, prefix_cache: bool) -> None:
        check_limits(max_batch, prefill_chunk, compile)
        if not isinstance(prefix_cache, bool):
            raise LemmaError(f"prefix_cache must be True or False, got {prefix_cache!r}")
        self.policy = Dense() if policy is None else policy
        self.model, self.tokenizer, self.model_dir = model, tokenizer, model_dir
        self.device, self.dtype = model.model.embed_tokens.weight.device, model.model.embed_tokens.weight.dtype
        self.config = model.config
        if not (compile and self.device.type == "cpu"):  # compiled CPU decode streams the plain weights itself
            model.pack_weights()
        self.eos_ids = sorted(set(tokenizer.eos_ids) | set(self.config.eos_token_id))
        c = self.config
        kv_heads = c.num_kv_heads if model.shard is None else model.shard.size(c.num_kv_heads)  # this rank's
        page_bytes = KVPool.bytes_per_page(c.num_layers, kv_heads, c.head_dim, self.dtype)
        num_pages = pool_pages(kv_cache_tokens, page_bytes, self.device)
        self.pool = KVPool(c.num_layers, kv_heads, c.head_dim, num_pages, self.dtype, self.device)
        self.attention = resolve_attention(attention, self.device)
        self.compile = compile
        # a sequence never holds more pages in a layer than the pool has or the model's context spans
        max_slots = min(num_pages, self.pool.pages_for(c.max_position_embeddings))
        # every running request holds a page in each layer, so no more than num_pages can ever run at once
        self.max_batch = max_batch = min(max_batch, num_pages)
        check_step_tables(c.num_layers, max_batch, max_slots, self.device, MAX_POLICY_STATES)
        self.runner = ModelRunner(self.model, self.pool, self.attention, max_batch, compile, max_slots)
        self.forcing = ChunkedReplay(self.runner)
        self.pages = PageOwner(c.num_layers, num_pages, self.pool.page_size, prefix_cache)
        # a step's prompt tokens: no more than one full context (the forward's activations grow with it)
        self.scheduler = Scheduler(self.pages, max_batch, min(prefill_chunk, c.max_position_embeddings))
        self.sampler = Sampler(self.device)
        self._step_lock = threading.Lock()  # one step at a time (not re-entrant: nothing may step mid-step)
        self._stepper: int | None = None  # the thread inside a step, if any
        self._inbox_lock = threading.Lock()  # guards the inbox, the listeners and the live ids
        self._inbox: list[tuple[str, Any]] = []  # ("add", Sequence) or ("abort", request id), in order
        self._listeners: dict[str, Callable[[RequestOutput], None]] = {}
        self._live: set[str] = set()

    def warm_up(self, batches: list[int] | None = None, policies: list[Policy] | None = None,
                progress: Callable[[Policy, int], None] | None = None) -> float:
        """Compile (or load from the disk cache, engine/compiled.py) and, on CUDA, capture the decode step
        of every batch bucket up to max_batch (or those holding `batches`) for each of `policies` (default:
        the engine's), so no request pays for it later; with several policies, also the step of every mix
        of two or more of them (requests under different policies decode in one step: 2^k - k - 1 mixes
        for k policies, one compiled graph each on CPU, one CUDA graph per batch bucket each on CUDA).
        progress(policy, bucket) after each single-policy bucket.
        Returns the seconds it took; nothing to do (0.0) when the engine does not compile."""
        if not self.compile:
            return 0.0
        policies = [self.policy] if policies is None else list(policies)
        for policy in policies:
            check_policy(policy, "each of warm_up's policies")
        for batch in batches or []:
            if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= self.max_batch:
                raise LemmaError(f"warm_up batches must be integers in 1..max_batch={self.max_batch}, got {batch!r}")
        distinct = sorted(set(policies), key=repr)  # the order a step puts its slices in (engine._run_plan)
        mixes = [mix for size in range(2, min(len(distinct), self.max_batch) + 1)  # a mix of k needs k rows
                 for mix in itertools.combinations(distinct, size)]
        start = time.perf_counter()
        with self._stepping("warm_up"):
            for policy in policies:
                report = None if progress is None else (lambda bucket, p=policy: progress(p, bucket))
                self._compiling(self.runner.warm_up, (policy,), batches, report)
            for mix in mixes:
                self._compiling(self.runner.warm_up, mix, batches)
        return time.perf_counter() - start

    @staticmethod
    def _compiling(warm_up: Callable[..., None], *args: Any) -> None:
        try:
            warm_up(*args)
        except LemmaError:
            raise
        except Exception as exc:  # inductor or the C++ compiler: say what to do, not a traceback
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            raise LemmaError(f"compiling the decode step failed ({type(exc).__name__}: {first}); "
                             "run eager with compile=False (CLI: --no-compile or LEMMA_COMPILE=0)") from exc

    @property
    def policy(self) -> Policy:
        """The KV policy of requests that name none; may be changed between calls."""
        return self._policy

    @policy.setter
    def policy(self, policy: Policy) -> None:
        check_policy(policy)
        self._policy = policy

    def prefix_cache_stats(self) -> dict[str, Any]:
        """What the prefix cache did so far: lookups and hits (requests that found pages), prompt tokens
        asked for and read from it, the pages it names now (one per layer each) and those it dropped."""
        cache = self.pages.cache
        if cache is None:
            return {"enabled": False}
        s = cache.stats
        return {"enabled": True, "lookups": s.lookups, "hits": s.hits, "queried_tokens": s.queried_tokens,
                "cached_tokens": s.cached_tokens, "hit_rate": s.cached_tokens / max(s.queried_tokens, 1),
                "cached_pages": len(cache), "evicted_pages": s.evicted_pages}

    # ---- requests ---------------------------------------------------------------------------------
    def _new_sequence(self, request_id: str | None, prompt: Prompt, params: SamplingParams, policy: Policy) -> Sequence:
        if not isinstance(params, SamplingParams):
            raise LemmaError(f"params must be a lemma SamplingParams, got {type(params).__name__}")
        check_policy(policy)
        ids = prompt_ids(self.tokenizer, prompt, self.config.vocab_size)
        policy.check_prompt(len(ids), params.max_tokens)
        seq = Sequence("", ids, params, StreamingDetokenizer(self.tokenizer), self.eos_ids, policy)
        seq.request_id = f"req-{seq.uid}" if request_id is None else str(request_id)
        seq.seed = self.sampler.seed_for(params.seed)
        layers = range(self.config.num_layers)
        seq.capacity = [policy.capacity(len(ids), params.max_tokens, layer) for layer in layers]
        seq.reserved, seq.pages = [0 for _ in layers], [[] for _ in layers]
        seq.stats.policy = policy.describe()
        most = max(max(self.pool.pages_for(len(ids) + 1), cap) for cap in seq.capacity)
        context = self.config.max_position_embeddings
        if len(ids) + params.max_tokens > context:
            raise LemmaError(f"prompt of {len(ids)} tokens + max_tokens {params.max_tokens} exceeds the model's context "
                             f"of {context} tokens (max_position_embeddings); shorten the prompt or lower max_tokens")
        if most > self.pool.num_pages:
            raise LemmaError(
                f"request needs {most * PAGE_SIZE} tokens of KV cache (prompt {len(ids)} + max_tokens {params.max_tokens} "
                f"under {policy.describe()}) but the whole pool holds {self.pool.capacity_tokens}; "
                f"lower max_tokens, use an evicting policy, or raise kv_cache_tokens"
            )
        return seq

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None, policy: Policy | None = None,
                    request_id: str | None = None,
                    on_output: Callable[[RequestOutput], None] | None = None) -> str:
        """Queue a request (text or token ids) and return its id. Safe from any thread. A request that
        is malformed or could never fit the pool raises LemmaError here and never reaches the loop.
        `policy` overrides the engine's KV policy for this request. `on_output` is called (from the
        thread that steps) with each of the request's outputs."""
        seq = self._new_sequence(request_id, prompt, params or SamplingParams(), policy or self.policy)
        self._submit(seq, on_output)
        return seq.request_id

    def _submit(self, seq: Sequence, on_output: Callable[[RequestOutput], None] | None) -> None:
        with self._inbox_lock:
            if seq.request_id in self._live:
                raise LemmaError(f"request id {seq.request_id!r} is already in use")
            self._live.add(seq.request_id)
            if on_output is not None:
                self._listeners[seq.request_id] = on_output
            self._inbox.append(("add", seq))

    def abort(self, request_id: str) -> None:
        """Stop a request (waiting or running) at the next step; its pages go back to the pool and its
        last output has finish_reason "abort". Unknown or finished ids are ignored. Safe from any thread."""
        with self._inbox_lock:
            self._inbox.append(("abort", str(request_id)))  # ids are kept as text (add_request)

    def abort_all(self) -> None:
        """Abort every request submitted and not finished yet."""
        with self._inbox_lock:
            live = list(self._live)
        for request_id in live:
            self.abort(request_id)

    def has_unfinished(self) -> bool:
        with self._inbox_lock:
            return bool(self._inbox) or self.scheduler.has_unfinished

    def step(self) -> list[RequestOutput]:
        """Run one engine step: take in new requests and aborts, admit what fits, decode every running
        sequence once and prefill the next prompt chunks. Returns what each request got this step (also
        handed to its `on_output`). One thread steps at a time; others block here, they do not spin."""
        with self._stepping("step"):
            return self._step()

    @contextmanager
    def _stepping(self, call: str) -> Iterator[None]:
        """Hold the step lock; a call from inside a step of this engine (an on_output callback) is refused
        with a clear error instead of waiting forever for the lock its own thread holds."""
        if self._stepper == threading.get_ident():
            raise LemmaError(f"Engine.{call} was called from inside a step of the same engine (an on_output callback); "
                             "it would wait for itself: hand the work to another thread or call it after the step")
        with self._step_lock:
            self._stepper = threading.get_ident()
            try:
                yield
            finally:
                self._stepper = None

    @contextmanager
    def _stepping_if_free(self) -> Iterator[bool]:
        """Hold the step lock if nobody does (yields True), else yield False at once; never waits."""
        if not self._step_lock.acquire(blocking=False):
            yield False
            return
        self._stepper = threading.get_ident()  # callbacks delivered under it are refused re-entry too
        try:
            yield True
        finally:
            self._stepper = None
            self._step_lock.release()

    def _step(self) -> list[RequestOutput]:
        outputs = self._take_inbox()
        try:
            outputs += self._run_plan(self.scheduler.schedule())
        except BaseException as exc:  # the batch's device state is unknown: fail what ran, keep the pool whole
            outputs += [self._finish(seq, "error", f"the engine step failed: {exc!r}") for seq in list(self.scheduler.running)]
            self._deliver(outputs)
            raise
        self._deliver(outputs)
        return outputs

    def _take_inbox(self) -> list[RequestOutput]:
        with self._inbox_lock:
            inbox, self._inbox = self._inbox, []
        outputs = []
        for kind, item in inbox:
            if kind == "add":
                self.scheduler.add(item)
            elif (seq := self.scheduler.find(item)) is not None:
                outputs.append(self._finish(seq, "abort"))
        return outputs

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        with self._inbox_lock:  # once per step, not per output; listeners run outside the lock
            listeners = [self._listeners.get(out.request_id) for out in outputs]
            for out in outputs:
                if out.finished:
                    self._listeners.pop(out.request_id, None)
                    self._live.discard(out.request_id)
        for out, listener in zip(outputs, listeners):
            if listener is None:
                continue
            try:
                listener(out)
            except Exception:  # a reader that is gone must not break the step for everyone else
                log.exception("on_output of request %s failed; aborting it", out.request_id)
                if not out.finished:
                    self.abort(out.request_id)
                    with self._inbox_lock:
                        self._listeners.pop(out.request_id, None)

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> RequestOutput:
        seq.finish_reason, seq.error = reason, error  # before its pages go: a failed one's are not cached
        self.scheduler.remove(seq)
        seq.stats.jct_seconds = time.perf_counter() - seq.started
        return RequestOutput(seq.request_id, "", [], reason, seq.stats, error)

    def _run_plan(self, plan: StepPlan) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        if plan.decode:  # every decoding sequence in one forward, a row slice per policy
            start = time.perf_counter()
            groups = sorted(plan.decode.items(), key=lambda group: repr(group[0]))  # one order per mix of policies
            seqs = [seq for _, group in groups for seq in group]
            logits = self.runner.decode(groups)
            tokens = next_tokens(self.sampler, logits, seqs, self.runner.positions(groups))
            elapsed = time.perf_counter() - start
            for seq, token in zip(seqs, tokens):
                seq.stats.decode_seconds += elapsed
                outputs.append(self._advance(seq, token))
        for seq, tokens, elapsed in self.forcing.step(plan.replay):  # teacher forcing, a page per sequence
            seq.stats.decode_seconds += elapsed
            outputs.append(self._advance_all(seq, tokens))
        if plan.prefill:
            start = time.perf_counter()
            logits = self.runner.prefill(plan.prefill)
            for seq, _, _, end in plan.prefill:
                self.pages.publish(seq, end)
            done = [i for i, (seq, _, _, end) in enumerate(plan.prefill) if end == seq.num_tokens]
            seqs = [plan.prefill[i][0] for i in done]
            for seq in seqs:
                self.pages.cut_to_capacity(seq)
                seq.status = DECODE
            tokens = []
            if seqs:  # the token after the last prompt position, sampled as a decode step would
                counters = torch.tensor([seq.num_tokens - 1 for seq in seqs], device=self.device)
                tokens = next_tokens(self.sampler, logits[done], seqs, counters)
            elapsed = time.perf_counter() - start
            for seq, _, _, end in plan.prefill:
                seq.prefilled = end
                seq.stats.prefill_seconds += elapsed
            outputs += [self._advance(seq, token) for seq, token in zip(seqs, tokens)]
        for seq in [s for s in self.scheduler.running if s.finish_reason]:
            self.scheduler.remove(seq)
        self.runner.forget_policies(keep={s.policy for s in self.scheduler.running})
        return outputs

    def _advance_all(self, seq: Sequence, tokens: list[int | Failed]) -> RequestOutput:
        """Several tokens of one request in one step, as one output."""
        text, ids = "", []
        for token in tokens:
            out = self._advance(seq, token)
            text, ids = text + out.text, ids + out.token_ids
            if out.finished:
                break
        return RequestOutput(seq.request_id, text, ids, out.finish_reason, out.stats, out.error)

    def _advance(self, seq: Sequence, token: int | Failed) -> RequestOutput:
        """Give `seq` its token (or fail it alone: what goes wrong here is this request's own)."""
        if isinstance(token, Failed):
            return self._finish(seq, "error", token.reason)
        try:
            piece = seq.append(token)
        except Exception as exc:  # noqa: BLE001 - e.g. its detokenizer; the other requests go on
            log.exception("request %s failed taking token %d", seq.request_id, token)
            return self._finish(seq, "error", f"the request failed at token {token}: {type(exc).__name__}: {exc}")
        seq.track_peak(self.pool.layer_page_bytes)
        now = time.perf_counter()
        if len(seq.output_ids) == 1:
            seq.stats.ttft_seconds = now - seq.started
        if seq.finish_reason:
            seq.stats.jct_seconds = now - seq.started
        return RequestOutput(seq.request_id, piece, [token], seq.finish_reason,
                             seq.stats if seq.finish_reason else None)
