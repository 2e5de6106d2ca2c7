"""GPU benchmark sections on the engine's own decode step (CUDA graphs: compile=True, one graph per batch
bucket; on CPU --smoke runs the compiled step with compile="eager" instead):

- `decode`: start-up (Engine.warm_up capturing every batch bucket: the first engine of a shape, which
  also pays the Triton JIT; a second one, capture only; then RaaS-1024 and the Dense+RaaS mix on top),
  graphed decode tokens/s at each batch, and the bandwidth it achieves: (weights + every sequence's K/V)
  read per step / step time, as a percent of the device copy measured in the same run. Two step times:
  the engine's (wall, its host bookkeeping between replays included) and the device's (CUDA events
  around the graph replays of the same steps). Greedy tokens are checked against the eager step.
- `raas_vs_dense`: Dense and RaaS-1024 (pin_prompt=False) at batch 1 over long prompts: step time (wall
  and device), resident KV and their ratios. One pool sized for the longest context, so the step tables
  (on CUDA as wide as the policy can hold: RaaS's budget, Dense's pool pages capped by the model's
  context) are what a server's would be; `narrow_tables` repeats the shortest context on a pool just big
  enough, to show what a wide Dense table still costs now that the kernel walks only the listed pages.
- `fused`: the same comparison at one context with `compile="inductor"` (the layers fused by inductor,
  then captured): RaaS's bookkeeping is ~2x Dense's kernel count per layer (bench/step_overhead.py
  --modes ops), which a graph replays one launch at a time and inductor fuses; plus each policy's
  compile seconds.
"""

from __future__ import annotations

import torch

from gpu_common import free_memory, mean, random_prompts, replay_times, toy_tokenizer
from lemma import Dense, Engine, RaaS, SamplingParams
from lemma.engine.policies import Policy
from lemma.engine.runner import bucket_sizes
from lemma.evaluation import speed
from lemma.models.llama import CausalLM

DECODE_PREFILL_CHUNK = 4096  # a batch's prompts prefill in a few steps, so most steps decode every row
LONG_PREFILL_CHUNK = 2048


def graphs_mode(device: torch.device) -> bool | str:
    return True if device.type == "cuda" else "eager"


def bandwidth(engine: Engine, policy: Policy, context: int, batch: int, ms: float | None, copy: float,
              prefix: str) -> dict:
    """Tokens/s and achieved GB/s (and % of copy) of a step of `batch` rows taking `ms`."""
    if ms is None:
        return {}
    read = speed.bytes_read_per_step(engine, policy, context, batch)
    return {f"{prefix}ms_per_step": ms, f"{prefix}tok_s": 1000 * batch / ms,
            f"{prefix}gb_per_s": read / ms / 1e6, f"{prefix}percent_of_copy": 100 * read / ms * 1e3 / copy}


def decode(model: CausalLM, batches: list[int], prompt_len: int, steps: int, copy: float, raas: RaaS) -> dict:
    device, vocab = model.model.embed_tokens.weight.device, model.config.vocab_size
    mode = graphs_mode(device)
    most = max(batches)
    engine = Engine.from_model(model, toy_tokenizer(), kv_cache_tokens=most * (prompt_len + steps + 64), max_batch=most,
                               prefill_chunk=DECODE_PREFILL_CHUNK, compile=mode, warm_up=False)
    startup = {"dense_all_buckets_first_s": engine.warm_up()}  # with the JIT of kernels not compiled in this process yet
    again = Engine.from_model(model, toy_tokenizer(), kv_cache_tokens=2048, max_batch=most, compile=mode, warm_up=False)
    startup["dense_all_buckets_again_s"] = again.warm_up()
    startup[f"{raas.describe()}_and_mix_s"] = again.warm_up(policies=[Dense(), raas])  # Dense's are replayed
    startup["buckets"] = bucket_sizes(again.max_batch)
    del again
    rows = []
    for batch in batches:
        prompts = random_prompts(batch, prompt_len, vocab, seed=batch)
        with replay_times(engine, batch) as device_ms:
            ms = speed.decode_step_ms(engine, Dense(), prompts, steps)
        context = prompt_len + steps // 2
        row = {"batch": batch, "context": context,
               "bytes_read_per_step": speed.bytes_read_per_step(engine, Dense(), context, batch),
               **bandwidth(engine, Dense(), context, batch, ms, copy, ""),
               **bandwidth(engine, Dense(), context, batch, mean(device_ms), copy, "device_")}
        rows.append(row)
    eager = Engine.from_model(model, toy_tokenizer(), kv_cache_tokens=2048, max_batch=2, compile=False)
    prompts = random_prompts(2, 64, vocab, seed=7)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    same = [[o.token_ids for o in e.generate(prompts, params)] for e in (engine, eager)]
    del eager, engine
    free_memory()
    return {"startup": startup, "rows": rows, "same_tokens_as_eager": same[0] == same[1]}


