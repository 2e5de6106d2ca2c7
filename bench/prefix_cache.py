"""What the prefix cache saves, side by side with it off, in one process: (1) a second request sharing a
~1K-token system prompt (TTFT and tokens prefilled), (2) a 5-turn chat (prefill tokens and seconds over
all turns), under Dense and pinned RaaS. Serve throughput with 16 clients sharing a system prompt is
bench/serve_load.py --system-tokens 1024 --prefix-cache both.

    OMP_NUM_THREADS=2 .venv/bin/python -m bench.prefix_cache --out bench/results/prefix_cache.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from lemma import Dense, Engine, RaaS, SamplingParams
from lemma.models.store import pull

SYSTEM = ("You are a careful assistant for a company's internal tools. Follow the policies below exactly. " +
          " ".join(f"Rule {i}: when a user asks about topic {i}, answer in at most {i % 5 + 2} sentences, cite the "
                   f"handbook section {i}.{i % 3}, and never guess numbers you were not given." for i in range(40)))
QUESTIONS = ["How do I reset my password?", "What is the travel budget?", "Who approves leave?",
             "Where are the build logs?", "How do I book a room?"]


def second_request(engine: Engine, params: SamplingParams) -> dict:
    """TTFT and prefill of request B after request A with the same system prompt (B's alone matters)."""
    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[0]}]
    second = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[1]}]
    engine.generate([engine.chat_prompt(first)], params)
    out = engine.generate([engine.chat_prompt(second)], params)[0]
    return {"prompt_tokens": out.stats.prompt_tokens, "cached_tokens": out.stats.cached_tokens,
            "prefilled_tokens": out.stats.prompt_tokens - out.stats.cached_tokens,
            "ttft_s": out.stats.ttft_seconds, "prefill_s": out.stats.prefill_seconds}


def chat(engine: Engine, params: SamplingParams, turns: int) -> dict:
    messages = [{"role": "system", "content": SYSTEM}]
    prompt = cached = 0
    prefill = ttft = 0.0
    for turn in range(turns):
        messages.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
        out = engine.chat(messages, params)
        messages.append({"role": "assistant", "content": out.text})
        prompt, cached = prompt + out.stats.prompt_tokens, cached + out.stats.cached_tokens
        prefill, ttft = prefill + out.stats.prefill_seconds, ttft + out.stats.ttft_seconds
    return {"turns": turns, "prompt_tokens": prompt, "cached_tokens": cached, "prefilled_tokens": prompt - cached,
            "prefill_s": prefill, "ttft_sum_s": ttft}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    folder = pull(args.model, quiet=True)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    rows = []
    for policy in (Dense(), RaaS(budget=2048)):
        engines = {on: Engine(folder, policy=policy, kv_cache_tokens=16384, prefix_cache=on) for on in (False, True)}
        for on, engine in engines.items():  # warm: the first forward of a process pays for allocation
            engine.generate(["warm up"], SamplingParams(max_tokens=2))
            engine.pages.clear_cache()
        for on in (False, True):
            rows.append({"policy": policy.describe(), "prefix_cache": on, "case": "second request, shared system prompt",
                         **second_request(engines[on], params)})
        for on in (False, True):
            engines[on].pages.clear_cache()
            rows.append({"policy": policy.describe(), "prefix_cache": on, "case": f"{args.turns}-turn chat",
                         **chat(engines[on], params, args.turns)})
    for row in rows:
        print(json.dumps(row))
    meta = {"model": args.model, "threads": os.environ.get("OMP_NUM_THREADS", "default"), "date": time.strftime("%Y-%m-%d"),
            "cpu": platform.processor() or platform.machine(), "max_tokens": args.max_tokens}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"{'policy':<10} {'case':<38} {'cache':>5} {'prompt':>7} {'cached':>7} {'prefilled':>9} {'TTFT/prefill s':>14}")
    for r in rows:
        seconds = r.get("ttft_s", r["prefill_s"])
        print(f"{r['policy']:<10} {r['case']:<38} {'on' if r['prefix_cache'] else 'off':>5} {r['prompt_tokens']:>7} "
              f"{r['cached_tokens']:>7} {r['prefilled_tokens']:>9} {seconds:>14.3f}")


if __name__ == "__main__":
    main()
