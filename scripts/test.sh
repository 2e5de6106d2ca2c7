#!/usr/bin/env bash
# The test suite, CPU only. Triton kernels run in the interpreter (set before triton is imported).
set -euo pipefail
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=1 OMP_NUM_THREADS=1
exec python -m pytest -q "$@"
