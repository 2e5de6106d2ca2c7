"""Decode cost and resident KV memory as a long generation grows, per policy (issue: eviction).

    python bench/decode_growth.py --tokens 4096 --budget 512 --policies dense,raas,streaming,h2o,quest

For each policy: generate --tokens tokens (EOS ignored, greedy) from a short chat prompt on the demo
model, timing every decode step and reading the pages the sequence holds after it. Prints a markdown
table and writes JSON next to it.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch

from lemma import Engine, SamplingParams, make_policy
from lemma.models.store import resolve_model


def window_ms(times: list[float], token: int, width: int = 64) -> float:
    """Mean decode ms/token over the `width` steps that end with generated token number `token`.
    Decode step i (0-based) produces generated token i + 2 (the first comes from prefill)."""
    end = min(token - 1, len(times))
    chunk = times[max(end - width, 0) : end]
    return 1000 * sum(chunk) / len(chunk)


def run_policy(engine: Engine, name: str, budget: int, prompt_ids: list[int], tokens: int) -> dict:
    engine.policy = make_policy(name, None if name == "dense" else budget)
    times: list[float] = []
    kv_bytes: list[int] = []
    decode = engine.runner.decode

    def timed(groups):
        start = time.perf_counter()
        logits = decode(groups)
        times.append(time.perf_counter() - start)
        kv_bytes.append(sum(len(p) for p in groups[0][1][0].pages) * engine.pool.layer_page_bytes)
        return logits

    engine.runner.decode = timed
    try:
        out = engine.generate([prompt_ids], SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True))[0]
    finally:
        engine.runner.decode = decode
    checkpoints = [t for t in (512, 1024, 2048, 4096, 8192) if t <= tokens]
    return {
        "policy": engine.policy.describe(),
        "generated": len(out.token_ids),
        "peak_kv_bytes": out.stats.peak_kv_bytes,
        "kv_bytes_at": {t: kv_bytes[t - 2] for t in checkpoints},
        "ms_per_token_at": {t: window_ms(times, t) for t in checkpoints},
        "ratio_last_over_512": window_ms(times, tokens) / window_ms(times, 512),
        "decode_tokens_per_second": out.stats.decode_tokens_per_second,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--policies", default="dense,raas,streaming,h2o,quest")
    parser.add_argument("--prompt", default="Write a very long story about a dragon who learns mathematics.")
    parser.add_argument("--out", default="bench/results/decode_growth.json")
    args = parser.parse_args()

    engine = Engine(resolve_model(args.model), kv_cache_tokens=args.tokens + 1024)
    prompt_ids = engine.chat_prompt([{"role": "user", "content": args.prompt}])
    page_bytes = engine.pool.page_bytes
    results = [run_policy(engine, name, args.budget, prompt_ids, args.tokens) for name in args.policies.split(",")]
    allowed = (engine.pool.pages_for(len(prompt_ids) + args.budget) + 1) * page_bytes  # (prompt + budget) + 1 page

    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    print(f"\nmodel {engine.model_dir.name}, {engine.device}, {str(engine.dtype)[6:]}, prompt {len(prompt_ids)} tokens, "
          f"{args.tokens} generated, budget {args.budget}; (prompt + budget) + 1 page = {mib(allowed)} MiB\n")
    marks = list(results[0]["kv_bytes_at"])
    print("| policy | " + " | ".join(f"KV MiB @{t}" for t in marks) + " | peak KV MiB | "
          + " | ".join(f"ms/tok @{t}" for t in marks) + f" | ms/tok @{args.tokens} ÷ @512 |")
    print("|---" * (2 * len(marks) + 3) + "|")
    for r in results:
        print(f"| {r['policy']} | " + " | ".join(mib(r["kv_bytes_at"][t]) for t in marks) + f" | {mib(r['peak_kv_bytes'])} | "
              + " | ".join(f"{r['ms_per_token_at'][t]:.1f}" for t in marks) + f" | {r['ratio_last_over_512']:.2f} |")
    meta = {"date": date.today().isoformat(), "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
            "torch": torch.__version__, "model": engine.model_dir.name, "prompt_tokens": len(prompt_ids),
            "budget": args.budget, "allowed_bytes": allowed, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
