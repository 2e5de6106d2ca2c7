"""Compile every lemma Triton kernel for sm_90 (H100/H200) on a machine without a GPU.
Run by tests/test_kernels.py in a process where TRITON_INTERPRET is unset.

Pointers (and the strides a real launch has as multiples of 16) carry Triton's divisibility-by-16 hint,
as a launch on torch tensors does, so this compiles the variant that runs (vectorized, pipelined
loads). `--resources` also prints each kernel's registers, spill stack and shared memory from the
cubin (cuobjdump ships with Triton) and sweeps the attention tile size."""

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from lemma.kernels import attention, quant_triton, scores, store

PAGE = 16
ATTENTION_ALIGNED = ("stride_qb", "stride_qh", "stride_kp", "stride_kh", "stride_kt", "stride_vp", "stride_vh",
                     "stride_vt")


def signature(fn: JITFunction, pointers: dict[str, str], floats: tuple[str, ...] = ()) -> dict[str, str]:
    return {name: pointers.get(name) or ("fp32" if name in floats else "constexpr" if name.isupper() else "i32")
            for name in fn.arg_names}


def resources(compiled) -> str:
    """Registers, spill stack and shared memory of a compiled kernel, from its cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        Path(cubin.name).write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", cubin.name], capture_output=True,
                               text=True).stdout
    found = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", usage))
    return f"{found.get('REG', '?')} registers, {found.get('STACK', '?')} B stack, {compiled.metadata.shared} B shared"


def compile_sm90(kernel, pointers: dict[str, str], constexprs: dict, floats: tuple[str, ...] = (),
                 aligned: tuple[str, ...] = (), report: bool = False) -> None:
    fn = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)
    hinted = [i for i, name in enumerate(fn.arg_names) if name in pointers or name in aligned]
    src = ASTSource(fn=fn, signature=signature(fn, pointers, floats), constexprs=constexprs,
                    attrs={(i,): [["tt.divisibility", 16]] for i in hinted})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32))
    assert "sm_90" in compiled.asm["ptx"], "no sm_90 PTX"
    if report:
        shown = {k: v for k, v in constexprs.items() if k not in ("HEAD_DIM", "BLOCK_D", "BLOCK_G", "PAGE")}
        print(f"{fn.__name__} {pointers.get('k_ptr') or pointers.get('out_ptr') or ''} {shown}: {resources(compiled)}")


def main(report: bool = False) -> None:
    count = 0
    for dtype in ("bf16", "fp16", "fp32"):
        cache = f"*{dtype}"
        for group, dim in ((1, 64), (7, 128)):
            pointers = {"q_ptr": cache, "k_ptr": cache, "v_ptr": cache, "ids_ptr": "*i64", "fill_ptr": "*i64",
                        "listed_ptr": "*i64", "acc_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32", "lse_ptr": "*fp32"}
            variants = [(False, False), (True, False)] + ([(False, True), (True, True)] if dtype == "bf16" else [])
            for mass, listed in variants:  # (with mass, bounded by listed): the engine's decode lists in bf16
                for per_block in sorted({attention.PAGES_PER_BLOCK} | ({1, 2, 8} if report and group > 1 else set())):
                    constexprs = dict(GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=dim,
                                      BLOCK_D=dim, PAGE=PAGE, PAGES_PER_BLOCK=per_block, UPCAST=False,
                                      WITH_MASS=mass, IEEE=dtype == "fp32", HAS_LISTED=listed)
                    compile_sm90(attention._decode_attention_kernel, pointers, constexprs, floats=("scale",),
                                 aligned=ATTENTION_ALIGNED, report=report)
                    count += per_block == attention.PAGES_PER_BLOCK
        pointers = {"acc_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32", "out_ptr": cache, "log_total_ptr": "*fp32",
                    "listed_ptr": "*i64"}
        for listed in (False, True) if dtype == "bf16" else (False,):
            compile_sm90(attention._combine_kernel, pointers,
                         dict(GROUP=7, BLOCK_G=16, HEAD_DIM=128, BLOCK_D=128, CHUNK_D=attention.COMBINE_CHUNK_D,
                              SPLITS=attention.COMBINE_SPLITS, PAGES_PER_BLOCK=attention.PAGES_PER_BLOCK,
                              HAS_LISTED=listed), report=report)
            count += 1
        pointers = {"k_ptr": cache, "v_ptr": cache, "kc_ptr": cache, "vc_ptr": cache, "ids_ptr": "*i64",
                    "off_ptr": "*i64", "kmax_ptr": "*fp32", "kmin_ptr": "*fp32", "fill_ptr": "*i32"}
        for bounds in (False, True):
            compile_sm90(store._store_decode_kernel, pointers, dict(HEAD_DIM=128, BLOCK_D=128, UPDATE_BOUNDS=bounds),
                         report=report)
            count += 1
    pointers = {"q_ptr": "*bf16", "kmax_ptr": "*fp32", "kmin_ptr": "*fp32", "ids_ptr": "*i64", "out_ptr": "*fp32"}
    compile_sm90(scores._page_scores_kernel, pointers, dict(GROUP=7, BLOCK_G=8, HEAD_DIM=128, BLOCK_D=128,
                                                            BLOCK_S=scores.BLOCK_S), report=report)
    count += 1
    pointers = {"lse_ptr": "*fp32", "log_total_ptr": "*fp32", "mass_ptr": "*fp32", "listed_ptr": "*i64"}
    for listed in (False, True):
        compile_sm90(attention._mass_kernel, pointers,
                     dict(GROUP=7, BLOCK_G=16, BLOCK_S=attention.MASS_BLOCK_S, HAS_LISTED=listed), report=report)
        count += 1
    for dtype in ("bf16", "fp16"):
        for scales in ("fp16", "fp32"):
            base = {"x_ptr": f"*{dtype}", "s_ptr": f"*{scales}", "out_ptr": f"*{dtype}"}
            compile_sm90(quant_triton._int8_gemv_kernel, {**base, "w_ptr": "*i8"},
                         dict(GROUP=32, BLOCK_N=quant_triton.BLOCK_N, BLOCK_K=quant_triton.BLOCK_K), report=report)
            compile_sm90(quant_triton._int4_gemv_kernel, {**base, "w_ptr": "*u8", "o_ptr": f"*{scales}"},
                         dict(GROUP=32, BLOCK_N=quant_triton.BLOCK_N, BLOCK_B=quant_triton.BLOCK_K // 2), report=report)
            count += 2
    print(f"compiled {count} kernels for sm_90")


if __name__ == "__main__":
    main(report="--resources" in sys.argv[1:])
