#!/usr/bin/env bash
# README command 1: create .venv, install effref with its extras, fetch the offline model and corpus, and build
# the book with every chapter executed. Safe to run again: each step skips what is already done.
# Installs go through requirements-lock.txt (pip constraints): the exact versions CI passed with.
#   EFFREF_LATEST=1       the newest releases instead of the lock (torch stays as installed); refresh the lock from
#                         such an install once its tests pass: bash .ci/write-lock
#   EFFREF_BUILD_BOOK=0   skip the book build (CI builds it after the tests, from nbval's executed chapters)
#   EFFREF_TORCH          torch requirement used when no torch is installed (default: the lock's, a CPU wheel here)
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install --quiet --upgrade pip

LOCK=requirements-lock.txt
locked_torch=$(sed -n 's/^torch==//p' "$LOCK")
# Torch first: anything that depends on torch (accelerate, transformers) would otherwise pull a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || python -m pip install --quiet "${EFFREF_TORCH:-torch==$locked_torch}"
torch_now=$(python -c "import torch; print(torch.__version__.split('+')[0])")

constraints=.venv/effref-constraints.txt
upgrade=()
if [ "${EFFREF_LATEST:-0}" = 1 ]; then
  echo "EFFREF_LATEST=1: installing the newest releases, not $LOCK (torch stays $torch_now)"
  echo "torch==$torch_now" > "$constraints"
  upgrade=(--upgrade --upgrade-strategy eager)
elif [ "$torch_now" = "$locked_torch" ]; then
  cp "$LOCK" "$constraints"
else  # a torch of its own (a CUDA build): keep it and the triton it pins, lock everything else
  echo "keeping the installed torch $torch_now (the lock was tested with $locked_torch) and its triton"
  { grep -v -E '^(torch|triton)==' "$LOCK"; echo "torch==$torch_now"; } > "$constraints"
fi
DS_BUILD_OPS=0 python -m pip install --quiet --constraint "$constraints" "${upgrade[@]}" -e ".[triton,assets,book,test,frameworks]"

python -m effref.assets fetch

if [ "${EFFREF_BUILD_BOOK:-1}" != 0 ]; then
  EFFREF_PROGRESS=0 jupyter-book build . --warningiserror --keep-going  # no progress bars in stored outputs
  echo "book: _build/html/index.html"
fi
