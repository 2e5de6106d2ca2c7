"""GPU check for the Triton kernels and the engine (issue: kernels). Finishes in a few minutes on one
H100/H200; `--smoke` runs the same code paths on CPU with toy shapes.

    python bench/gpu_bench.py --out bench/results/gpu.json            # on the GPU machine
    TRITON_INTERPRET=1 python bench/gpu_bench.py --smoke               # anywhere, checks the script

Measures, on random-init models of Qwen2.5-1.5B and 7B shape in bf16:
1. paged decode attention (Triton, Dense page table) vs torch SDPA over the same dense cache at 4K/16K/32K:
   eager wall time per call (host launch cost included) and device time per call (20 calls captured in
   one CUDA graph and replayed), with the KV bandwidth that device time achieves;
2. decode tokens/s at batch 1 and 32, eager vs CUDA graphs (compile=True: one graph per bucket);
3. achieved bandwidth ((weight + KV bytes read) / step time) against a measured device-to-device copy;
4. KV memory held by Dense vs RaaS-1024 with 16K tokens of context, and their step time there, eager
   and with CUDA graphs.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from lemma import Dense, Engine, RaaS, SamplingParams
from lemma.evaluation import speed
from lemma.kernels import attention as triton_attention
from lemma.kernels import reference
from lemma.models.config import ModelConfig
from lemma.models.llama import CausalLM
from lemma.models.tokenizer import Tokenizer

SHAPES = {
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "smoke": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
}


def random_model(shape: str, device: torch.device, dtype: torch.dtype) -> CausalLM:
    config = ModelConfig.from_dict({"model_type": "qwen2", "rope_theta": 1e6, "max_position_embeddings": 40000, **SHAPES[shape]})
    with torch.device(device):
        model = CausalLM(config).to(dtype)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return model.eval().requires_grad_(False)


def toy_tokenizer() -> Tokenizer:
    from tokenizers import Tokenizer as HF
    from tokenizers import models

    folder = Path(tempfile.mkdtemp())
    HF(models.WordLevel({"<unk>": 0, "x": 1}, unk_token="<unk>")).save(str(folder / "tokenizer.json"))
    return Tokenizer(folder)


def timed(fn, device: torch.device, repeats: int = 20) -> float:
    """Median seconds of fn()."""
    fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return sorted(samples)[len(samples) // 2]


def graphed_seconds(fn, calls: int = 20, replays: int = 5) -> float:
    """Device seconds per fn() call: `calls` calls captured in one CUDA graph, replayed, timed with events
    (no host launch cost; repeated calls over a cache that fits in L2 read it from there)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (Triton compiles, allocator settles) off the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / (replays * calls)


def kernel_vs_sdpa(config: ModelConfig, context: int, device: torch.device, dtype: torch.dtype) -> dict:
    pages = -(-context // 16)
    hkv, hq, d = config.num_kv_heads, config.num_heads, config.head_dim
    k_cache = torch.randn(pages, hkv, 16, d, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(1, hq, d, device=device, dtype=dtype)
    ids = torch.arange(pages, device=device)[None, None, :].expand(1, hkv, -1).contiguous()
    fill = torch.full_like(ids, 16)
    scale = d ** -0.5
    ours = timed(lambda: triton_attention.paged_decode_attention(q, k_cache, v_cache, ids, fill, scale), device)
    k_dense = k_cache.permute(1, 0, 2, 3).reshape(1, hkv, pages * 16, d)
    v_dense = v_cache.permute(1, 0, 2, 3).reshape(1, hkv, pages * 16, d)
    theirs = timed(lambda: torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None, :], k_dense, v_dense, scale=scale, enable_gqa=True), device)
    out = triton_attention.paged_decode_attention(q, k_cache, v_cache, ids, fill, scale)
    ref = reference.paged_decode_attention(q, k_cache, v_cache, ids, fill, scale)
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    row = {"context": context, "triton_us": 1e6 * ours, "sdpa_us": 1e6 * theirs, "rel_err_vs_twin": err}
    if device.type == "cuda":
        kv_bytes = 2 * k_cache.numel() * k_cache.element_size()
        ours = graphed_seconds(lambda: triton_attention.paged_decode_attention(q, k_cache, v_cache, ids, fill, scale))
        theirs = graphed_seconds(lambda: torch.nn.functional.scaled_dot_product_attention(
            q[:, :, None, :], k_dense, v_dense, scale=scale, enable_gqa=True))
        row.update(triton_device_us=1e6 * ours, sdpa_device_us=1e6 * theirs,
                   triton_kv_gb_per_s=kv_bytes / ours / 1e9, sdpa_kv_gb_per_s=kv_bytes / theirs / 1e9)
        row["triton_device_us_by_pages_per_block"] = {  # the tile-size knob (default PAGES_PER_BLOCK)
            per_block: 1e6 * graphed_seconds(lambda per_block=per_block: triton_attention.paged_decode_attention(
                q, k_cache, v_cache, ids, fill, scale, pages_per_block=per_block)) for per_block in (1, 2, 4, 8)}
    return row


