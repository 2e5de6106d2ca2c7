"""Load test of `lemma serve`: N concurrent clients asking for long generations from one KV pool.

For each KV policy a fresh server starts on 127.0.0.1 (a subprocess), N streaming chat clients (the
`openai` async client) send GSM8K questions at once with ignore_eos, and we measure: completed
requests/s, output tokens/s, time to first token and time per output token (p50/p99), the most
requests running at once (the server's /stats) and preemptions. The pool is sized so Dense cannot
hold every request at full length: it must queue or preempt, while an evicting policy's requests
each fit in their budget. Bounded: --time-limit seconds per policy, then the rest is cancelled.

    .venv/bin/python -m bench.serve_load --clients 8 --max-tokens 1024 --kv-cache-tokens 4096 \
        --policies dense,raas-256,raas-512,streaming-512

With --system-tokens N every client sends the same system prompt of about N tokens first; --prefix-cache
both runs each policy with the prefix cache on and off (the server's --no-prefix-cache). --mix
dense,raas-256 runs one server instead, client i asking for policy i mod 2 in its `kv_policy`; with
--lemma-src DIR the server imports lemma from DIR (e.g. a worktree of an older commit: side by side).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k_test.jsonl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def questions(n: int) -> list[str]:
    if DATA.is_file():
        rows = [json.loads(line)["question"] for line in DATA.open()][:n]
    else:
        rows = []
    return [rows[i] if i < len(rows) else f"Question {i}: what is {i} * 17? Think step by step." for i in range(n)]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def system_prompt(tokens: int) -> str | None:
    """About `tokens` tokens of instructions (SmolLM2/Qwen tokenizers: ~25 tokens per rule)."""
    if tokens <= 0:
        return None
    return "Follow these rules. " + " ".join(f"Rule {i}: answer questions about topic {i} in {i % 5 + 2} short sentences "
                                             f"and cite section {i}.{i % 3}." for i in range(tokens // 25))


def policy_spec(policy: str) -> str:
    """'raas-256' (this script's short form) as a policy spec: 'raas:budget=256'."""
    name, _, budget = policy.rpartition("-") if policy[-1].isdigit() else (policy, "", "")
    return f"{name}:budget={budget}" if budget else name


def start_server(args: argparse.Namespace, policy: str, port: int, prefix_cache: bool = True,
                 lemma_src: str | None = None) -> subprocess.Popen:
    name, _, budget = policy.rpartition("-") if policy[-1].isdigit() else (policy, "", "")
    command = [sys.executable, "-c", "from lemma.cli import main; main()", "serve", "--model", args.model, "--port", str(port),
               "--policy", name, "--kv-cache-tokens", str(args.kv_cache_tokens), "--max-batch", str(args.max_batch)]
    if budget:
        command += ["--budget", budget]
    command.append("--compile" if args.compile else "--no-compile")
    if not prefix_cache:
        command.append("--no-prefix-cache")
    env = dict(os.environ)
    if lemma_src:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(lemma_src).resolve()), env.get("PYTHONPATH", "")])
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                              cwd=lemma_src)  # `python -c` imports from its working folder first
    deadline = time.time() + 120
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"server for {policy} exited: {server.stderr.read()}")
        try:
            get_json(f"http://127.0.0.1:{port}/health")
            return server
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise RuntimeError(f"server for {policy} did not start in 120 s")


async def one_client(client, model: str, question: str, max_tokens: int, system: str | None,
                     policy: str | None = None) -> dict:
    sent = time.perf_counter()
    stamps: list[float] = []
    tokens = 0
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    stream = await client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True, **({"kv_policy": policy_spec(policy)} if policy else {})})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    done = time.perf_counter()
    return {"ttft": stamps[0] - sent if stamps else float("nan"),
            "tpot": (stamps[-1] - stamps[0]) / max(tokens - 1, 1) if stamps else float("nan"),
            "tokens": tokens, "seconds": done - sent}


async def load(args: argparse.Namespace, port: int, mix: list[str] | None = None) -> tuple[list[dict], float, int]:
    import openai

    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                                timeout=args.time_limit + 60)
    start = time.perf_counter()
    system = system_prompt(args.system_tokens)
    tasks = [asyncio.create_task(one_client(client, args.model, q, args.max_tokens, system, mix[i % len(mix)] if mix else None))
             for i, q in enumerate(questions(args.clients))]
    done, pending = await asyncio.wait(tasks, timeout=args.time_limit)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    elapsed = time.perf_counter() - start
    results = [t.result() for t in done if t.exception() is None]
    failed = [repr(t.exception()) for t in done if t.exception() is not None]
    if failed:
        print(f"  {len(failed)} failed: {failed[0]}", file=sys.stderr)
    await client.close()
    return results, elapsed, len(pending)


