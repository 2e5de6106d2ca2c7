"""The fidelity measurement's noise floor: Dense against itself when the same traces are replayed in
other batch compositions. In bf16 the attention's padding to the batch's widest page table changes
fp32 rounding, which flips bf16 activations and so some log-probs and argmaxes; a policy's NLL
increase or top-1 agreement closer to Dense than this is noise.

    OMP_NUM_THREADS=1 python -m bench.noise_floor --model qwen2.5-coder-0.5b-instruct --dtype bfloat16
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lemma import Engine, make_policy
from lemma.engine.sequence import Forced
from lemma.evaluation.traces import evenly_spaced, load_traces, trace_tokens
from lemma.models.store import resolve_model

TRACES = Path(__file__).resolve().parents[2] / "shared/data/reasoning_traces/deepseek_r1_gsm8k.jsonl"


def compare(reference: list[Forced], other: list[Forced]) -> str:
    pairs = [(a, b) for f, g in zip(reference, other) for a, b in zip(f.logprobs, g.logprobs)]
    same_top = [x == y for f, g in zip(reference, other) for x, y in zip(f.predicted, g.predicted)]
    nll = sum(a - b for a, b in pairs) / len(pairs)
    spread = sum(abs(a - b) for a, b in pairs) / len(pairs)
    return (f"NLL difference per token {nll:+.5f}, mean |log-prob difference| {spread:.5f}, "
            f"top-1 agreement {sum(same_top) / len(same_top):.4f} ({len(pairs)} tokens)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--traces", type=Path, default=TRACES)
    parser.add_argument("--count", type=int, default=16, help="traces, spread evenly over the file")
    parser.add_argument("--tokens", type=int, default=512, help="trace tokens per trace")
    parser.add_argument("--batch", type=int, default=16, help="the reference replays this many together")
    args = parser.parse_args()
    engine = Engine(resolve_model(args.model), kv_cache_tokens=args.batch * (args.tokens + 512), dtype=args.dtype,
                    max_batch=args.batch, policy=make_policy("dense"))
    pairs = [trace_tokens(engine, t, args.tokens) for t in evenly_spaced(load_traces(args.traces), args.count)]

    def replay(size: int) -> list[Forced]:
        return [f for at in range(0, len(pairs), size)
                for f in engine.teacher_force([p for p, _ in pairs[at : at + size]], [t for _, t in pairs[at : at + size]])]

    reference = replay(args.batch)
    print(f"{engine.model_dir.name} ({args.dtype}), Dense, {args.count} traces x {args.tokens} tokens, "
          f"{args.batch} together as the reference")
    for size in sorted({max(1, args.batch // 4), 1}, reverse=True):
        print(f"  {size} together: {compare(reference, replay(size))}")


if __name__ == "__main__":
    main()
