"""GPU benchmark of the Triton kernels and the engine (issue 39), for one short H100/H200 session; `--smoke`
runs every code path on CPU with toy shapes (TRITON_INTERPRET=1) to check the script itself.

    python bench/gpu_bench.py --out bench/results/gpu.json                       # on the GPU machine
    python bench/gpu_bench.py --sections decode,concurrency --shapes qwen2.5-7b   # a rerun of some parts
    TRITON_INTERPRET=1 OMP_NUM_THREADS=1 python bench/gpu_bench.py --smoke --out /tmp/gpu_smoke.json

Random-init models of Qwen2.5-1.5B and 7B shape in bf16. Sections (--sections, default all, in this order;
estimated H100 device seconds for both shapes, cold Triton cache; the real ones are printed and kept
in the JSON's section_seconds):

1. attention (~30 s): paged decode attention, Triton vs SDPA (and flash-attn where installed) over the
   same K/V, batch 1 and 32 at 4K/16K/32K: device time per call (CUDA events over a graph of many calls),
   KV GB/s, Triton's speed relative to SDPA (targets >= 1 at batch 1, >= 0.9 at 32), tile sweep at 16K,
   and 1K held in a 32K-wide table with vs without the per-row `listed` bound (bench/gpu_attention.py).
2. decode (~40 s): start-up (warm_up capturing every bucket), graphed Dense decode at batch 1/8/32 after
   a 512-token prompt: tokens/s and (weight + KV) GB/s as a percent of the copy measured here, engine
   wall and device time per step; greedy tokens vs the eager step (bench/gpu_decode.py).
3. raas_vs_dense (~30 s): Dense vs RaaS-1024 (pin_prompt=False) at batch 1 with graphs after 1K/8K/16K/32K
   prompts: ms/step, resident KV, ratios (targets: RaaS faster from 8K, <= 1.1x Dense at 1K), and the
   shortest context again on a pool just big enough (what a wide Dense step table still costs).
4. concurrency (~20 s, Qwen2.5-1.5B shape only: the 7B would about double it): long outputs (1024 + 15360
   tokens) under a pool that holds 4 whole Dense sequences, 64 requests offered, 256 steps timed: running
   sequences and output tokens/s for RaaS-1024, Dense capped at what fits whole, and Dense with the
   engine's on-demand admission (bench/gpu_concurrency.py).
5. fused (~60-90 s, Qwen2.5-1.5B shape only; `bench/gpu_check.sh fused` runs it as a second, optional
   call, since inductor's cold compile is the least predictable cost): Dense vs RaaS-1024 at 1K with compile="inductor" (layers fused, then captured), against the
   graphs-only ratio of section 3 (bench/gpu_decode.py `fused`).

The JSON (--out) is rewritten after every section and shape, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import traceback
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch
import triton

import gpu_attention  # the gpu_* modules sit beside this script (run as `python bench/gpu_bench.py`)
import gpu_concurrency
import gpu_decode
from gpu_common import SHAPES, free_memory, random_model
from lemma import RaaS
from lemma.models.llama import CausalLM
from lemma.evaluation import speed

SECTIONS = ("attention", "decode", "raas_vs_dense", "concurrency", "fused")
ONE_SHAPE_SECTIONS = {"concurrency", "fused"}  # the 1.5B shape only, unless --shapes says otherwise
GPU = dict(shapes=["qwen2.5-1.5b", "qwen2.5-7b"], attention_batches=[1, 32], attention_contexts=[4096, 16384, 32768],
           sweep_context=16384, repeats=10, decode_batches=[1, 8, 32], decode_prompt=512, decode_steps=64,
           long_contexts=[1024, 8192, 16384, 32768], long_steps=32, budget=1024, one_shape=["qwen2.5-1.5b"],
           long_outputs=gpu_concurrency.LongOutputs(prompt=1024, output=15360, requests=64, dense_fits=4, window=256))
SMOKE = dict(shapes=["smoke"], attention_batches=[1, 4], attention_contexts=[128, 256], sweep_context=256, repeats=2,
             decode_batches=[1, 2, 4], decode_prompt=64, decode_steps=8, long_contexts=[64, 128, 256], long_steps=8,
             budget=64, one_shape=["smoke"],
             long_outputs=gpu_concurrency.LongOutputs(prompt=64, output=192, requests=12, dense_fits=2, window=24))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="Toy shapes on CPU, to check the script itself.")
    parser.add_argument("--out", default="bench/results/gpu.json")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    parser.add_argument("--shapes", default=None, help="comma list of model shapes for every section (default: both "
                        "Qwen2.5 shapes, the concurrency run on the 1.5B only)")
    args = parser.parse_args()
    args.sections = [s for s in args.sections.split(",") if s]
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.shapes is not None:
        args.shapes = [s for s in args.shapes.split(",") if s]
        if not set(args.shapes) <= set(SHAPES):
            parser.error(f"unknown shape(s) in {args.shapes}; choose from {', '.join(SHAPES)}")
    return args


def run_section(section: str, shape: str, plan: dict, model: Callable[[str], CausalLM], device: torch.device,
                dtype: torch.dtype, copy: float, raas: RaaS) -> dict | list:
    if section == "attention":
        return gpu_attention.run([shape], plan["attention_batches"], plan["attention_contexts"], plan["sweep_context"],
                                 device, dtype, plan["repeats"], plan["budget"])[shape]
    if section == "decode":
        value = gpu_decode.decode(model(shape), plan["decode_batches"], plan["decode_prompt"], plan["decode_steps"], copy, raas)
        gpu_decode.print_decode(shape, value)
    elif section == "raas_vs_dense":
        value = gpu_decode.raas_vs_dense(model(shape), plan["long_contexts"], plan["long_steps"], raas)
        gpu_decode.print_raas_vs_dense(shape, value, raas)
    elif section == "fused":
        value = gpu_decode.fused(model(shape), min(plan["long_contexts"]), plan["long_steps"], raas)
        gpu_decode.print_fused(shape, value, raas)
    else:
        value = gpu_concurrency.run(model(shape), plan["long_outputs"], raas)
        gpu_concurrency.print_run(shape, value)
    return value


def main() -> None:
    args = parse_args()
    plan = SMOKE if args.smoke else GPU
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    shapes = args.shapes or plan["shapes"]
    raas = RaaS(budget=plan["budget"], pin_prompt=False)
    copy = speed.copy_bandwidth(device, mib=16 if args.smoke else 1024)
    report = {"date": date.today().isoformat(), "smoke": args.smoke, "torch": torch.__version__, "triton": triton.__version__,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
              "clock": "cuda events" if device.type == "cuda" else "wall (cpu smoke: the numbers mean nothing)",
              "copy_gb_per_s": copy / 1e9, "sections": args.sections, "section_seconds": {}, "model_build_seconds": {}}
    print(f"device {report['device']}, copy bandwidth {copy / 1e9:.0f} GB/s", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    models: dict = {}
    started = time.perf_counter()

    def model(shape: str) -> CausalLM:
        if shape not in models:  # built once, on first use (its seconds count in that section's too)
            began = time.perf_counter()
            models[shape] = random_model(shape, device, dtype)
            report["model_build_seconds"][shape] = round(time.perf_counter() - began, 1)
        return models[shape]

    def record(section: str, shape: str, began: float, value: dict) -> None:
        report.setdefault(section, {})[shape] = value
        report["section_seconds"][f"{section}/{shape}"] = round(time.perf_counter() - began, 1)
        report["total_seconds"] = round(time.perf_counter() - started, 1)
        out.write_text(json.dumps(report, indent=2))
        print(f"-- {section} {shape}: {report['section_seconds'][f'{section}/{shape}']} s "
              f"({report['total_seconds']} s so far)", flush=True)

    for section in [s for s in SECTIONS if s in args.sections]:
        for shape in plan["one_shape"] if section in ONE_SHAPE_SECTIONS and not args.shapes else shapes:
            began = time.perf_counter()
            try:
                value = run_section(section, shape, plan, model, device, dtype, copy, raas)
            except Exception as exc:  # one device session: a failed part must not cost the others
                if args.smoke:
                    raise
                traceback.print_exc()
                value = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
                free_memory()
            record(section, shape, began, value)
    print(f"wrote {out} ({report.get('total_seconds', 0)} s)")


if __name__ == "__main__":
    main()
