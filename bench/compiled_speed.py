"""SmolLM2-135M decode speed: eager vs compiled step vs transformers, fp32 and bf16, batch 1 and 32,
1K and 4K context, side by side in one run (CPU).

The first step of every bucket (where the compiled step compiles) is left out of the timing.

    OMP_NUM_THREADS=2 python bench/compiled_speed.py --out bench/results/compiled_speed.json
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import date
from pathlib import Path

import torch

from lemma import Dense, Engine, RaaS
from lemma.evaluation import speed
from lemma.models.store import resolve_model


def step_ms(engine: Engine, policy, batch: int, context: int, steps: int) -> float:
    prompt = speed.long_prompt(engine, context)
    return speed.decode_step_ms(engine, policy, [prompt[b:] + prompt[:b] for b in range(batch)], steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--contexts", default="1000,4000")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--modes", default="eager,compiled,transformers")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    folder = resolve_model(args.model)
    batches = [int(b) for b in args.batches.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    modes = args.modes.split(",")
    rows = []
    for dtype in args.dtypes.split(","):
        engines = {}
        for mode in ("eager", "compiled"):
            if mode in modes:
                tokens = max(batches) * (max(contexts) + args.steps + 32)
                engines[mode] = Engine(folder, dtype=dtype, device="cpu", kv_cache_tokens=tokens,
                                       max_batch=max(batches), compile=mode == "compiled")
        for batch in batches:
            for context in contexts:
                policies = [("dense", Dense())] + ([("raas-512", RaaS(budget=512, pin_prompt=False))] if context > 512 else [])
                for name, policy in policies:
                    row = {"dtype": dtype, "batch": batch, "context": context, "policy": name}
                    for mode, engine in engines.items():
                        row[f"{mode}_ms"] = step_ms(engine, policy, batch, context, args.steps)
                    if "transformers" in modes and name == "dense" and batch == 1:
                        base = next(iter(engines.values()))
                        row["transformers_ms"] = speed.bench_transformers(base, speed.long_prompt(base, context), args.steps)
                    if "eager_ms" in row and "compiled_ms" in row:
                        row["eager_over_compiled"] = row["eager_ms"] / row["compiled_ms"]
                    print(json.dumps(row), flush=True)
                    rows.append(row)
        del engines
    if args.out:
        report = {"date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
                  "threads": torch.get_num_threads(), "torch": torch.__version__, "model": args.model,
                  "steps": args.steps, "rows": rows}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
