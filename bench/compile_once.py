"""Compile once (issue 35): cold and warm start of the compiled decode step, and steady decode speed of
eager lemma, compiled lemma and llama.cpp at the same precision, side by side in one run (CPU).

Per model and dtype, three fresh processes: a cold start (an empty compile cache), a warm start (the cache
the cold one left), then the steady run: one engine of each mode, decoding a short and a 2K prompt in
turns (ms/token end to end, as `lemma run` reports it: sampling and bookkeeping included), against
llama.cpp's decode of the same prompt from an f32 or bf16 GGUF converted from the same safetensors.

    pip install -e ".[bench]"    # llama-cpp-python builds from sdist (~15 min, CMAKE_ARGS="-DGGML_NATIVE=ON")
    OMP_NUM_THREADS=2 python bench/compile_once.py --out bench/results/compile_once.json

The GGUFs are made once with llama.cpp's convert_hf_to_gguf.py from the llama-cpp-python sdist (fetched
with `pip download`) and kept next to the model as llama-cpp-<dtype>.gguf.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import date
from pathlib import Path

CHILD = Path(__file__).resolve()
GGUF_TYPES = {"float32": "f32", "bfloat16": "bf16"}
LLAMA_CPP = "llama-cpp-python==0.3.36"


def start_seconds(model_dir: str, dtype: str) -> dict:
    """In this process: seconds to load the model, then to warm the compiled step up (batch 1)."""
    from lemma import Engine

    start = time.perf_counter()
    engine = Engine(model_dir, dtype=dtype, device="cpu", max_batch=1, kv_cache_tokens=4096, compile=True,
                    warm_up=False)
    loaded = time.perf_counter()
    engine.warm_up()
    return {"load_s": loaded - start, "warm_up_s": time.perf_counter() - loaded,
            "start_s": time.perf_counter() - start}


def lemma_ms_per_token(engine, prompt: list[int], steps: int) -> float:
    from lemma import SamplingParams

    out = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True))[0]
    return 1000 * out.stats.decode_seconds / max(out.stats.generated_tokens - 1, 1)


def llama_cpp_ms_per_token(llm, prompt: list[int], steps: int) -> float:
    """llama.cpp's greedy decode of `steps` tokens after `prompt`: ms per token (its eval, one token each)."""
    import numpy as np

    def next_token() -> int:  # the last evaluated position's logits (kept by llama.cpp, not by the wrapper)
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))

    llm.reset()
    llm.eval(prompt)
    token, times = next_token(), []
    for _ in range(steps):
        start = time.perf_counter()
        llm.eval([token])
        token = next_token()
        times.append(time.perf_counter() - start)
    return 1000 * sum(times[1:]) / (len(times) - 1)


def prefill_seconds(engine, prompt: list[int]) -> float:
    from lemma import SamplingParams

    return engine.generate([prompt], SamplingParams(max_tokens=1))[0].stats.prefill_seconds


def transformers_prefill_seconds(model_dir: str, dtype: str, prompt: list[int], rounds: int) -> float:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    ids, best = torch.tensor([prompt]), float("inf")
    with torch.inference_mode():
        model(ids)
        for _ in range(rounds):
            start = time.perf_counter()
            model(ids)
            best = min(best, time.perf_counter() - start)
    return best


def steady(model_dir: str, dtype: str, gguf: str | None, contexts: list[int], steps: int, rounds: int) -> dict:
    """In this process: eager, compiled and llama.cpp ms/token per context, the best of `rounds` turns;
    then the prefill of the longest prompt, lemma against transformers (imported last: see BENCHMARKS.md)."""
    import torch

    from lemma import Engine
    from lemma.evaluation.speed import long_prompt

    tokens = max(contexts) + steps + 64
    engines = {mode: Engine(model_dir, dtype=dtype, device="cpu", max_batch=1, kv_cache_tokens=tokens,
                            compile=mode == "compiled") for mode in ("eager", "compiled")}
    runners = {mode: (lambda p, e=e: lemma_ms_per_token(e, p, steps)) for mode, e in engines.items()}
    if gguf is not None:
        from llama_cpp import Llama

        llm = Llama(gguf, n_ctx=tokens, n_batch=512, n_threads=torch.get_num_threads(), verbose=False)
        runners["llama.cpp"] = lambda p: llama_cpp_ms_per_token(llm, p, steps)
    prompts = {context: long_prompt(engines["eager"], context) for context in contexts}
    best: dict = {}
    for _ in range(rounds):
        for context, prompt in prompts.items():
            for mode, run in runners.items():
                ms = run(prompt)
                best[f"{mode}@{context}"] = min(best.get(f"{mode}@{context}", ms), ms)
    longest = prompts[max(contexts)]
    for mode, engine in engines.items():
        best[f"prefill_{mode}@{max(contexts)}_s"] = min(prefill_seconds(engine, longest) for _ in range(rounds))
    best[f"prefill_transformers@{max(contexts)}_s"] = transformers_prefill_seconds(model_dir, dtype, longest, rounds)
    return best


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    if args.child == "start":
        result = start_seconds(args.model_dir, args.dtype)
    else:
        result = steady(args.model_dir, args.dtype, args.gguf, args.contexts, args.steps, args.rounds)
    print("RESULT " + json.dumps(result))