def run_policy(args: argparse.Namespace, policy: str, prefix_cache: bool = True, mix: list[str] | None = None,
               lemma_src: str | None = None) -> dict:
    port = free_port()
    server = start_server(args, mix[0] if mix else policy, port, prefix_cache, lemma_src)
    try:
        results, elapsed, cancelled = asyncio.run(load(args, port, mix))
        stats = get_json(f"http://127.0.0.1:{port}/stats")
    finally:
        server.terminate()
        server.wait(30)
    tokens = sum(r["tokens"] for r in results)
    cache = stats.get("prefix_cache", {})
    return {"policy": policy, "prefix_cache": prefix_cache, "system_tokens": args.system_tokens,
            "cached_tokens": cache.get("cached_tokens", 0), "clients": args.clients, "max_tokens": args.max_tokens,
            "kv_cache_tokens": args.kv_cache_tokens, "completed": len(results), "cancelled": cancelled,
            "seconds": elapsed, "requests_per_s": len(results) / elapsed, "output_tokens_per_s": tokens / elapsed,
            "ttft_p50_s": percentile([r["ttft"] for r in results], 50),
            "ttft_p99_s": percentile([r["ttft"] for r in results], 99),
            "tpot_p50_ms": 1000 * percentile([r["tpot"] for r in results], 50),
            "tpot_p99_ms": 1000 * percentile([r["tpot"] for r in results], 99),
            "peak_running": stats["peak_running"], "mean_decode_batch": stats["mean_decode_batch"],
            "preemptions": stats["preemptions"],
            "mean_request_s": statistics.mean(r["seconds"] for r in results) if results else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--kv-cache-tokens", type=int, default=4096)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--policies", default="dense,raas-256,raas-512,streaming-512")
    parser.add_argument("--time-limit", type=float, default=900, help="seconds per policy before the rest is cancelled")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="the server's --compile/--no-compile (its default: compiled)")
    parser.add_argument("--system-tokens", type=int, default=0, help="a shared system prompt of about this many tokens")
    parser.add_argument("--prefix-cache", choices=["on", "off", "both"], default="on")
    parser.add_argument("--mix", help="one server; client i asks for policy i mod n of this list (kv_policy)")
    parser.add_argument("--lemma-src", action="append", default=[],
                        help="run each setting again with the server importing lemma from this folder (repeatable)")
    parser.add_argument("--out", default="bench/results/serve_load.jsonl")
    args = parser.parse_args()
    rows = []
    settings = {"on": [True], "off": [False], "both": [False, True]}[args.prefix_cache]
    mix = args.mix.split(",") if args.mix else None
    runs = [("+".join(mix), c) for c in settings] if mix else [(p, c) for p in args.policies.split(",") for c in settings]
    for (policy, cache), source in [(run, src) for run in runs for src in [None, *args.lemma_src]]:
        row = run_policy(args, policy, cache, mix, source)
        row.update(threads=os.environ.get("OMP_NUM_THREADS", "default"), date=time.strftime("%Y-%m-%d"),
                   lemma_src=source or "this checkout", compile=args.compile)
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    header = f"{'policy':<22} {'lemma':<14} {'cache':>5} {'cached':>7} {'done':>5} {'req/s':>7} {'tok/s':>7} {'TTFT p50/p99 s':>15} {'TPOT p50/p99 ms':>16} {'peak run':>8} {'mean batch':>10} {'preempt':>7}"
    print(header)
    for r in rows:
        print(f"{r['policy']:<22} {Path(r['lemma_src']).name[:14]:<14} {'on' if r['prefix_cache'] else 'off':>5} {r['cached_tokens']:>7} {r['completed']:>5} {r['requests_per_s']:>7.3f} {r['output_tokens_per_s']:>7.1f} "
              f"{r['ttft_p50_s']:>7.2f}/{r['ttft_p99_s']:<7.2f} {r['tpot_p50_ms']:>8.1f}/{r['tpot_p99_ms']:<7.1f} "
              f"{r['peak_running']:>8} {r['mean_decode_batch']:>10.1f} {r['preemptions']:>7}")


if __name__ == "__main__":
    main()
