#!/usr/bin/env bash
# README command 1: create .venv, install effref with its extras, fetch the offline model and corpus, and build
# the book with every chapter executed. Safe to run again: each step skips what is already done.
#   EFFREF_BUILD_BOOK=0   skip the book build (CI builds it after the tests, from nbval's executed chapters)
#   EFFREF_TORCH          torch requirement used when no torch is installed (default torch==2.13.0: a CPU wheel here)
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install --quiet --upgrade pip

# Torch first: anything that depends on torch (accelerate, transformers) would otherwise pull a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || python -m pip install --quiet "${EFFREF_TORCH:-torch==2.13.0}"
python -m pip install --quiet -e ".[triton,book,test]"

python -m effref.assets fetch

if [ "${EFFREF_BUILD_BOOK:-1}" != 0 ]; then
  jupyter-book build . --warningiserror --keep-going
  echo "book: _build/html/index.html"
fi
