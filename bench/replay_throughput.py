"""Chunked-replay throughput on real reasoning traces: trace tokens per second per policy, B traces
replayed together (what `lemma eval --traces` does batch by batch).

    OMP_NUM_THREADS=1 python -m bench.replay_throughput --model qwen2.5-coder-0.5b-instruct --dtype bfloat16 --batch 4
    ... --shared --budget 512: each policy also replaying from Dense's recorded prefix, side by side
"""

from __future__ import annotations

import argparse
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
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--traces", type=Path, default=TRACES)
    parser.add_argument("--batch", type=int, default=4, help="traces replayed together (the first B of the file)")
    parser.add_argument("--tokens", type=int, default=512, help="trace tokens per trace")
    parser.add_argument("--policies", default="dense,raas,h2o,quest")
    parser.add_argument("--budget", type=int, default=128)
    parser.add_argument("--shared", action="store_true",
                        help="also time each policy sharing Dense's prefix (where it attends what Dense does)")
    args = parser.parse_args()
    engine = Engine(resolve_model(args.model), kv_cache_tokens=8192, dtype=args.dtype, max_batch=args.batch)
    pairs = [trace_tokens(engine, t, args.tokens) for t in load_traces(args.traces, args.batch)]
    total = sum(len(t) for _, t in pairs)
    print(f"{engine.model_dir.name} ({args.dtype}), {args.batch} traces x {args.tokens} tokens, "
          f"{torch.get_num_threads()} threads")
    recordings = None
    if args.shared:  # Dense's replay records the prefix the policies may share (engine/recording.py)
        engine.policy = make_policy("dense")
        forced = engine.teacher_force([p for p, _ in pairs], [t for _, t in pairs], record_until=1 << 20)
        recordings = [f.recording for f in forced]
    for name in args.policies.split(","):
        engine.policy = make_policy(name, None if name == "dense" else args.budget)
        line = f"{engine.policy.describe():>10}:"
        for shared in ([None, recordings] if args.shared and name != "dense" else [None]):
            start = time.perf_counter()
            engine.teacher_force([p for p, _ in pairs], [t for _, t in pairs], shared=shared)
            seconds = time.perf_counter() - start
            line += f" {'shared prefix' if shared else 'full'} {seconds:6.1f} s, {total / seconds:6.1f} trace tokens/s;"
        print(line)


if __name__ == "__main__":
    main()
