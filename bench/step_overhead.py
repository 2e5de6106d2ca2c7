"""Per-step overhead of the decode loop: a 30-layer model with hidden size 72 (SmolLM2's layer and head
layout shrunk until the arithmetic is negligible), so the time is nearly all Python, dispatch and
launches. Eager vs compiled for every policy, side by side in one run; `--modes ops` counts the aten
calls one eager step dispatches instead (seconds, no timing: what makes one policy's eager step slower
than another's when the step is host-bound, as eager decode is on a GPU).

The engine warms up (compiles) at start; a first generation warms caches up, the second one is timed.

    OMP_NUM_THREADS=1 python bench/step_overhead.py --out bench/results/step_overhead.json
    OMP_NUM_THREADS=1 python bench/step_overhead.py --modes ops
    TRITON_INTERPRET=1 OMP_NUM_THREADS=1 python -m bench.step_overhead --modes ops --attention triton --steps 12
        (the GPU step's ops: the attention and store are Triton kernels, the bookkeeping around them aten)
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch

from lemma import H2O, Dense, Engine, Quest, RaaS, SamplingParams, StreamingLLM
from lemma.evaluation import speed
from lemma.models.config import ModelConfig
from lemma.models.llama import CausalLM

SHAPE = dict(model_type="llama", hidden_size=72, intermediate_size=192, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3, vocab_size=512, rope_theta=10000.0, tie_word_embeddings=True)
BUDGET = 448  # 28 pages: the 25-page prompt pinned, then evictions from the 29th page on
POLICIES = {"dense": Dense(), "raas": RaaS(budget=BUDGET), "raas-mass": RaaS(budget=BUDGET, refresh="mass"),
            "streaming": StreamingLLM(budget=BUDGET), "h2o": H2O(budget=BUDGET), "quest": Quest(budget=BUDGET)}


def overhead_model(batch: int) -> CausalLM:
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.from_dict(SHAPE))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return model.eval().requires_grad_(False)


def step_ms(engine: Engine, batch: int, prompt_len: int, steps: int) -> float:
    """Mean ms of one decode step of `batch` sequences over a second, identical generation (the first
    one warms up and compiles)."""
    prompts = [[1 + (i + b) % 500 for i in range(prompt_len)] for b in range(batch)]
    engine.generate(prompts, SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True))
    return speed.decode_step_ms(engine, engine.policy, prompts, steps)


def aten_calls_per_step(engine: Engine, batch: int, prompt_len: int, steps: int) -> int:
    """Top-level aten calls of the last eager decode step of one generation (views included: each costs
    host dispatch time; the others launch at least one kernel on a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    counts: list[int] = []
    calls = 0
    decode = engine.runner.decode

    def counted(*args):
        nonlocal calls
        calls += 1
        if calls < steps:  # only the last step runs under the profiler
            return decode(*args)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            logits = decode(*args)
        counts.append(sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None))
        return logits

    engine.runner.decode = counted
    try:
        prompts = [[1 + (i + b) % 500 for i in range(prompt_len)] for b in range(batch)]
        engine.generate(prompts, SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True))
    finally:
        engine.runner.decode = decode
    return counts[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=110)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=390)
    parser.add_argument("--modes", default="eager,compiled", help="comma list of eager, compiled, ops")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--attention", default=None, choices=["torch", "triton"],
                        help="attention kernels (default: the engine's; triton on CPU needs TRITON_INTERPRET=1)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from bench.gpu_common import toy_tokenizer  # the engine needs a tokenizer; a toy one will do

    can_compile = "compile" in inspect.signature(Engine.from_model).parameters
    rows = []
    for name in args.policies.split(","):
        row = {"policy": name}
        for mode in args.modes.split(","):
            if mode == "compiled" and not can_compile:
                continue
            extra = {"compile": True} if mode == "compiled" else {}
            engine = Engine.from_model(overhead_model(args.batch), toy_tokenizer(), policy=POLICIES[name],
                                       kv_cache_tokens=64 * 1024, max_batch=max(args.batch, 1), attention=args.attention,
                                       **extra)
            if mode == "ops":  # the eager step's dispatch count, not its time
                row["eager_aten_calls"] = aten_calls_per_step(engine, args.batch, args.prompt, args.steps)
                row["aten_calls_per_layer"] = row["eager_aten_calls"] / SHAPE["num_hidden_layers"]
                continue
            start = time.perf_counter()
            row[f"{mode}_ms"] = step_ms(engine, args.batch, args.prompt, args.steps)
            row[f"{mode}_total_s"] = time.perf_counter() - start  # both generations, compile included
        if "eager_ms" in row and "compiled_ms" in row:
            row["compiled_over_eager"] = row["compiled_ms"] / row["eager_ms"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        report = {"date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
                  "threads": torch.get_num_threads(), "torch": torch.__version__, "shape": SHAPE,
                  "batch": args.batch, "steps": args.steps, "attention": args.attention, "rows": rows}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
