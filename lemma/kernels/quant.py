"""Weight-only quantized products as torch ops, `lemma::int8_linear` and `lemma::int4_linear`.

The layouts (see quant_cpu.cpp for the byte order):
    int8  weight int8 [N, K],       scales [N, K/group]             W = q * scale
    int4  weight uint8 [N, K/2],    scales, offsets [N, K/group]    W = q4 * scale + offset
scales/offsets are float16 or float32. The ops are opaque to torch.compile (one call per projection).

CPU: quant_cpu.cpp, built once with the C++ compiler inductor uses and kept under
$LEMMA_HOME/kernels/<hash>; if it cannot be built, the reference below runs instead (dequantize,
then F.linear) and `cpu_kernel_error()` says why. CUDA: the Triton kernels of quant_triton.py.
The reference is also the test oracle.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

_SOURCE = Path(__file__).with_name("quant_cpu.cpp")
_library = torch.library.Library("lemma", "FRAGMENT")
_library.define("int8_linear(Tensor x, Tensor weight, Tensor scales, int group) -> Tensor")
_library.define("int4_linear(Tensor x, Tensor weight, Tensor scales, Tensor offsets, int group) -> Tensor")
_cpu_state: dict[str, object] = {}


def dequantize_int8(weight: torch.Tensor, scales: torch.Tensor, group: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    n, k = weight.shape
    blocks = weight.view(n, k // group, group).float() * scales.float()[..., None]
    return blocks.view(n, k).to(dtype)


def int4_values(weight: torch.Tensor, group: int) -> torch.Tensor:
    """The 4-bit values [N, K] (uint8, 0..15) of a packed int4 weight."""
    n, half_k = weight.shape
    pairs = weight.view(n, 2 * half_k // group, group // 2)
    return torch.cat((pairs & 15, pairs >> 4), dim=-1).view(n, 2 * half_k)


def pack_int4(values: torch.Tensor, group: int) -> torch.Tensor:
    """Values [N, K] in 0..15 -> packed uint8 [N, K/2] (byte j of a group: value j low, j + group/2 high)."""
    n, k = values.shape
    blocks = values.to(torch.uint8).view(n, k // group, group)
    return (blocks[..., : group // 2] | (blocks[..., group // 2:] << 4)).reshape(n, k // 2).contiguous()


def dequantize_int4(weight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    n, half_k = weight.shape
    values = int4_values(weight, group).view(n, 2 * half_k // group, group).float()
    return (values * scales.float()[..., None] + offsets.float()[..., None]).view(n, 2 * half_k).to(dtype)


def reference_int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    return F.linear(x.float(), dequantize_int8(weight, scales, group)).to(x.dtype)


def reference_int4_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                    group: int) -> torch.Tensor:
    return F.linear(x.float(), dequantize_int4(weight, scales, offsets, group)).to(x.dtype)


@torch.library.register_fake("lemma::int8_linear")
def _(x, weight, scales, group):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("lemma::int4_linear")
def _(x, weight, scales, offsets, group):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _compiler_flags() -> list[str]:
    from torch.utils.cpp_extension import include_paths, library_paths

    flags = ["-O3", "-shared", "-fPIC", "-std=c++20", "-fopenmp", "-DNDEBUG", "-w"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma", "-mf16c"]
    flags += [f"-I{p}" for p in include_paths()]
    flags += [f"-L{p}" for p in library_paths()] + ["-lc10", "-ltorch_cpu"]
    flags += [f"-Wl,-rpath,{p}" for p in library_paths()]
    if torch.compiled_with_cxx11_abi() is False:
        flags.append("-D_GLIBCXX_USE_CXX11_ABI=0")
    return flags


def _compiler() -> str:
    return os.environ.get("CXX") or "g++"


def kernel_folder() -> Path:
    from lemma.models.store import store_dir

    return store_dir() / "kernels"


def build_cpu_kernel() -> Path:
    """Compile quant_cpu.cpp (once per source, torch version and flags) and return the shared library."""
    flags = _compiler_flags()
    key = hashlib.sha256(_SOURCE.read_bytes() + torch.__version__.encode() + " ".join([_compiler(), *flags]).encode())
    target = kernel_folder() / f"quant_cpu-{key.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run([_compiler(), str(_SOURCE), "-o", str(built), *flags], capture_output=True, text=True)
        if result.returncode != 0:
            lines = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()]
            raise RuntimeError(f"{_compiler()} failed on {_SOURCE.name}: {lines[0] if lines else result.returncode}")
        os.replace(built, target)  # whole or not at all: a second process may be building the same file
    for old in target.parent.glob("quant_cpu-*.so"):  # builds of earlier sources or torch versions
        if old != target:
            old.unlink(missing_ok=True)
    return target


def load_cpu_kernel() -> bool:
    """Register the C++ CPU kernels (building them if needed) or, failing that, the reference; True if C++."""
    if "loaded" in _cpu_state:
        return bool(_cpu_state["loaded"])
    try:
        torch.ops.load_library(str(build_cpu_kernel()))
        _cpu_state["loaded"] = True
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        _library.impl("int8_linear", reference_int8_linear, "CPU")
        _library.impl("int4_linear", reference_int4_linear, "CPU")
        _cpu_state.update(loaded=False, error=str(exc))
        print(f"lemma: quantized CPU kernels unavailable, using the slow reference ({exc})", file=sys.stderr)
    return bool(_cpu_state["loaded"])


def cpu_kernel_error() -> str | None:
    return _cpu_state.get("error")  # type: ignore[return-value]


_cuda_registered: list[bool] = []


def load_cuda_kernel() -> None:
    if not _cuda_registered:
        from lemma.kernels import quant_triton

        _library.impl("int8_linear", quant_triton.int8_linear, "CUDA")
        _library.impl("int4_linear", quant_triton.int4_linear, "CUDA")
        _cuda_registered.append(True)


def prepare(device: torch.device) -> None:
    """Make the ops runnable on `device` (builds the CPU kernel on first use)."""
    if device.type == "cuda":
        load_cuda_kernel()
    else:
        load_cpu_kernel()


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    return torch.ops.lemma.int8_linear(x, weight, scales, group)


def int4_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group: int) -> torch.Tensor:
    return torch.ops.lemma.int4_linear(x, weight, scales, offsets, group)