def run_child(kind: str, args: argparse.Namespace, model_dir: Path, dtype: str, env: dict, gguf: Path | None = None) -> dict:
    command = [sys.executable, str(CHILD), "--child", kind, "--model-dir", str(model_dir), "--dtype", dtype,
               "--threads", str(args.threads), "--steps", str(args.steps), "--rounds", str(args.rounds),
               "--contexts", ",".join(map(str, args.contexts))] + (["--gguf", str(gguf)] if gguf else [])
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{kind} run of {model_dir.name} {dtype} failed:\n{done.stderr[-3000:]}")
    line = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def converter(work: Path) -> Path:
    """llama.cpp's convert_hf_to_gguf.py, from the llama-cpp-python sdist."""
    script = next(work.glob("*/vendor/llama.cpp/convert_hf_to_gguf.py"), None)
    if script is None:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        LLAMA_CPP, "-d", str(work)], check=True)
        with tarfile.open(next(work.glob("llama_cpp_python-*.tar.gz"))) as sdist:
            sdist.extractall(work, filter="data")
        script = next(work.glob("*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    return script


def gguf_for(model_dir: Path, dtype: str, work: Path) -> Path:
    """The model as an f32/bf16 GGUF for llama.cpp (converted once, kept next to the model)."""
    out = model_dir / f"llama-cpp-{GGUF_TYPES[dtype]}.gguf"
    if not out.exists():
        script = converter(work)
        env = {**os.environ, "PYTHONPATH": str(script.parent / "gguf-py")}
        partial = out.with_suffix(".partial")
        subprocess.run([sys.executable, str(script), str(model_dir), "--outtype", GGUF_TYPES[dtype],
                        "--outfile", str(partial)], env=env, check=True, capture_output=True)
        partial.rename(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--contexts", default="64,2048", type=lambda s: [int(c) for c in s.split(",")])
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument("--no-llama-cpp", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", choices=("start", "steady"), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--gguf", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    from lemma.models.store import resolve_model

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        for model in args.models.split(","):
            model_dir = resolve_model(model)
            for dtype in args.dtypes.split(","):
                cache = work / f"cache-{model}-{dtype}"  # an empty compile cache: a cold start
                env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
                       "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "TRITON_CACHE_DIR": str(cache / "triton")}
                cold = run_child("start", args, model_dir, dtype, env)
                warm = run_child("start", args, model_dir, dtype, env)
                gguf = None if args.no_llama_cpp else gguf_for(model_dir, dtype, work)
                speeds = run_child("steady", args, model_dir, dtype, env, gguf)
                row = {"model": model, "dtype": dtype, "cold_start_s": cold["start_s"], "cold_warm_up_s": cold["warm_up_s"],
                       "warm_start_s": warm["start_s"], "warm_warm_up_s": warm["warm_up_s"], "load_s": warm["load_s"],
                       **{key if key.endswith("_s") else f"{key}_ms": value for key, value in speeds.items()}}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        meta = {"date": str(date.today()), "machine": platform.processor() or platform.machine(),
                "cpu": cpu_name(), "threads": args.threads, "steps": args.steps, "rounds": args.rounds}
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                flags = Path("/proc/cpuinfo").read_text()
                return line.split(":", 1)[1].strip() + (" (avx512_bf16)" if "avx512_bf16" in flags else "")
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
