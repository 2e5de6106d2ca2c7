"""Our forward pass against transformers' on random-init tiny configs (fp32)."""

import json
import shutil

import pytest
import torch
import transformers

from conftest import TINY_CONFIGS
from lemma import Engine


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def hf_models(tiny_models):
    return {k: transformers.AutoModelForCausalLM.from_pretrained(p).eval() for k, p in tiny_models.items()}


@pytest.mark.parametrize("kind", list(TINY_CONFIGS))
def test_logits_match_transformers(kind, tiny_models, hf_models):
    # prefill_chunk=16 makes a 70-token prompt take 5 chunks, so chunked prefill over pages is exercised.
    engine = Engine(tiny_models[kind], kv_cache_tokens=512, prefill_chunk=16)
    ids = torch.randint(0, engine.config.vocab_size, (70,), generator=torch.Generator().manual_seed(1))
    ours = engine.logits(ids.tolist())
    with torch.no_grad():
        theirs = hf_models[kind](ids[None]).logits[0].float()
    assert ours.shape == theirs.shape
    assert rel_err(ours, theirs) < 1e-4
    assert engine.pages.all_free


def test_transformers_4x_config_and_sharded_checkpoint(tiny_models, hf_models, tmp_path):
    """config.json in the 4.x form (rope_theta, rope_scaling, torch_dtype) and weights split over shards."""
    src = tiny_models["llama"]
    out = tmp_path / "llama4x"
    hf_models["llama"].save_pretrained(out, max_shard_size="20KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, out / name)
    assert (out / "model.safetensors.index.json").exists()
    config = json.loads((out / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope
    config["torch_dtype"] = config.pop("dtype", "float32")
    (out / "config.json").write_text(json.dumps(config))

    ids = list(range(3, 40))
    a = Engine(src, kv_cache_tokens=256).logits(ids)
    b = Engine(out, kv_cache_tokens=256).logits(ids)
    assert torch.equal(a, b)


def test_bf16_runs_close_to_fp32(tiny_dir):
    ids = list(range(5, 45))
    full = Engine(tiny_dir, kv_cache_tokens=256).logits(ids)
    half = Engine(tiny_dir, kv_cache_tokens=256, dtype="bfloat16").logits(ids)
    assert half.dtype == torch.float32  # logits always come back in fp32
    assert rel_err(half, full) < 5e-2
