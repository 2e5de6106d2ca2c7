"""GPU benchmark section `concurrency`: long outputs under one fixed KV pool, Dense vs RaaS (pin_prompt=False),
graphs on, to set beside R-KV's 13.4x larger batch and 9.2x throughput at its budget (arXiv 2505.24133).

The pool holds `dense_fits` whole sequences (prompt + output) under Dense. Every run offers the same
`requests` prompts (distinct random tokens; ignore_eos, so every request wants its whole output) at
once to a fresh engine with that pool, and times a window of engine steps once the admitted prompts
are prefilled and the batch's graph is captured:

- raas: the engine's own admission; each request is promised its whole budget, so pool / budget run;
- dense-whole: max_batch capped at the requests whose whole prompt + output fit the pool, the batch
  Dense holds to the end without preemption: R-KV's comparison;
- dense-on-demand: the engine's own admission, which promises pages as sequences grow: early in a
  long-output run it admits by current length, then preempts the newest as they grow (each is
  recomputed from its tokens when re-admitted). Its window shows that, not the whole run.

Prompts are `budget` tokens, so RaaS evicts from its first decode step (its steady-state cost); Dense's
window sees contexts of prompt .. prompt + window, far below the prompt + output it reaches later, so
its step time here is a lower bound and the throughput ratio a conservative one."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from gpu_common import free_memory, random_prompts, toy_tokenizer
from lemma import Dense, Engine, RaaS, SamplingParams
from lemma.engine.policies import Policy
from lemma.engine.pool import PAGE_SIZE
from lemma.engine.sequence import PREFILL
from lemma.models.llama import CausalLM

PREFILL_CHUNK = 4096
SETTLE_STEPS = 2  # steps after the last prefill before the window: the batch's bucket is captured by then


@dataclass(frozen=True)
class LongOutputs:
    prompt: int  # tokens per request (the RaaS budget: it evicts from the first decode step)
    output: int  # tokens each request generates
    requests: int  # offered at once
    dense_fits: int  # the pool holds this many whole Dense sequences
    window: int  # engine steps timed

    @property
    def pool_tokens(self) -> int:
        return self.dense_fits * (self.prompt + self.output)


def whole_fits(policy: Policy, pool_pages: int, work: LongOutputs, layers: int) -> int:
    """Requests the pool holds with each one's most pages in any layer promised at once."""
    return pool_pages // max(policy.capacity(work.prompt, work.output, layer) for layer in range(layers))


def serve_window(model: CausalLM, policy: Policy, max_batch: int, work: LongOutputs, prompts: list[list[int]],
                 mode: bool | str) -> dict:
    engine = Engine.from_model(model, toy_tokenizer(), kv_cache_tokens=work.pool_tokens, max_batch=max_batch,
                               prefill_chunk=PREFILL_CHUNK, compile=mode, warm_up=False)
    params = SamplingParams(temperature=0, max_tokens=work.output, ignore_eos=True)
    for prompt in prompts:
        engine.add_request(prompt, params, policy)
    scheduler, ramp, settled = engine.scheduler, 0, 0
    while settled < SETTLE_STEPS and ramp < 4 * work.requests + 16:  # bounded: dense-on-demand may keep re-prefilling
        engine.step()
        ramp += 1
        settled = 0 if any(seq.status == PREFILL for seq in scheduler.running) else settled + 1
    preempted_before, running, tokens = scheduler.preemptions, [], 0
    cuda = engine.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(work.window):
        tokens += sum(len(out.token_ids) for out in engine.step())  # each step ends on the host's read of its tokens
        running.append(len(scheduler.running))
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    held = sum(len(pages) for seq in scheduler.running for pages in seq.pages) * engine.pool.layer_page_bytes
    row = {"max_batch": engine.max_batch, "peak_running": scheduler.peak_running,
           "mean_running": sum(running) / len(running), "mean_tokens_per_step": tokens / work.window,
           "tokens_per_s": tokens / seconds, "ms_per_step": 1000 * seconds / work.window,
           "preemptions_in_window": scheduler.preemptions - preempted_before, "preemptions": scheduler.preemptions,
           "ramp_steps": ramp, "kv_held_mib": held / 2**20, "pool_mib": engine.pool.num_pages * engine.pool.page_bytes / 2**20}
    del engine
    free_memory()
    return row


def run(model: CausalLM, work: LongOutputs, raas: RaaS) -> dict:
    if raas.budget != work.prompt or raas.pin_prompt:
        raise ValueError("the concurrency run wants an unpinned RaaS whose budget is the prompt length")
    device = model.model.embed_tokens.weight.device
    mode = True if device.type == "cuda" else "eager"
    layers, pool_pages = model.config.num_layers, -(-work.pool_tokens // PAGE_SIZE)
    prompts = random_prompts(work.requests, work.prompt, model.config.vocab_size, seed=11)
    fits = {"dense": whole_fits(Dense(), pool_pages, work, layers), "raas": whole_fits(raas, pool_pages, work, layers)}
    runs = {raas.describe(): (raas, work.requests, fits["raas"]),
            "dense-whole": (Dense(), min(work.requests, fits["dense"]), fits["dense"]),
            "dense-on-demand": (Dense(), work.requests, fits["dense"])}
    rows = {}
    for label, (policy, max_batch, fit) in runs.items():
        measured = serve_window(model, policy, max_batch, work, prompts, mode)
        rows[label] = {"policy": policy.describe(), "whole_fits": fit, **measured}
    ours, whole = rows[raas.describe()], rows["dense-whole"]
    return {"work": {**asdict(work), "pool_tokens": work.pool_tokens}, "runs": rows,
            "batch_ratio_raas_over_dense_whole": ours["mean_running"] / whole["mean_running"],
            "throughput_ratio_raas_over_dense_whole": ours["tokens_per_s"] / whole["tokens_per_s"],
            "throughput_ratio_raas_over_dense_on_demand": ours["tokens_per_s"] / rows["dense-on-demand"]["tokens_per_s"],
            "r_kv_paper": {"batch_ratio": 13.4, "throughput_ratio": 9.2}}


def print_run(shape: str, entry: dict) -> None:
    w = entry["work"]
    print(f"{shape} concurrency: pool {w['pool_tokens']} tokens (Dense holds {w['dense_fits']} whole), "
          f"{w['requests']} requests of {w['prompt']} + {w['output']} tokens, {w['window']} steps timed", flush=True)
    for label, row in entry["runs"].items():
        print(f"{shape} concurrency {label}: max_batch {row['max_batch']} (whole fits {row['whole_fits']}), running "
              f"{row['mean_running']:.1f} (peak {row['peak_running']}), {row['tokens_per_s']:.0f} tok/s, "
              f"{row['ms_per_step']:.2f} ms/step, "
              f"preemptions {row['preemptions_in_window']} in the window ({row['preemptions']} in all), KV held "
              f"{row['kv_held_mib']:.1f} of {row['pool_mib']:.1f} MiB", flush=True)
    print(f"{shape} concurrency: RaaS / Dense-whole batch {entry['batch_ratio_raas_over_dense_whole']:.1f}x, throughput "
          f"{entry['throughput_ratio_raas_over_dense_whole']:.1f}x (R-KV: 13.4x / 9.2x); RaaS / Dense-on-demand throughput "
          f"{entry['throughput_ratio_raas_over_dense_on_demand']:.2f}x", flush=True)
