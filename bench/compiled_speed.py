"""SmolLM2-135M decode speed: eager vs compiled step vs transformers, fp32 and bf16, batch 1 and 32,
1K and 4K context, side by side in one run (CPU).

The first step of every bucket (where the compiled step compiles) is left out of the timing.

    OMP_NUM_THREADS=2 python bench/compiled_speed.py --out bench/results/compiled_speed.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch

from lemma import Dense, Engine, RaaS, SamplingParams
from lemma.evaluation import speed
from lemma.models.store import resolve_model


def step_ms(engine: Engine, policy, batch: int, context: int, steps: int) -> float:
    prompt = speed.long_prompt(engine, context)
    return speed.decode_step_ms(engine, policy, [prompt[b:] + prompt[:b] for b in range(batch)], steps)


def prefill_seconds(engine: Engine, context: int) -> tuple[float, float]:
    """Seconds to prefill one prompt of `context` tokens: lemma (paged, chunked) and transformers."""
    import transformers

    prompt = speed.long_prompt(engine, context)
    engine.policy = Dense()
    engine.generate([prompt], SamplingParams(max_tokens=1))  # warm-up
    ours = min(engine.generate([prompt], SamplingParams(max_tokens=1))[0].stats.prefill_seconds for _ in range(2))
    model = transformers.AutoModelForCausalLM.from_pretrained(engine.model_dir, dtype=engine.dtype).eval()
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        model(ids)
        theirs = []
        for _ in range(2):
            start = time.perf_counter()
            model(ids)
            theirs.append(time.perf_counter() - start)
    return ours, min(theirs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--contexts", default="1000,4000")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--modes", default="eager,compiled,transformers")
    parser.add_argument("--max-batched-context", type=int, default=1000, help="Batches > 1 only up to this context.")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    folder = resolve_model(args.model)
    batches = [int(b) for b in args.batches.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    modes = args.modes.split(",")
    rows: dict[tuple, dict] = {}
    # lemma first, transformers last: importing transformers made the frozen compiled step 1.5x slower
    # in the same process (32 -> 48 ms/step on SmolLM2; cause not found)
    for dtype in args.dtypes.split(","):
        for mode in [m for m in ("eager", "compiled") if m in modes]:  # one engine (and pool) at a time
            tokens = max(batches) * (max(contexts) + args.steps + 32)
            engine = Engine(folder, dtype=dtype, device="cpu", kv_cache_tokens=tokens, max_batch=max(batches),
                            compile=mode == "compiled")
            for batch in batches:
                for context in contexts:
                    if batch > 1 and context > args.max_batched_context:
                        continue
                    policies = [("dense", Dense())] + ([("raas-512", RaaS(budget=512, pin_prompt=False))] if context > 512 else [])
                    for name, policy in policies:
                        row = rows.setdefault((dtype, batch, context, name),
                                              {"dtype": dtype, "batch": batch, "context": context, "policy": name})
                        row[f"{mode}_ms"] = step_ms(engine, policy, batch, context, args.steps)
                        print(json.dumps(row), flush=True)
            del engine
    if "transformers" in modes:
        for dtype in args.dtypes.split(","):
            engine = Engine(folder, dtype=dtype, device="cpu", kv_cache_tokens=max(contexts) + args.steps + 32, max_batch=1)
            for context in contexts:
                row = rows[(dtype, 1, context, "dense")]
                row["transformers_ms"] = speed.bench_transformers(engine, speed.long_prompt(engine, context), args.steps)
                ours, theirs = prefill_seconds(engine, context)
                row.update(prefill_lemma_s=ours, prefill_transformers_s=theirs)
                print(json.dumps(row), flush=True)
    for row in rows.values():
        if "eager_ms" in row and "compiled_ms" in row:
            row["eager_over_compiled"] = row["eager_ms"] / row["compiled_ms"]
    rows = list(rows.values())
    print(json.dumps(rows, indent=1))
    if args.out:
        report = {"date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
                  "threads": torch.get_num_threads(), "torch": torch.__version__, "model": args.model,
                  "steps": args.steps, "rows": rows}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
