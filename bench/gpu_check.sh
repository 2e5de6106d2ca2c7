#!/usr/bin/env bash
# One short GPU session (device tool): the GPU tests compiled for real, then the GPU benchmark.
# The device image has its own torch/triton; install lemma without dependencies. Expected on one H100,
# about 6 minutes: the tests ~3 min (most of the first H200 run's 449 s), bench/gpu_bench.py ~2.5 min
# (estimated: attention ~30 s, decode ~40 s, raas_vs_dense ~30 s, concurrency ~20 s, plus model builds;
# the real seconds per section are printed and kept in gpu.json, which is rewritten after each section,
# and `--sections`/`--shapes` rerun only some), gpu_quant and its tests under a minute.
# Run it as `timeout 580 bash bench/gpu_check.sh 2>&1 | tee $OUT/gpu_check.log`. Then, as a second call only
# if the device time left allows (~4.5 min at most, each part capped: inductor's cold compile on the
# device is the least predictable cost), `timeout 300 bash bench/gpu_check.sh fused 2>&1 | tee $OUT/gpu_fused.log`:
# Dense vs RaaS-1024 at 1K with inductor + graphs (≤ 150 s) and its CUDA test (≤ 120 s).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --no-deps -e . 2>/dev/null || export PYTHONPATH=$PWD
mkdir -p "${OUT:-bench/results}"
if [ "${1:-}" = fused ]; then
  timeout 150 python bench/gpu_bench.py --sections fused --out "${OUT:-bench/results}/gpu_fused.json" 2>&1 | tee "${OUT:-bench/results}/gpu_fused.txt" || true
  timeout 120 python -m pytest -q tests/test_compiled_step.py -k "cuda and inductor" 2>&1 | tail -3 | tee "${OUT:-bench/results}/gpu_fused_tests.txt" || true
  exit 0
fi
python -m pytest -q tests/test_kernels.py -k "not sm90 and not demo" 2>&1 | tail -5 | tee "${OUT:-bench/results}/gpu_tests.txt"
# CUDA graphs per bucket vs eager (needs transformers for the tiny test models; skipped without it)
python -m pytest -q tests/test_compiled_step.py -k "cuda and not inductor" 2>&1 | tail -5 | tee -a "${OUT:-bench/results}/gpu_tests.txt" || true
# a section that fails is recorded in gpu.json and the others go on; a crash of the whole script spares the rest here
python bench/gpu_bench.py --sections attention,decode,raas_vs_dense,concurrency --out "${OUT:-bench/results}/gpu.json" 2>&1 | tee "${OUT:-bench/results}/gpu_bench.txt" || true
# tensor parallelism over NCCL: 2 ranks, one GPU each (only when the machine has 2 GPUs)
if [ "$(python -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  LEMMA_TP_DEVICE=cuda python -m pytest -q tests/test_tensor_parallel.py -k "not more_ranks" 2>&1 | tail -5 | tee -a "${OUT:-bench/results}/gpu_tests.txt" || true
else
  echo "tensor parallelism: skipped (fewer than 2 GPUs)" | tee -a "${OUT:-bench/results}/gpu_tests.txt"
fi
# weight-only int8/int4: the Triton GEMV against bf16 F.linear, graphed, weight GB/s vs a device copy
python bench/gpu_quant.py --out "${OUT:-bench/results}/gpu_quant.json" 2>&1 | tee "${OUT:-bench/results}/gpu_quant.txt" || true
python -m pytest -q tests/test_quantized.py -k "triton" 2>&1 | tail -3 | tee -a "${OUT:-bench/results}/gpu_tests.txt" || true
