#!/usr/bin/env bash
# Create .venv with the pinned CPU torch first (an unpinned torch would pull a multi-GB CUDA build),
# then lemma with its test extra. -qq: pip's warnings (the "Location ... ignored" lines of this machine's
# package index) and build notices stay quiet; errors still print.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -qq --upgrade pip
python -m pip install -qq torch==2.13.0
python -m pip install -qq -e ".[test]"
