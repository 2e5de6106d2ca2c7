"""Sampling parameters and a batched sampler: penalties, temperature, top-k, top-p, min-p, per-request seeds.

Everything is tensor ops over the batch (no host synchronisation); rows with temperature 0 are greedy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lemma.errors import LemmaError


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens > 0, "max_tokens must be a positive integer"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be an integer >= 0 (0 = off)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
        ]
        for ok, message in checks:
            if not ok:
                field_name = message.split()[0]
                raise LemmaError(f"{message}, got {getattr(self, field_name, self.stop)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


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


class Sampler:
    """Holds per-request generators so a seeded request samples the same tokens whatever its batch."""

    def __init__(self, device: torch.device):
        self.device = device
        self.default_generator = torch.Generator(device=device)
        self.default_generator.seed()

    def generator_for(self, seed: int | None) -> torch.Generator:
        if seed is None:
            return self.default_generator
        g = torch.Generator(device=self.device)
        g.manual_seed(seed)
        return g

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator],
                 history: torch.Tensor) -> torch.Tensor:
        """logits [B, V] fp32 -> next token ids [B]."""
        dev = logits.device
        as_tensor = lambda values, dtype: torch.tensor(values, dtype=dtype, device=dev)  # noqa: E731
        if any(p.repetition_penalty != 1.0 for p in params):
            logits = apply_repetition_penalty(logits, history, as_tensor([p.repetition_penalty for p in params], torch.float32))
        greedy_ids = logits.argmax(-1)
        if all(p.greedy for p in params):
            return greedy_ids
        temperature = as_tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], torch.float32)
        scaled = filter_logits(
            logits / temperature[:, None],
            as_tensor([p.top_k for p in params], torch.int64),
            as_tensor([p.top_p for p in params], torch.float32),
            as_tensor([p.min_p for p in params], torch.float32),
        )
        probs = scaled.softmax(-1)
        # Exponential race (Gumbel-max): argmax p/E with E ~ Exp(1) samples from p; one noise row per request.
        noise = torch.stack([torch.empty_like(probs[0]).exponential_(generator=g) for g in generators])
        sampled = (probs / noise).argmax(-1)
        is_greedy = as_tensor([p.greedy for p in params], torch.bool)
        return torch.where(is_greedy, greedy_ids, sampled)
