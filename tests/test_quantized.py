"""Weight-only int8/int4: the kernels against their reference, the quantizers' error, GGUF blocks repacked
exactly, quantized checkpoints, and the engine's quality on the demo model against float."""

import gguf
import numpy as np
import pytest
import torch

from ggufs import write_gguf
from lemma import Engine, LemmaError, SamplingParams
from lemma.kernels import quant
from lemma.models.gguf import convert_gguf
from lemma.models.gguf_quant import repack
from lemma.models.quantized import QuantLinear, quantize_int4, quantize_int8, quantize_model

quant.load_cpu_kernel()


@pytest.fixture(scope="module")
def demo_dir():
    from lemma.models.store import pull

    return pull("smollm2-135m-instruct", quiet=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def case(kind, rows, cols, group, scale_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    if kind == "int8":
        q, s = quantize_int8(w, group)
        return (q, s.to(scale_dtype)), w
    q, s, m = quantize_int4(w, group)
    return (q, s.to(scale_dtype), m.to(scale_dtype)), w


def run(kind, x, parts, group):
    return quant.int8_linear(x, *parts, group) if kind == "int8" else quant.int4_linear(x, *parts, group)


def reference(kind, x, parts, group):
    return (quant.reference_int8_linear if kind == "int8" else quant.reference_int4_linear)(x, *parts, group)


def test_the_cpu_kernel_is_built_not_the_fallback():
    assert quant.cpu_kernel_error() is None


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [1, 3, 4, 7, 16])
def test_decode_rows_match_the_reference_within_activation_rounding(kind, group, scale_dtype, rows):
    parts, _ = case(kind, 80, 256, group, scale_dtype)
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(1))
    out, ref = run(kind, x, parts, group), reference(kind, x, parts, group)
    assert out.shape == ref.shape == (rows, 80)
    assert rel(out, ref) < 0.01  # int8 activations per block of 32 (measured 0.3-0.5%)
    assert rel(out, ref) > 0  # the direct path really quantizes x: this is not the reference


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_rows_equal_the_reference(kind, dtype):
    parts, _ = case(kind, 300, 128, 32, torch.float16)  # 300 rows of W: two tiles
    x = torch.randn(2, 17, 128).to(dtype)
    out, ref = run(kind, x, parts, 32), reference(kind, x, parts, 32)
    assert out.dtype == dtype and out.shape == (2, 17, 300)
    assert rel(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("kind,bound", [("int8", 0.01), ("int4", 0.12)])
def test_quantizers_keep_the_weight_within_their_step(kind, bound):
    parts, w = case(kind, 64, 128, 32, torch.float16)
    layer = QuantLinear(*parts, None, None) if kind == "int8" else QuantLinear(*parts, None)
    back = layer.dequantized()
    step = parts[1].float().repeat_interleave(32, dim=1)
    assert ((back - w).abs() <= step / 2 + 1e-3 * w.abs().max()).all()
    assert rel(back, w) < bound


def test_bad_quantized_shapes_are_one_clear_line():
    with pytest.raises(LemmaError, match="q_proj: quantized weight"):
        QuantLinear(torch.zeros(4, 64, dtype=torch.int8), torch.zeros(5, 2, dtype=torch.float16), None, None, "q_proj")
    with pytest.raises(LemmaError, match="group 16 is not supported"):
        QuantLinear(torch.zeros(4, 64, dtype=torch.int8), torch.zeros(4, 4, dtype=torch.float16), None, None)
    with pytest.raises(LemmaError, match="quantize must be one of int8, int4, got 'int3'"):
        Engine("unused", quantize="int3")


def random_blocks(qtype: gguf.GGMLQuantizationType, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random bytes in `qtype`'s blocks, with finite fp16 scales: any such bytes are a valid tensor."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = np.random.default_rng(seed).integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    scales = {"Q8_0": 1, "Q4_0": 1, "Q5_0": 1, "Q4_1": 2, "Q4_K": 2}[qtype.name]
    halves = np.random.default_rng(seed + 1).uniform(-0.01, 0.01, size=(rows, cols // block, scales)).astype(np.float16)
    data[..., : 2 * scales] = halves.view(np.uint8)
    return data.reshape(rows, -1)


@pytest.mark.parametrize("name", ["Q8_0", "Q5_0", "Q4_0", "Q4_1", "Q4_K"])
def test_gguf_blocks_repack_exactly(name):
    qtype = gguf.GGMLQuantizationType[name]
    rows, cols = 6, 512
    data = random_blocks(qtype, rows, cols)
    expected = gguf.quants.dequantize(data, qtype).reshape(rows, cols)
    parts = repack(name, data, rows, cols)
    layer = QuantLinear(parts["qweight"], parts["scales"], parts.get("offsets"), None)
    assert layer.kind == ("int8" if name in ("Q8_0", "Q5_0") else "int4") and layer.group == 32
    np.testing.assert_allclose(layer.dequantized().numpy(), expected, rtol=0, atol=1e-6 * np.abs(expected).max())


def test_other_gguf_types_are_not_kept():
    assert repack("Q6_K", np.zeros((1, 210), np.uint8), 1, 256) is None


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_a_gguf_kept_quantized_runs_as_its_dequantized_import(kind, tiny_models, tmp_path):
    src = tiny_models[kind]
    gguf_file = write_gguf(src, tmp_path / "m.gguf", quant=gguf.GGMLQuantizationType.Q4_0)
    floats = convert_gguf(gguf_file, tmp_path / "float")
    kept = convert_gguf(gguf_file, tmp_path / "kept", keep_quantized=True)
    from safetensors.torch import load_file

    names = load_file(kept / "model.safetensors")
    assert "model.layers.0.self_attn.q_proj.qweight" in names and "model.layers.0.self_attn.q_proj.weight" not in names
    ids = list(range(4, 40))  # 36 tokens: the prefill path, which multiplies dequantized tiles exactly
    ours = Engine(kept, kv_cache_tokens=256).logits(ids)
    theirs = Engine(floats, kv_cache_tokens=256).logits(ids)
    assert rel(ours, theirs) < 1e-5
    engine = Engine(kept, kv_cache_tokens=256)
    assert engine.model.model.layers[0].mlp.gate_up_proj.kind == "int4"
    if engine.config.tie_word_embeddings:  # the head runs on the embedding's blocks, the lookup stays float
        assert engine.model.tied_head.kind == "int4" and engine.model.model.embed_tokens.weight.is_floating_point()


def test_a_quantized_checkpoint_cannot_be_sharded(tiny_models, tmp_path):
    gguf_file = write_gguf(tiny_models["qwen2"], tmp_path / "m.gguf", quant=gguf.GGMLQuantizationType.Q8_0)
    kept = convert_gguf(gguf_file, tmp_path / "kept", keep_quantized=True)
    with pytest.raises(LemmaError, match="tensor_parallel=2"):
        Engine(kept, quantize="int8", tensor_parallel=2)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantize_replaces_every_projection_and_the_head(mode, tiny_models):
    engine = Engine(tiny_models["llama"], kv_cache_tokens=256, quantize=mode)
    layers = [m for m in engine.model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 4 * engine.config.num_layers + 1  # qkv, o, gate+up, down fused per layer; the head
    assert {m.kind for m in layers if m is not engine.model.tied_head and m is not engine.model.lm_head} == {mode}
    head = engine.model.lm_head if engine.model.lm_head is not None else engine.model.tied_head
    assert head.kind == "int8"
    assert not any(isinstance(m, torch.nn.Linear) for m in engine.model.modules())


# Measured on the demo SmolLM2 (2026-12-07, AMD EPYC AVX2) over the first 256 tokens of the trace below,
# teacher-forced 16 tokens per step (the decode kernels): NLL per token float 1.802, int8 -0.014;
# top-1 agreement with float 98.4% (int4: -0.006, 98.8%). bench/quant_quality.py has the 6-trace numbers.
INT8_NLL_BOUND, INT8_AGREEMENT = 0.04, 0.95


def trace_pair(engine: Engine, tokens: int = 256) -> tuple[list[int], list[int]]:
    from conftest import SHARED_DATA
    from lemma.evaluation.traces import load_traces, trace_tokens

    trace = load_traces(SHARED_DATA / "reasoning_traces" / "deepseek_r1_gsm8k.jsonl", 1)[0]
    return trace_tokens(engine, trace, tokens)


def test_int8_stays_close_to_float_on_a_real_trace(demo_dir):
    floats = Engine(demo_dir, kv_cache_tokens=1024)
    prompt, tokens = trace_pair(floats)
    reference = floats.teacher_force([prompt], [tokens])[0]
    # 16 tokens per step: every product runs the decode kernels (int8 activations), not prefill's exact tiles
    quantized = Engine(demo_dir, kv_cache_tokens=1024, quantize="int8", prefill_chunk=16).teacher_force([prompt], [tokens])[0]
    nll = lambda f: -sum(f.logprobs) / len(f.logprobs)  # noqa: E731
    agreement = np.mean([a == b for a, b in zip(reference.predicted, quantized.predicted)])
    assert abs(nll(quantized) - nll(reference)) < INT8_NLL_BOUND
    assert agreement > INT8_AGREEMENT


def test_compiled_quantized_decode_equals_eager(demo_dir):
    params = SamplingParams(temperature=0, max_tokens=12)
    prompt = [[{"role": "user", "content": "What is 17*23?"}]]
    eager = Engine(demo_dir, quantize="int4", compile=False, max_batch=1).generate(prompt, params)[0].token_ids
    compiled = Engine(demo_dir, quantize="int4", compile=True, max_batch=1).generate(prompt, params)[0].token_ids
    assert compiled == eager


def test_cli_quantize_flag_and_info(tiny_dir):
    from typer.testing import CliRunner

    from lemma.cli import app

    runner = CliRunner()
    out = runner.invoke(app, ["info", "--model", str(tiny_dir), "--quantize", "int4"])
    assert out.exit_code == 0, out.output
    assert "8 int4, 1 int8" in out.output and "read per decode step" in out.output
    bad = runner.invoke(app, ["run", "hi", "--model", str(tiny_dir), "--quantize", "q4"])
    assert bad.exit_code == 1 and "quantize must be one of int8, int4, got 'q4'" in bad.output
    assert "Traceback" not in bad.output


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_triton_gemv_matches_the_reference_under_the_interpreter(kind, dtype, rows):
    """The CUDA path's kernels, run by Triton's interpreter on CPU (tests/compile_sm90.py compiles them
    for sm_90); 72 rows of W and 320 inputs leave partial tiles in both directions."""
    from lemma.kernels import quant_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"  # on a GPU: the compiled kernels themselves
    parts, _ = case(kind, 72, 320, 32, torch.float16)
    x = torch.randn(rows, 320, generator=torch.Generator().manual_seed(2)).to(dtype)
    fn = quant_triton.int8_linear if kind == "int8" else quant_triton.int4_linear
    out = fn(x.to(device), *(p.to(device) for p in parts), 32).cpu()
    ref = reference(kind, x, parts, 32)
    assert out.dtype == dtype and out.shape == ref.shape
    assert rel(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)
