"""Chunked replay against token-by-token replay on a real reasoning trace: wall time of each, the
speed-up, the largest log-prob difference and whether the evictions agree.

    OMP_NUM_THREADS=2 python -m bench.replay_speed --model smollm2-135m-instruct --tokens 1024 --budget 256
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lemma import Engine, make_policy
from lemma.evaluation.traces import load_traces, trace_tokens
from lemma.models.store import resolve_model

TRACES = Path(__file__).resolve().parents[2] / "shared/data/reasoning_traces/qwq32b_gsm8k.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--traces", type=Path, default=TRACES)
    parser.add_argument("--index", type=int, default=3, help="which trace of the file")
    parser.add_argument("--tokens", type=int, default=1024, help="trace tokens replayed")
    parser.add_argument("--policies", default="dense,raas,h2o,quest")
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/replay_speed.jsonl"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine(resolve_model(args.model), kv_cache_tokens=8192, dtype="float32")
    trace = load_traces(args.traces)[args.index]
    prompt, target = trace_tokens(engine, trace, args.tokens)
    print(f"{engine.model_dir.name}, trace {trace.id}: prompt {len(prompt)} + {len(target)} tokens, "
          f"{args.threads} threads, fp32")
    rows = []
    for name in args.policies.split(","):
        engine.policy = make_policy(name, None if name == "dense" else args.budget)
        runs = {}
        for chunked in (True, False):
            start = time.perf_counter()
            runs[chunked] = engine.teacher_force([prompt], [target], chunked=chunked)[0]
            runs[chunked].seconds = time.perf_counter() - start
        fast, slow = runs[True], runs[False]
        row = {"model": engine.model_dir.name, "policy": engine.policy.describe(), "tokens": len(target),
               "threads": args.threads, "chunked_s": fast.seconds, "token_by_token_s": slow.seconds,
               "speedup": slow.seconds / fast.seconds,
               "max_logprob_diff": max(abs(a - b) for a, b in zip(fast.logprobs, slow.logprobs)),
               "same_top1": fast.predicted == slow.predicted,
               "pages_evicted": [fast.stats.pages_evicted, slow.stats.pages_evicted],
               "date": time.strftime("%Y-%m-%d")}
        rows.append(row)
        print(f"{row['policy']:>10}: chunked {fast.seconds:6.1f} s, token by token {slow.seconds:6.1f} s "
              f"({row['speedup']:.1f}x); max |dlogprob| {row['max_logprob_diff']:.1e}, same top-1 {row['same_top1']}, "
              f"pages evicted {row['pages_evicted']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
