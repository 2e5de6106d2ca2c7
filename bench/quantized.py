"""Quantized weights (issue 36): compiled lemma decode in float32, int8 and int4 against llama.cpp's Q8_0,
Q4_0 and Q4_1 of the same model, side by side in one process (CPU), short and 2K prompts; lemma also at
batch 16. Each number is the best of `rounds` turns; weight GB/s is the bytes one decode step reads
(`lemma info`) over the step time, set beside the copy bandwidth measured in the same run.

    pip install -e ".[bench]"   # llama-cpp-python (sdist build ~15 min) and sentencepiece for the converter
    OMP_NUM_THREADS=2 python bench/quantized.py --out bench/results/quantized.json

The llama.cpp files: an f32 GGUF converted from the lemma folder (bench/compile_once.py), quantized once by
llama.cpp's own llama_model_quantize and kept next to the model as llama-cpp-<type>.gguf.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import tempfile
from datetime import date
from pathlib import Path

from compile_once import cpu_name, gguf_for, lemma_ms_per_token, llama_cpp_ms_per_token

LLAMA_TYPES = {"q8_0": 7, "q4_0": 2, "q4_1": 3}  # llama_cpp.LLAMA_FTYPE_MOSTLY_*
MODES = {"float32": None, "int8": "int8", "int4": "int4"}


def quantized_gguf(model_dir: Path, kind: str, work: Path) -> Path:
    import llama_cpp

    out = model_dir / f"llama-cpp-{kind}.gguf"
    if not out.exists():
        source = gguf_for(model_dir, "float32", work)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = LLAMA_TYPES[kind]
        params.nthread = 2
        partial = out.with_suffix(".partial")
        if llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params)) != 0:
            raise SystemExit(f"llama_model_quantize to {kind} failed")
        partial.rename(out)
    return out


def batch_ms_per_step(engine, prompt: list[int], batch: int, steps: int) -> float:
    from lemma import SamplingParams

    outs = engine.generate([prompt] * batch, SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True))
    return 1000 * max(o.stats.decode_seconds for o in outs) / (steps - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--contexts", default="64,2048", type=lambda s: [int(c) for c in s.split(",")])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import torch
    from llama_cpp import Llama

    from lemma import Engine
    from lemma.evaluation.speed import copy_bandwidth, long_prompt, weight_bytes_per_step
    from lemma.models.store import resolve_model

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for model in args.models.split(","):
            model_dir = resolve_model(model)
            tokens = max(args.contexts) + args.steps + 64
            engines = {mode: Engine(model_dir, dtype="float32", device="cpu", max_batch=args.batch, compile=True,
                                    kv_cache_tokens=args.batch * (64 + args.steps + 16) + tokens, quantize=q)
                       for mode, q in MODES.items()}
            llms = {kind: Llama(str(quantized_gguf(model_dir, kind, Path(scratch))), n_ctx=tokens, n_batch=512,
                                n_threads=torch.get_num_threads(), verbose=False) for kind in LLAMA_TYPES}
            prompts = {c: long_prompt(engines["float32"], c) for c in args.contexts}
            best: dict[str, float] = {}

            def keep(key: str, ms: float) -> None:
                best[key] = min(best.get(key, ms), ms)

            for _ in range(args.rounds):
                for context, prompt in prompts.items():
                    for mode, engine in engines.items():
                        keep(f"{mode}@{context}", lemma_ms_per_token(engine, prompt, args.steps))
                    for kind, llm in llms.items():
                        keep(f"llama.cpp {kind}@{context}", llama_cpp_ms_per_token(llm, prompt, args.steps))
                for mode, engine in engines.items():
                    keep(f"{mode} batch {args.batch}@{min(args.contexts)}",
                         batch_ms_per_step(engine, prompts[min(args.contexts)], args.batch, args.steps))
            copy = copy_bandwidth(torch.device("cpu"))
            weights = {mode: weight_bytes_per_step(e) for mode, e in engines.items()}
            row = {"model": model, "copy_GBps": copy / 1e9, "weight_MiB": {m: b / 2**20 for m, b in weights.items()},
                   "ms": best, "weight_GBps": {k: weights[k.split(" ")[0].split("@")[0]] / (v / 1000) / 1e9
                                               for k, v in best.items() if not k.startswith("llama.cpp")}}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del engines, llms
    if args.out:
        meta = {"date": str(date.today()), "machine": platform.processor() or platform.machine(), "cpu": cpu_name(),
                "threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or None, "steps": args.steps, "rounds": args.rounds}
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
