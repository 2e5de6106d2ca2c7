"""Packed linears (models/linear.py): the same numbers as nn.Linear, eager and compiled."""

import pytest
import torch
from torch import nn

from lemma import Engine
from lemma.models.linear import PackedLinear, pack_linears, packed_bytes, packs

pytestmark = pytest.mark.skipif(not packs(torch.device("cpu"), torch.bfloat16), reason="torch built without oneDNN")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 48), (5, 48), (2, 3, 48)])
def test_packed_linear_matches_nn_linear(shape, bias):
    torch.manual_seed(0)
    plain = nn.Linear(48, 40, bias=bias).to(torch.bfloat16)
    packed = PackedLinear(plain.weight, plain.bias)
    x = torch.randn(shape, dtype=torch.bfloat16)
    exact = torch.nn.functional.linear(x.float(), plain.weight.float(), None if plain.bias is None else plain.bias.float())
    out = packed(x)
    assert out.shape == (*shape[:-1], 40) and out.dtype == torch.bfloat16
    assert rel_err(out, exact) < 1e-2
    assert rel_err(out, exact) <= 2 * rel_err(plain(x), exact) + 1e-3  # no worse than the plain bf16 matmul


def test_packed_linear_compiles_without_graph_break():
    torch.manual_seed(1)
    plain = nn.Linear(32, 24).to(torch.bfloat16)
    packed = PackedLinear(plain.weight, plain.bias)
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    compiled = torch.compile(lambda t: torch.relu(packed(t)) * 2, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), torch.relu(packed(x)) * 2)


def test_bf16_engine_packs_every_linear_and_keeps_its_logits(tiny_dir):
    ids = list(range(5, 45))
    engine = Engine(tiny_dir, kv_cache_tokens=256, dtype="bfloat16")
    model = engine.model
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert (model.lm_head is None) == (model.tied_head is not None)
    assert packed_bytes(model) > 0
    unpacked = Engine(tiny_dir, kv_cache_tokens=256, dtype="float32")
    assert any(isinstance(m, nn.Linear) for m in unpacked.model.modules())  # fp32 stays plain
    assert rel_err(engine.logits(ids), unpacked.logits(ids)) < 5e-2
    assert pack_linears(model) == 0  # packing twice finds nothing left to pack


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3])
def test_compiled_single_row_product_is_a_reduction_with_linears_numbers(dtype, rows):
    """Under torch.compile a one-row product is a multiply and a sum (inductor streams the weight
    itself, models/linear.py); more rows stay a matmul. Either way the numbers are nn.Linear's."""
    from torch._dynamo.testing import EagerAndRecordGraphs

    from lemma.models.linear import Linear

    torch.manual_seed(2)
    layer = Linear(64, 40, bias=True).to(dtype)
    x = torch.randn(rows, 64, dtype=dtype)
    recorder = EagerAndRecordGraphs()
    torch._dynamo.reset()
    out = torch.compile(layer, backend=recorder, fullgraph=True)(x)
    ops = {str(node.target) for graph in recorder.graphs for node in graph.graph.nodes}
    assert any("linear" in op for op in ops) == (rows > 1), ops
    exact = torch.nn.functional.linear(x.float(), layer.weight.float(), layer.bias.float())
    assert out.dtype == dtype and rel_err(out, exact) < (1e-6 if dtype == torch.float32 else 1e-2)
    assert rel_err(out, exact) <= 2 * rel_err(layer(x), exact) + 1e-6