def graphs_vs_eager(model: CausalLM, batches: list[int], context: int, steps: int) -> list[dict]:
    """Decode tokens/s of the eager step and of the compiled one (CUDA graphs on GPU), side by side,
    with greedy tokens compared."""
    rows = []
    kv = max(batches) * (context + steps + 64)
    graphs = True if next(model.parameters()).is_cuda else "eager"  # --smoke on CPU: only the code path
    engines = {mode: Engine.from_model(model, toy_tokenizer(), kv_cache_tokens=kv, max_batch=max(batches),
                                       compile=mode == "graphs" and graphs) for mode in ("eager", "graphs")}
    for policy in (Dense(), RaaS(budget=512, pin_prompt=False)):
        for batch in batches:
            prompts = [[1 + (i * 7 + b) % 100 for i in range(context)] for b in range(batch)]
            row = {"policy": policy.describe(), "batch": batch, "context": context}
            for mode, engine in engines.items():
                ms = speed.decode_step_ms(engine, policy, prompts, steps)
                row[f"{mode}_tok_s"] = 1000 * batch / ms
            row["graphs_over_eager"] = row["graphs_tok_s"] / row["eager_tok_s"]
            params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
            same = [[o.token_ids for o in e.generate(prompts[:2], params)] for e in engines.values()]
            row["same_tokens"] = same[0] == same[1]
            print(f"{policy.describe()} batch {batch}: eager {row['eager_tok_s']:.0f} tok/s, graphs "
                  f"{row['graphs_tok_s']:.0f} tok/s ({row['graphs_over_eager']:.2f}x), same tokens {row['same_tokens']}")
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="Toy shapes on CPU, to check the script itself.")
    parser.add_argument("--out", default="bench/results/gpu.json")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    shapes = ["smoke"] if args.smoke else ["qwen2.5-1.5b", "qwen2.5-7b"]
    contexts = [256, 512] if args.smoke else [4096, 16384, 32768]
    long_context, decode_steps = (512, 8) if args.smoke else (16384, 128)
    copy = speed.copy_bandwidth(device, mib=16 if args.smoke else 1024)
    report = {"date": date.today().isoformat(), "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
              "torch": torch.__version__, "copy_gb_per_s": copy / 1e9, "models": {}}
    print(f"device {report['device']}, copy bandwidth {copy / 1e9:.0f} GB/s")
    for shape in shapes:
        model = random_model(shape, device, dtype)
        entry = {"attention": [kernel_vs_sdpa(model.config, c, device, dtype) for c in contexts]}
        for row in entry["attention"]:
            print(f"{shape} attention @{row['context']}: eager call triton {row['triton_us']:.0f} us, sdpa "
                  f"{row['sdpa_us']:.0f} us, rel err {row['rel_err_vs_twin']:.1e}")
            if "triton_device_us" in row:
                print(f"{shape} attention @{row['context']}: device time triton {row['triton_device_us']:.1f} us "
                      f"({row['triton_kv_gb_per_s']:.0f} GB/s of KV), sdpa {row['sdpa_device_us']:.1f} us "
                      f"({row['sdpa_kv_gb_per_s']:.0f} GB/s); triton by pages per block: "
                      + ", ".join(f"{k}: {v:.1f} us" for k, v in row["triton_device_us_by_pages_per_block"].items()))
        engine = Engine.from_model(model, toy_tokenizer(), kv_cache_tokens=long_context + 2 * decode_steps + 64,
                                   attention="triton", compile=False)
        prompt = [1] * 64
        for policy in (Dense(),):
            row = speed.bench_policy(engine, policy, prompt, decode_steps)
            row["percent_of_copy_bandwidth"] = 100 * row["achieved_gb_per_s"] * 1e9 / copy
            entry["decode_batch1_eager"] = row
            print(f"{shape} decode batch 1 (eager): {1000 / row['ms_per_token']:.1f} tok/s, "
                  f"{row['achieved_gb_per_s']:.0f} GB/s = {row['percent_of_copy_bandwidth']:.0f}% of copy")
        entry["graphs_vs_eager"] = graphs_vs_eager(model, [1, 4 if args.smoke else 32], 512 if args.smoke else 1024,
                                                   decode_steps)
        long_prompt = [1] * long_context
        memory = {}
        graphed = Engine.from_model(model, toy_tokenizer(), kv_cache_tokens=long_context + 2 * decode_steps + 64,
                                    attention="triton", compile=device.type == "cuda" or "eager")
        for policy in (Dense(), RaaS(budget=1024, pin_prompt=False)):
            row = speed.bench_policy(engine, policy, long_prompt, 8)
            graphs_ms = speed.decode_step_ms(graphed, policy, [long_prompt], 8)
            memory[policy.describe()] = {"resident_kv_mib": row["resident_kv_mib"], "ms_per_token": row["ms_per_token"],
                                         "graphs_ms_per_token": graphs_ms}
            print(f"{shape} {policy.describe()} with {long_context} tokens of context: resident KV "
                  f"{row['resident_kv_mib']:.0f} MiB, {row['ms_per_token']:.2f} ms/token eager, "
                  f"{graphs_ms:.2f} ms/token with graphs")
        del graphed
        entry["memory_at_long_context"] = memory
        report["models"][shape] = entry
        del engine, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
