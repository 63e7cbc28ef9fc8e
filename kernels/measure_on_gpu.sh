#!/usr/bin/env bash
# Every GPU number the book is waiting for, in one run on a CUDA machine (a few minutes on an H100):
#   1. check every kernel against its PyTorch reference on the GPU (stops at the first mismatch);
#   2. time all of them against their baselines and write kernels/results/<gpu name>.json, which
#      book/compression/quantization_activations.md and book/inference/attention_kernels.md plot;
#   3. re-run those two chapters, so their GPU tables and figures are drawn from the new file.
# Commit the JSON (it records the device, driver-visible name, torch/triton versions and the date).
# Targets from the issues: W4A16 decode at batch 1 on 11008×4096 >= 2.5× fp16 F.linear and >= 60% of HBM
# bandwidth; W8A8 >= 1.5× fp16 cuBLAS at 4096³; paged decode within 1.25× of contiguous SDPA; Flash-Decoding
# faster than SDPA at batch 1 with >= 16k cached tokens.
set -euo pipefail
cd "$(dirname "$0")/.."
python - <<'PY' || { echo "no CUDA GPU visible: nothing to measure here" >&2; exit 1; }
import torch, sys
sys.exit(0 if torch.cuda.is_available() else 1)
PY
name=$(python -c "import re, torch; print(re.sub(r'[^A-Za-z0-9]+', '-', torch.cuda.get_device_name()).strip('-').lower())")
mkdir -p kernels/results
python -m effref.kernels.bench --check
python -m effref.kernels.bench --out "kernels/results/${name}.json"
python -m pytest -q book/compression/quantization_activations.md book/inference/attention_kernels.md
echo "wrote kernels/results/${name}.json"
