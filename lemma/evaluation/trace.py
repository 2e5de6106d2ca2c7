"""The paper's waterfall picture: per-page attention mass over decode steps for one layer and KV head
(or averaged over them), with the steps where RaaS evicted a page marked."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lemma.engine.engine import Engine
from lemma.engine.sampler import SamplingParams


@dataclass
class Trace:
    steps: list[dict[int, float]] = field(default_factory=list)  # per decode step: logical page -> mass
    evictions: list[tuple[int, int]] = field(default_factory=list)  # (step, logical page evicted)
    text: str = ""
    prompt_pages: int = 0


def record_trace(engine: Engine, prompt_ids: list[int], max_tokens: int, layer: int | None = None,
                 head: int | None = None, temperature: float = 0.0) -> Trace:
    """Generate under engine.policy and record, after every decode step, the attention mass of each
    resident page in `layer` (default: averaged over layers) and `head` (default: averaged over heads)."""
    trace = Trace(prompt_pages=engine.pool.pages_for(len(prompt_ids)))
    layers = range(engine.config.num_layers) if layer is None else [layer]
    current: dict[int, float] = {}
    seen_layers: list[int] = []

    def observe(lay: int, born: torch.Tensor, valid: torch.Tensor, mass: torch.Tensor, evicted: torch.Tensor) -> None:
        if lay not in layers:
            return
        heads = range(born.shape[1]) if head is None else [head]
        share = 1.0 / (len(layers) * len(heads))
        for h in heads:
            for page, m, ok in zip(born[0, h].tolist(), mass[0, h].tolist(), valid[0, h].tolist()):
                if ok:
                    current[page] = current.get(page, 0.0) + m * share
            gone = int(evicted[0, h])
            if gone >= 0:
                trace.evictions.append((len(trace.steps), gone))
        seen_layers.append(lay)
        if len(seen_layers) == len(layers):
            trace.steps.append(dict(current))
            current.clear()
            seen_layers.clear()

    engine.runner.observer = observe
    try:
        out = engine.generate([prompt_ids], SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=True))[0]
    finally:
        engine.runner.observer = None
    trace.text = out.text
    trace.evictions = sorted(set(trace.evictions))
    return trace
