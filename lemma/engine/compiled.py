"""The compiled decode step: one compiled decoder layer, reused by every layer, cached on disk.

What is compiled is `call_layer` (one decoder layer and its `DecodeLayer` attention), not the whole
step: every layer's weights and its slice of the pool and tables are inputs of the same graph, not
constants, so a (policy, dense-or-sparse layer) costs one layer's compile instead of L. Batch 1 gets
its own graph; dynamo makes the batch dimension dynamic when the second bucket arrives, so one more
graph serves every larger bucket. The slot dimension of the page tables is dynamic on CPU
(`maybe_mark_dynamic`): one graph serves every context length, and attention reads only the pages
held. The final norm and output head are a second, small compiled graph (`call_head`); the embedding
and the RoPE tables stay eager. On CUDA the tables are instead as wide as the policy can ever need
(ModelRunner.table_width) and the whole step is captured as one CUDA graph per batch bucket (engine/graphs.py).

Inductor keeps what it compiled (FX graph and AOTAutograd caches) under $LEMMA_HOME/compile/torch-<version>,
so a second process only pays dynamo's trace of one layer per graph.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from lemma.errors import LemmaError
from lemma.models.llama import call_head, call_layer

COMPILE_CHOICES = ("inductor", "eager", "aot_eager")


def cache_folder() -> Path:
    """Where compiled kernels are kept: $LEMMA_HOME/compile/torch-<version> (see models/store.py)."""
    from lemma.models.store import store_dir

    return store_dir() / "compile" / f"torch-{torch.__version__}"


def use_disk_cache() -> Path:
    """Point inductor's (and Triton's) caches at lemma's folder unless the user chose others. Inductor
    writes its default into the environment once asked, so a default value counts as not chosen."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    folder = cache_folder()
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, os.path.abspath(default_cache_dir())):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "inductor")
    os.environ.setdefault("TRITON_CACHE_DIR", str(folder / "triton"))
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def cpu_options(backend: str, device: torch.device) -> dict | None:
    """Inductor on CPU: a C++ wrapper (no Python between kernels), and every value read more than once
    (a normed hidden state feeding a row-by-weight reduction, models/linear.py) computed once into a
    buffer instead of again for every output row (in the compiled SmolLM2 bf16 layer its MLP kernel went
    from 428 to 295 us, BENCHMARKS.md "Compile once")."""
    if backend != "inductor" or device.type != "cpu":
        return None
    return {"cpp_wrapper": True, "realize_reads_threshold": 1}


def compile_decode(backend: str, device: torch.device) -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
    """Twins of `call_layer` and `call_head` compiled with `backend`, fullgraph (no graph breaks allowed)."""
    if backend not in COMPILE_CHOICES:
        raise LemmaError(f"compile backend must be one of {', '.join(COMPILE_CHOICES)}, got {backend!r}")
    import torch._dynamo.config as dynamo_config

    use_disk_cache()
    # graphs are per (policy, layer kind, batch 1 or more): far more than the default limit of 8 may be
    # alive in a server that meets many per-request policies (older torch calls the limit cache_size_limit)
    limit = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    setattr(dynamo_config, limit, max(getattr(dynamo_config, limit), 256))
    if hasattr(dynamo_config, "accumulated_recompile_limit"):
        dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 4096)
    options = cpu_options(backend, device)
    compiled = torch.compile(call_layer, backend=backend, fullgraph=True, options=options)
    head = torch.compile(call_head, backend=backend, fullgraph=True, options=options)
    dynamic_slots = device.type == "cpu"

    def run_layer(layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend) -> torch.Tensor:
        parts = getattr(attend, "parts", None)  # a mixed step's slices (engine/attention.py SlicedLayer)
        for part in parts or (attend,):
            if dynamic_slots:
                torch._dynamo.maybe_mark_dynamic(part.tables, 1)
        if parts:  # every slice has 2 rows or more: a dynamic batch from the mix's first compile
            for rows in (x, cos, sin, *(t for part in parts for t in part.row_inputs())):
                torch._dynamo.maybe_mark_dynamic(rows, 0)
        return compiled(layer, x, cos, sin, attend)

    return run_layer, head


class CompileCounter:
    """Counts the graphs dynamo compiles while it is open (what the tests count)."""

    def __enter__(self) -> "CompileCounter":
        from torch._dynamo.utils import counters

        self._counters = counters
        self._start = counters["stats"]["unique_graphs"]
        return self

    @property
    def graphs(self) -> int:
        return self._counters["stats"]["unique_graphs"] - self._start

    def __exit__(self, *exc) -> None:
        return None
