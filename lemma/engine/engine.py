"""Engine: load a model directory, admit requests into the static KV pool, prefill, decode, stream."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lemma.engine.policies import Dense, Policy
from lemma.engine.pool import PAGE_SIZE, KVPool
from lemma.engine.runner import ModelRunner
from lemma.engine.sampler import Sampler, SamplingParams
from lemma.engine.sequence import Chunk, Forced, Output, Sequence
from lemma.errors import LemmaError
from lemma.kernels import resolve_attention
from lemma.models.llama import CausalLM
from lemma.models.loader import load_model
from lemma.models.tokenizer import StreamingDetokenizer, Tokenizer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
CPU_KV_BYTES = 1 << 30  # default pool on CPU: 1 GiB
CUDA_KV_FRACTION = 0.85  # default pool on CUDA: this share of the memory free after loading weights

Prompt = str | list[int]


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise LemmaError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


class Engine:
    """A decode engine over one model.

    Engine(model_dir, policy=Dense(), device=None, dtype=None, kv_cache_tokens=None, max_batch=32,
    prefill_chunk=512, attention=None, compile=False). `engine.policy` may be changed between calls.
    `attention` is "triton" or "torch" (default: $LEMMA_ATTENTION, else triton on CUDA, torch elsewhere).
    `compile=True` compiles the decode step with inductor on CPU and captures it as CUDA graphs (one per
    batch and slot bucket) on CUDA; a backend name ("eager", "aot_eager", "inductor") picks the
    torch.compile backend. The eager step stays the reference.
    """

    def __init__(self, model_dir: str | Path, policy: Policy | None = None, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, kv_cache_tokens: int | None = None,
                 max_batch: int = 32, prefill_chunk: int = 512, attention: str | None = None,
                 compile: bool | str = False):
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = _resolve_dtype(dtype, device)
        model = load_model(Path(model_dir), device, dtype)
        self._setup(model, Tokenizer(model_dir), Path(model_dir), policy, kv_cache_tokens, max_batch, prefill_chunk,
                    attention, compile)

    @classmethod
    def from_model(cls, model: CausalLM, tokenizer: Tokenizer, policy: Policy | None = None,
                   kv_cache_tokens: int | None = None, max_batch: int = 32, prefill_chunk: int = 512,
                   attention: str | None = None, compile: bool | str = False) -> "Engine":
        """An engine over a model already built in memory (benchmarks on random weights); its device and
        dtype are the model's."""
        engine = cls.__new__(cls)
        engine._setup(model, tokenizer, Path(f"<{model.config.model_type} in memory>"), policy, kv_cache_tokens,
                      max_batch, prefill_chunk, attention, compile)
        return engine

    def _setup(self, model: CausalLM, tokenizer: Tokenizer, model_dir: Path, policy: Policy | None,
               kv_cache_tokens: int | None, max_batch: int, prefill_chunk: int, attention: str | None,
               compile: bool | str) -> None:
        if policy is not None and not isinstance(policy, Policy):
            raise LemmaError(f"policy must be a lemma policy (Dense, RaaS, StreamingLLM, H2O, Quest), got {policy!r}")
        if max_batch < 1:
            raise LemmaError(f"max_batch must be >= 1, got {max_batch}")
        self.policy = policy or Dense()
        self.model, self.tokenizer, self.model_dir = model, tokenizer, model_dir
        self.device, self.dtype = model.model.embed_tokens.weight.device, model.model.embed_tokens.weight.dtype
        self.config = model.config
        self.eos_ids = sorted(set(tokenizer.eos_ids) | set(self.config.eos_token_id))
        self.max_batch = max_batch
        c = self.config
        page_bytes = KVPool.bytes_per_page(c.num_layers, c.num_kv_heads, c.head_dim, self.dtype)
        num_pages = self._pool_pages(kv_cache_tokens, page_bytes)
        self.pool = KVPool(c.num_layers, c.num_kv_heads, c.head_dim, num_pages, self.dtype, self.device)
        self.attention = resolve_attention(attention, self.device)
        self.compile = compile
        self.runner = ModelRunner(self.model, self.pool, prefill_chunk, self.attention, max_batch, compile)
        self.sampler = Sampler(self.device)

    def _pool_pages(self, kv_cache_tokens: int | None, page_bytes: int) -> int:
        if kv_cache_tokens is not None:
            if kv_cache_tokens < 1:
                raise LemmaError(f"kv_cache_tokens must be positive, got {kv_cache_tokens}")
            return -(-kv_cache_tokens // PAGE_SIZE)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * CUDA_KV_FRACTION)
        else:
            budget = CPU_KV_BYTES
        return max(1, budget // page_bytes)

    # ---- requests ---------------------------------------------------------------------------------
    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise LemmaError("prompt is empty")
            ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        else:
            ids = list(prompt)
        if not ids:
            raise LemmaError("prompt is empty (no tokens)")
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.config.vocab_size]
        if bad:
            raise LemmaError(f"prompt token id {bad[0]!r} is outside the vocabulary [0, {self.config.vocab_size})")
        return ids

    def _new_sequence(self, index: int, prompt: Prompt, params: SamplingParams, policy: Policy) -> Sequence:
        ids = self._prompt_ids(prompt)
        policy.check_prompt(len(ids), params.max_tokens)
        seq = Sequence(index, ids, params, StreamingDetokenizer(self.tokenizer), self.eos_ids)
        layers = range(self.config.num_layers)
        seq.capacity = [policy.capacity(len(ids), params.max_tokens, layer) for layer in layers]
        prompt_pages = self.pool.pages_for(len(ids))
        seq.reserved = [max(prompt_pages, cap) for cap in seq.capacity]  # prefill holds the whole prompt
        seq.pages = [[] for _ in layers]
        seq.stats.policy = policy.describe()
        if max(seq.reserved) > self.pool.num_pages:
            need = max(seq.reserved) * PAGE_SIZE
            raise LemmaError(
                f"request needs {need} tokens of KV cache (prompt {len(ids)} + max_tokens {params.max_tokens} "
                f"under {policy.describe()}) but the whole pool holds {self.pool.capacity_tokens}; "
                f"lower max_tokens, use an evicting policy, or raise kv_cache_tokens"
            )
        return seq

    def _run(self, prompts: list[Prompt], params: list[SamplingParams],
             forced: list[list[int]] | None = None) -> Iterator[tuple[Sequence, str, list[int]]]:
        """The loop. Yields (sequence, released text, new token ids) after every token of every sequence;
        a sequence is finished when its finish_reason is set. Requests that fail validation finish at
        once with finish_reason "error"; the others run on. With `forced`, request i emits forced[i]
        instead of sampling (teacher forcing) and records what the model predicted at each step."""
        policy = self.policy
        waiting: deque[Sequence] = deque()
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            try:
                waiting.append(self._new_sequence(i, prompt, p, policy))
            except LemmaError as exc:
                failed = Sequence(i, [], p, StreamingDetokenizer(self.tokenizer), [])
                failed.finish_reason, failed.error = "error", str(exc)
                yield failed, "", []
        running: list[Sequence] = []
        try:
            while waiting or running:
                while waiting and len(running) < self.max_batch:
                    seq = waiting[0]
                    if not self.pool.can_reserve(seq.reserved):
                        break
                    waiting.popleft()
                    self.pool.reserve(seq.reserved)
                    running.append(seq)  # from here on its pages are returned in `finally`
                    seq.seed = self.sampler.seed_for(seq.params.seed)
                    start = time.perf_counter()
                    logits = self.runner.prefill(seq, policy)
                    counters = torch.tensor([seq.num_tokens - 1], device=self.device)
                    token = self._next_tokens(logits[None], [seq], counters, forced)[0]
                    seq.stats.prefill_seconds = time.perf_counter() - start
                    yield self._advance(seq, token)
                    if seq.finish_reason:
                        running.remove(seq)
                        self._release(seq)
                if not running:
                    continue
                start = time.perf_counter()
                logits = self.runner.decode(running, policy)
                tokens = self._next_tokens(logits, running, self.runner.positions(len(running)), forced)
                elapsed = time.perf_counter() - start
                for seq, token in zip(running, tokens):
                    seq.stats.decode_seconds += elapsed
                    yield self._advance(seq, token)
                for seq in [s for s in running if s.finish_reason]:
                    running.remove(seq)
                    self._release(seq)
        finally:  # an exception or an abandoned stream must still return every page
            for seq in running:
                self._release(seq)

    def _next_tokens(self, logits: torch.Tensor, seqs: list[Sequence], counters: torch.Tensor,
                     forced: list[list[int]] | None) -> list[int]:
        if forced is None:
            return self._sample(logits, seqs, counters)
        tokens = [forced[s.index][len(s.output_ids)] for s in seqs]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        chosen = logprobs.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0]
        for seq, lp, top in zip(seqs, chosen.tolist(), logits.argmax(-1).tolist()):
            seq.forced_logprobs.append(lp)
            seq.predicted.append(top)
        return tokens

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], counters: torch.Tensor) -> list[int]:
        params = [s.params for s in seqs]
        history = torch.empty(0)
        if any(p.repetition_penalty != 1.0 for p in params):
            width = max(s.num_tokens for s in seqs)
            rows = [s.prompt_ids + s.output_ids + [-1] * (width - s.num_tokens) for s in seqs]
            history = torch.tensor(rows, dtype=torch.int64, device=logits.device)
        return self.sampler(logits, params, [s.seed for s in seqs], counters, history).tolist()

    def _advance(self, seq: Sequence, token: int) -> tuple[Sequence, str, list[int]]:
        piece = seq.append(token)
        seq.track_peak(self.pool.layer_page_bytes)
        if seq.finish_reason:
            seq.stats.jct_seconds = time.perf_counter() - seq.started
        return seq, piece, [token]

    def _release(self, seq: Sequence) -> None:
        for layer, (pages, unused) in enumerate(zip(seq.pages, seq.reserved)):
            self.pool.release(layer, pages, unused)
        seq.pages, seq.reserved = [[] for _ in seq.pages], [0] * len(seq.reserved)

    # ---- public API --------------------------------------------------------------------------------
    def generate(self, prompts: Prompt | list[Prompt], params: SamplingParams | list[SamplingParams] | None = None) -> list[Output]:
        """Run a batch of prompts (text or token ids) to completion; one Output per prompt, in order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise LemmaError(f"got {len(prompts)} prompts but {len(plist)} SamplingParams")
        done: dict[int, Sequence] = {}
        for seq, _, _ in self._run(prompts, plist):
            if seq.finish_reason:
                done[seq.index] = seq
        return [self._output(done[i]) for i in range(len(prompts))]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[Chunk]:
        """Yield the reply piece by piece; the last Chunk carries finish_reason and stats."""
        held: list[int] = []  # token ids whose text is not released yet (partial UTF-8, maybe a stop string)
        for seq, piece, ids in self._run([prompt], [params or SamplingParams()]):
            if seq.finish_reason == "error":
                raise LemmaError(seq.error)
            held += ids
            if piece or seq.finish_reason:
                yield Chunk(piece, held, seq.finish_reason, seq.stats if seq.finish_reason else None)
                held = []

    def logits(self, prompt: Prompt) -> torch.Tensor:
        """Next-token logits [T, V] (fp32) at every position of a prompt, through the paged pool."""
        seq = self._new_sequence(0, prompt, SamplingParams(max_tokens=1), Dense())
        self.pool.reserve(seq.reserved)
        try:
            return self.runner.prefill(seq, Dense(), all_logits=True)
        finally:
            self._release(seq)

    def teacher_force(self, prompts: list[Prompt], targets: list[list[int]]) -> list[Forced]:
        """Replay each target continuation token by token under the current policy (eviction active),
        as generation would see it; per token: log-probability of the target and the model's argmax."""
        if len(prompts) != len(targets) or any(not t for t in targets):
            raise LemmaError("teacher_force needs one non-empty target list per prompt")
        params = [SamplingParams(max_tokens=len(t), ignore_eos=True) for t in targets]
        done: dict[int, Sequence] = {}
        for seq, _, _ in self._run(list(prompts), params, forced=[list(t) for t in targets]):
            if seq.finish_reason:
                done[seq.index] = seq
        return [Forced(done[i].forced_logprobs, done[i].predicted, done[i].stats, done[i].error) for i in range(len(prompts))]

    def chat_prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def chat(self, messages: list[dict[str, Any]], params: SamplingParams | None = None) -> Output:
        """One assistant reply to a conversation, rendered with the model's chat template."""
        out = self.generate([self.chat_prompt(messages)], params)[0]
        if out.finish_reason == "error":
            raise LemmaError(out.error)
        return out

    @staticmethod
    def _output(seq: Sequence) -> Output:
        return Output(seq.text, list(seq.output_ids), seq.finish_reason, seq.stats, list(seq.prompt_ids), seq.error)
