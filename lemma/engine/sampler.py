"""Sampling parameters and a batched sampler: penalties, temperature, top-k, top-p, min-p, per-request seeds.

Everything is tensor ops over the batch (no host synchronisation); rows with temperature 0 are greedy.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from lemma.errors import LemmaError


def check_number(name: str, value: object, rule: str, low: float | None = None, high: float | None = None,
                 low_open: bool = False, integer: bool = False) -> None:
    """Raise `<name> must be <rule>, got <value>` unless value is a finite number (an int when integer)
    in range; bools are not numbers."""
    ok = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
    ok = ok and value == value and abs(value) != float("inf")  # not NaN, not infinite
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        raise LemmaError(f"{name} must be {rule}, got {value!r}")


INT64_MAX = 2**63 - 1  # top_k and the seeds travel as int64 tensors
GREEDY_BELOW = 1e-5  # a temperature below this samples greedily (as vLLM): 1 / T would overflow float32 logits
MAX_TEMPERATURE = 100.0  # far above it every distribution is uniform; float32 keeps its precision up to it
REPETITION_PENALTY = (0.01, 100.0)  # logits are divided or multiplied by it in float32


@dataclass
class SamplingParams:
    """How one request samples. Every field is checked here against the limits of the batched sampler
    (float32 and int64 tensors), so a bad value is a LemmaError naming it, never a failing step."""

    max_tokens: int = 256
    temperature: float = 1.0  # 0 (or below GREEDY_BELOW) = greedy
    top_k: int = 0  # 0 = off; more than the vocabulary keeps every token
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # on every token seen (prompt and reply), as transformers
    presence_penalty: float = 0.0  # subtracted once from tokens the reply already holds (OpenAI)
    frequency_penalty: float = 0.0  # subtracted per occurrence in the reply (OpenAI)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        check_number("max_tokens", self.max_tokens, "a positive integer", low=1, high=INT64_MAX, integer=True)
        check_number("temperature", self.temperature, f"in [0, {MAX_TEMPERATURE:g}]", low=0, high=MAX_TEMPERATURE)
        check_number("top_k", self.top_k, "an integer >= 0 (0 = off) that fits in 64 bits", low=0, high=INT64_MAX,
                     integer=True)
        check_number("top_p", self.top_p, "in (0, 1]", low=0, high=1, low_open=True)
        check_number("min_p", self.min_p, "in [0, 1]", low=0, high=1)
        low, high = REPETITION_PENALTY
        check_number("repetition_penalty", self.repetition_penalty, f"in [{low:g}, {high:g}]", low=low, high=high)
        check_number("presence_penalty", self.presence_penalty, "in [-2, 2]", low=-2, high=2)
        check_number("frequency_penalty", self.frequency_penalty, "in [-2, 2]", low=-2, high=2)
        if self.seed is not None:
            check_number("seed", self.seed, "an integer that fits in 64 bits", low=-(2**63), high=2**64 - 1, integer=True)
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise LemmaError(f"stop strings must be non-empty strings, got {self.stop!r}")
        self.stop = list(self.stop)
        if not isinstance(self.ignore_eos, bool):
            raise LemmaError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """history [B, T] token ids (-1 = padding); penalty [B]. As transformers: positive logits are
    divided by the penalty, negative ones multiplied."""
    vocab = logits.shape[-1]
    seen = torch.zeros(logits.shape[0], vocab + 1, dtype=torch.bool, device=logits.device)
    seen.scatter_(1, torch.where(history >= 0, history, vocab), True)  # padding lands in the extra column
    seen = seen[:, :vocab]
    pen = penalty[:, None].expand_as(logits)
    penalised = torch.where(logits > 0, logits / pen, logits * pen)
    return torch.where(seen, penalised, logits)


def apply_reply_penalties(logits: torch.Tensor, reply: torch.Tensor, frequency: torch.Tensor,
                          presence: torch.Tensor) -> torch.Tensor:
    """OpenAI's penalties: reply [B, T] the reply's token ids so far (-1 = padding); frequency and
    presence [B]. logit -= frequency * count + presence * (count > 0)."""
    vocab = logits.shape[-1]
    counts = torch.zeros(logits.shape[0], vocab + 1, dtype=logits.dtype, device=logits.device)
    counts.scatter_add_(1, torch.where(reply >= 0, reply, vocab), torch.ones_like(reply, dtype=logits.dtype))
    counts = counts[:, :vocab]
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0).to(logits.dtype)


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) what top-k, top-p and min-p drop, per row. logits [B, V] already temperature-scaled;
    top_k [B] (0 = off), top_p [B], min_p [B]."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, logits.shape[-1])[:, None]
    drop = rank >= k
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    before = probs.cumsum(-1) - probs  # probability mass strictly above each token
    drop |= before >= top_p[:, None]  # keep the token that crosses top_p
    drop |= probs < min_p[:, None] * probs[:, :1]
    drop[:, 0] = False  # the most likely token always survives
    mask = torch.zeros_like(drop).scatter_(1, order, drop)
    return logits.masked_fill(mask, float("-inf"))


MASK32 = 0xFFFFFFFF


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer mixer (two multiply-xorshift rounds) on int64 tensors holding 32-bit
    values; products stay below 2**59, so nothing overflows."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & MASK32
    return (x >> 16) ^ x


def exponential_noise(seeds: torch.Tensor, counters: torch.Tensor, vocab: int) -> torch.Tensor:
    """Exp(1) noise [B, V] that depends only on (seed, counter, token id): a counter-based generator,
    so a seeded request draws the same noise whatever batch it runs in, with no per-row generator
    and no host synchronisation. seeds [B] 32-bit, counters [B] (the position being sampled)."""
    row = mix32(mix32(seeds & MASK32) ^ (counters & MASK32))
    token = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    bits = mix32((row[:, None] ^ (token[None, :] * 0x9E3779B1 & MASK32)) & MASK32)
    uniform = ((bits >> 9).float() + 0.5) / 2.0**23  # 23 bits + 0.5 is exact in fp32: strictly inside (0, 1)
    return -torch.log(uniform)


class BatchParams:
    """The sampling parameters of a batch as device tensors, built once per batch composition."""

    def __init__(self, params: list[SamplingParams], seeds: list[int], device: torch.device):
        as_tensor = lambda values, dtype: torch.tensor(values, dtype=dtype, device=device)  # noqa: E731
        self.all_greedy = all(p.greedy for p in params)
        self.penalised = any(p.repetition_penalty != 1.0 for p in params)
        self.penalty = as_tensor([p.repetition_penalty for p in params], torch.float32)
        self.reply_penalised = any(p.presence_penalty or p.frequency_penalty for p in params)
        self.frequency = as_tensor([p.frequency_penalty for p in params], torch.float32)
        self.presence = as_tensor([p.presence_penalty for p in params], torch.float32)
        self.temperature = as_tensor([1.0 if p.greedy else p.temperature for p in params], torch.float32)
        self.top_k = as_tensor([p.top_k for p in params], torch.int64)
        self.top_p = as_tensor([p.top_p for p in params], torch.float32)
        self.min_p = as_tensor([p.min_p for p in params], torch.float32)
        self.greedy = as_tensor([p.greedy for p in params], torch.bool)
        self.seeds = as_tensor([s & MASK32 for s in seeds], torch.int64)


class Sampler:
    """Batched sampling. Noise comes from (seed, position) through a counter-based generator, so a
    seeded request samples the same tokens whatever its batch; an unseeded request gets a random seed
    at admission (`seed_for`)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._entropy = random.SystemRandom()
        self._cached: dict[tuple, BatchParams] = {}  # a few batch compositions (decode groups, prefill)

    def seed_for(self, seed: int | None) -> int:
        return self._entropy.getrandbits(32) if seed is None else seed

    def batch_params(self, params: list[SamplingParams], seeds: list[int]) -> BatchParams:
        key = tuple((p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty, p.presence_penalty,
                     p.frequency_penalty) for p in params) + tuple(seeds)
        if key not in self._cached:
            if len(self._cached) >= 8:
                self._cached.pop(next(iter(self._cached)))
            self._cached[key] = BatchParams(params, seeds, self.device)
        return self._cached[key]

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], counters: torch.Tensor,
                 history: torch.Tensor, reply: torch.Tensor | None = None) -> torch.Tensor:
        """logits [B, V] fp32 -> next token ids [B]. counters [B] (on the device): the position each row
        samples after, so every draw of a request gets fresh noise. history [B, T]: prompt and reply ids
        (for repetition_penalty), reply [B, T']: the reply's ids (presence/frequency), -1 padded."""
        batch = self.batch_params(params, seeds)
        if batch.penalised:
            logits = apply_repetition_penalty(logits, history, batch.penalty)
        if batch.reply_penalised:
            logits = apply_reply_penalties(logits, reply, batch.frequency, batch.presence)
        greedy_ids = logits.argmax(-1)
        if batch.all_greedy:
            return greedy_ids
        scaled = filter_logits(logits / batch.temperature[:, None], batch.top_k, batch.top_p, batch.min_p)
        probs = scaled.softmax(-1)
        # Exponential race (Gumbel-max): argmax p/E with E ~ Exp(1) samples from p.
        sampled = (probs / exponential_noise(batch.seeds, counters, probs.shape[-1])).argmax(-1)
        return torch.where(batch.greedy, greedy_ids, sampled)