def print_decode(shape: str, entry: dict) -> None:
    s = entry["startup"]
    print(f"{shape} start-up, warm_up of buckets {s['buckets']}: first engine {s['dense_all_buckets_first_s']:.1f} s "
          f"(with the JIT of kernels not compiled yet), again {s['dense_all_buckets_again_s']:.1f} s, then "
          + ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in s.items() if k.endswith("_and_mix_s")), flush=True)
    for row in entry["rows"]:
        device = ""
        if "device_ms_per_step" in row:
            device = (f"; device {row['device_ms_per_step']:.2f} ms = {row['device_tok_s']:.0f} tok/s, "
                      f"{row['device_gb_per_s']:.0f} GB/s = {row['device_percent_of_copy']:.0f}% of copy")
        print(f"{shape} graphed decode batch {row['batch']} @{row['context']}: {row['ms_per_step']:.2f} ms/step = "
              f"{row['tok_s']:.0f} tok/s, {row['gb_per_s']:.0f} GB/s = {row['percent_of_copy']:.0f}% of copy{device}",
              flush=True)
    print(f"{shape} graphed greedy tokens equal eager: {entry['same_tokens_as_eager']}", flush=True)


def policy_rows(engine: Engine, prompt: list[int], steps: int, policies: list[Policy]) -> dict:
    """Per policy: wall and device ms per step, resident KV, bytes read and GB/s, at batch 1."""
    out = {}
    for policy in policies:
        with replay_times(engine, 1) as device_ms:
            row = speed.bench_policy(engine, policy, prompt, steps)
        if "error" in row:
            raise RuntimeError(f"{policy.describe()} at {len(prompt)}: {row['error']}")
        out[policy.describe()] = {"ms_per_step": row["ms_per_token"], "device_ms_per_step": mean(device_ms),
                                  "resident_kv_mib": row["resident_kv_mib"], "bytes_read_per_step": row["bytes_read_per_step"],
                                  "gb_per_s": row["achieved_gb_per_s"]}
    return out


def ratios(row: dict, dense: str, raas: str) -> None:
    a, b = row[raas], row[dense]
    row["raas_over_dense_ms"] = a["ms_per_step"] / b["ms_per_step"]
    if a["device_ms_per_step"] is not None and b["device_ms_per_step"] is not None:
        row["raas_over_dense_device_ms"] = a["device_ms_per_step"] / b["device_ms_per_step"]
    row["raas_over_dense_kv"] = a["resident_kv_mib"] / b["resident_kv_mib"]
    # the targets: RaaS faster than Dense from 8K, at most 1.1x Dense's step at 1K
    row["target_ms_ratio"] = "< 1" if row["context"] >= 8192 else "<= 1.1" if row["context"] <= 1024 else None


