"""Quality of weight-only quantization: teacher-forced NLL per token and greedy (top-1) agreement against the
float model, on the shared reasoning traces, for each mode, both demo models (CPU).

Modes: float32 (the reference), bfloat16, int8 and int4 (quantized at load from the float import), and
"gguf" (the import with --keep-quantized: the GGUF's own Q4_1 / Q5_0+Q4_K+Q8_0 layers run as stored).
A replay's chunks are prefill rows, which multiply dequantized weights exactly; the "-decode" modes replay
16 tokens per step, so every product runs the decode kernels (int8 activations per block of 32).
The demo models' float weights are themselves dequantized GGUFs (SmolLM2 Q4_1, Qwen Q5_0/Q4_K/Q6_K/Q8_0),
so int4 here requantizes 4-5-bit weights.

    OMP_NUM_THREADS=2 python bench/quant_quality.py --traces 8 --tokens 512 --out bench/results/quant_quality.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from datetime import date
from pathlib import Path

import numpy as np

TRACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "reasoning_traces" / "deepseek_r1_gsm8k.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--traces", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--modes", default="float32,bfloat16,int8,int8-decode,int4,int4-decode,gguf,gguf-decode")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from lemma import Engine
    from lemma.evaluation.traces import evenly_spaced, load_traces, trace_tokens
    from lemma.models.gguf import convert_gguf
    from lemma.models.store import SOURCE_GGUF, pull

    rows = []
    for name in args.models.split(","):
        folder = pull(name, keep_gguf=True, quiet=True)
        with tempfile.TemporaryDirectory() as scratch:
            kept = convert_gguf(folder / SOURCE_GGUF, Path(scratch) / "kept", keep_quantized=True)
            modes = {"float32": (folder, "float32", None), "bfloat16": (folder, "bfloat16", None),
                     "int8": (folder, "float32", "int8"), "int4": (folder, "float32", "int4"),
                     "gguf": (kept, "float32", None)}
            reference = None
            for mode in ["float32"] + [m for m in args.modes.split(",") if m != "float32"]:
                model_dir, dtype, quantize = modes[mode.removesuffix("-decode")]
                engine = Engine(model_dir, dtype=dtype, quantize=quantize, kv_cache_tokens=16 * (args.tokens + 1024),
                                max_batch=args.traces, prefill_chunk=16 if mode.endswith("-decode") else 512)
                traces = evenly_spaced(load_traces(TRACES), args.traces)
                pairs = [trace_tokens(engine, t, args.tokens) for t in traces]
                forced = engine.teacher_force([p for p, _ in pairs], [t for _, t in pairs])
                logprobs = np.concatenate([f.logprobs for f in forced])
                predicted = np.concatenate([f.predicted for f in forced])
                if reference is None:
                    reference = (logprobs, predicted)
                row = {"model": name, "mode": mode, "tokens": int(len(logprobs)), "nll": float(-logprobs.mean()),
                       "nll_increase": float(reference[0].mean() - logprobs.mean()),
                       "agreement": float((predicted == reference[1]).mean())}
                rows.append(row)
                print(json.dumps(row), flush=True)
                del engine
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": {"date": str(date.today()), "traces": args.traces,
                                                       "tokens": args.tokens, "file": TRACES.name}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
