"""bf16 on CPU: plain nn.Linear vs oneDNN-packed linears (models/linear.py), side by side in one run:
eager decode ms/step at batch 1 and 16, short and 2K context, and the prefill of a 2K prompt (with
transformers' prefill of the same prompt last).

    OMP_NUM_THREADS=2 python bench/packed_linear.py --out bench/results/packed_linear.json
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import date

import torch

import lemma.models.llama as llama_module
from compiled_speed import prefill_seconds  # bench/ is the script folder, first on sys.path
from lemma import Dense, Engine, SamplingParams
from lemma.evaluation import speed
from lemma.models.store import resolve_model


def measure(folder, packed: bool, steps: int) -> dict:
    packs = llama_module.packs
    llama_module.packs = packs if packed else (lambda device, dtype: False)
    try:
        engine = Engine(folder, dtype="bfloat16", device="cpu", kv_cache_tokens=16 * 400 + 2300, max_batch=16)
    finally:
        llama_module.packs = packs
    row = {}
    for batch, context in ((1, 100), (1, 2000), (16, 100)):
        prompt = speed.long_prompt(engine, context)
        prompts = [prompt[b:] + prompt[:b] for b in range(batch)]
        row[f"decode_ms_b{batch}_ctx{context}"] = round(speed.decode_step_ms(engine, Dense(), prompts, steps), 2)
    prompt = speed.long_prompt(engine, 2000)
    engine.generate([prompt], SamplingParams(max_tokens=1))  # warm-up
    row["prefill_s_2000"] = round(min(engine.generate([prompt], SamplingParams(max_tokens=1))[0].stats.prefill_seconds
                                      for _ in range(2)), 3)
    return row


def transformers_prefill(folder, context: int) -> float:
    """Seconds for transformers (bf16) to prefill the same prompt (compiled_speed's measure); run last,
    since importing transformers once slowed lemma's compiled step in the same process."""
    engine = Engine(folder, dtype="bfloat16", device="cpu", kv_cache_tokens=context + 64, max_batch=1)
    return round(prefill_seconds(engine, context)[1], 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    folder = resolve_model(args.model)
    rows = {"plain": measure(folder, False, args.steps), "packed": measure(folder, True, args.steps)}
    rows["transformers"] = {"prefill_s_2000": transformers_prefill(folder, 2000)}
    result = {"date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "model": args.model, "rows": rows,
              "plain_over_packed": {k: round(rows["plain"][k] / rows["packed"][k], 2) for k in rows["plain"]},
              "transformers_over_packed_prefill": round(rows["transformers"]["prefill_s_2000"]
                                                        / rows["packed"]["prefill_s_2000"], 2)}
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