def raas_vs_dense(model: CausalLM, contexts: list[int], steps: int, raas: RaaS) -> dict:
    mode, vocab = graphs_mode(model.model.embed_tokens.weight.device), model.config.vocab_size
    policies, dense, name = [Dense(), raas], Dense().describe(), raas.describe()

    def engine_for(tokens: int) -> Engine:
        return Engine.from_model(model, toy_tokenizer(), kv_cache_tokens=tokens + steps + 64, max_batch=1,
                                 prefill_chunk=LONG_PREFILL_CHUNK, compile=mode, warm_up=False)

    def table_slots(engine: Engine) -> dict[str, int]:  # what each policy's steps read (CUDA: its table_width)
        return {p.describe(): engine.runner.state_for(p).tables.shape[-1] for p in policies}

    engine = engine_for(max(contexts))
    rows = []
    for context in contexts:
        row = {"context": context, "table_slots": table_slots(engine),
               **policy_rows(engine, random_prompts(1, context, vocab, seed=context)[0], steps, policies)}
        ratios(row, dense, name)
        rows.append(row)
    del engine
    free_memory()
    narrow = engine_for(min(contexts))
    row = {"context": min(contexts), "table_slots": table_slots(narrow),
           **policy_rows(narrow, random_prompts(1, min(contexts), vocab, seed=1)[0], steps, policies)}
    ratios(row, dense, name)
    del narrow
    free_memory()
    return {"rows": rows, "narrow_tables": row}


def fused(model: CausalLM, context: int, steps: int, raas: RaaS) -> dict:
    """Dense vs `raas` at batch 1 after `context` tokens, the step compiled with inductor and captured."""
    device, vocab = model.model.embed_tokens.weight.device, model.config.vocab_size
    mode = "inductor" if device.type == "cuda" else "aot_eager"  # the CPU smoke checks the path, not inductor
    engine = Engine.from_model(model, toy_tokenizer(), kv_cache_tokens=context + steps + 64, max_batch=1,
                               prefill_chunk=LONG_PREFILL_CHUNK, compile=mode, warm_up=False)
    compile_s = {p.describe(): engine.warm_up(policies=[p]) for p in (Dense(), raas)}
    row = {"context": context, "compile": mode, "compile_s": compile_s,
           **policy_rows(engine, random_prompts(1, context, vocab, seed=context)[0], steps, [Dense(), raas])}
    ratios(row, Dense().describe(), raas.describe())
    del engine
    free_memory()
    return row


def print_fused(shape: str, row: dict, raas: RaaS) -> None:
    dense, name = Dense().describe(), raas.describe()
    a, b = row[name], row[dense]
    device = ""
    if "raas_over_dense_device_ms" in row:
        device = (f"; device {b['device_ms_per_step']:.2f} vs {a['device_ms_per_step']:.2f} ms "
                  f"({row['raas_over_dense_device_ms']:.2f}x)")
    print(f"{shape} raas vs dense, {row['compile']} + graphs @{row['context']}: {dense} {b['ms_per_step']:.2f} ms/step, "
          f"{name} {a['ms_per_step']:.2f} ms/step ({row['raas_over_dense_ms']:.2f}x, target {row['target_ms_ratio']})"
          f"{device}; compile " + ", ".join(f"{k} {v:.0f} s" for k, v in row["compile_s"].items()), flush=True)


def print_raas_vs_dense(shape: str, entry: dict, raas: RaaS) -> None:
    dense, name = Dense().describe(), raas.describe()

    def line(row: dict, label: str) -> str:
        a, b = row[name], row[dense]
        device = ""
        if "raas_over_dense_device_ms" in row:
            device = (f"; device {b['device_ms_per_step']:.2f} vs {a['device_ms_per_step']:.2f} ms "
                      f"({row['raas_over_dense_device_ms']:.2f}x)")
        target = f", target {row['target_ms_ratio']}" if row["target_ms_ratio"] else ""
        slots = f"{row['table_slots'][dense]}/{row['table_slots'][name]} table slots"
        return (f"{shape} {label} @{row['context']} ({slots}): {dense} "
                f"{b['ms_per_step']:.2f} ms/step, {b['resident_kv_mib']:.1f} MiB KV; {name} {a['ms_per_step']:.2f} ms/step "
                f"({row['raas_over_dense_ms']:.2f}x{target}), "
                f"{a['resident_kv_mib']:.1f} MiB KV ({row['raas_over_dense_kv']:.3f}x){device}")

    for row in entry["rows"]:
        print(line(row, "raas vs dense"), flush=True)
    print(line(entry["narrow_tables"], "raas vs dense, pool just big enough"), flush=True)
