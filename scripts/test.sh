#!/usr/bin/env bash
# The test suite, CPU only (sets up .venv first if needed; pulls the demo model on first use).
# Triton kernels run in the interpreter, which must be chosen before triton is imported.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
export TRITON_INTERPRET=1 OMP_NUM_THREADS=1
exec .venv/bin/python -m pytest -q "$@"
