"""Tensor parallelism on CPU: the same greedy generation with tensor_parallel=1 and 2, side by side in
one run (tokens must match; ms per decode step compared). Every run uses the same total number of
threads: tp=1 with T threads, tp=2 with T/2 threads per rank.

    python -m bench.tp_speed --model qwen2.5-coder-0.5b-instruct --threads 2 --prompt-tokens 256 --steps 64
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lemma import Engine, RaaS, SamplingParams
from lemma.evaluation.speed import long_prompt
from lemma.models.store import resolve_model


def run(model_dir: Path, tp: int, threads: int, prompt_tokens: int, steps: int, policy) -> dict:
    torch.set_num_threads(max(threads // tp, 1))
    with Engine(model_dir, kv_cache_tokens=prompt_tokens + steps + 64, max_batch=1, tensor_parallel=tp,
                device="cpu", policy=policy) as engine:
        prompt = long_prompt(engine, prompt_tokens)
        times = []
        decode = engine.runner.decode

        def timed(groups):
            start = time.perf_counter()
            out = decode(groups)
            times.append(time.perf_counter() - start)
            return out

        engine.runner.decode = timed
        out = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True))[0]
        return {"tp": tp, "threads_per_rank": max(threads // tp, 1), "policy": policy.describe(),
                "ms_per_step": 1000 * sum(times[2:]) / max(len(times) - 2, 1),
                "prefill_s": out.stats.prefill_seconds, "tokens": out.token_ids,
                "pages_evicted": out.stats.pages_evicted}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--budget", type=int, default=128)
    parser.add_argument("--out", default="bench/results/tp_speed.json")
    args = parser.parse_args()
    model_dir = resolve_model(args.model)
    rows = []
    for policy in (RaaS(budget=args.budget, pin_prompt=False), ):
        one = run(model_dir, 1, args.threads, args.prompt_tokens, args.steps, policy)
        two = run(model_dir, 2, args.threads, args.prompt_tokens, args.steps, policy)
        for row in (one, two):
            row["tokens_equal_tp1"] = row["tokens"] == one["tokens"]
            rows.append({k: v for k, v in row.items() if k != "tokens"})
    for row in rows:
        print(json.dumps(row))
    Path(args.out).write_text(json.dumps({"model": args.model, "prompt_tokens": args.prompt_tokens,
                                          "steps": args.steps, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
