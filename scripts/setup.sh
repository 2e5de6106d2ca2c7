#!/usr/bin/env bash
# Create .venv with the pinned CPU torch first (an unpinned torch would pull a multi-GB CUDA build),
# then lemma with its test extra.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
