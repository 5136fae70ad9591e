#!/usr/bin/env bash
# Device checks on a machine with a CUDA GPU (under 5 minutes; not part of CI, .ci/run never calls it):
#   1. the tests marked `cuda` (device placement that a CPU machine cannot tell from the CPU path);
#   2. one `senslora allocate` and a short `senslora train`, in bfloat16 on CUDA, each printing its
#      wall time and peak GPU memory.
#   bash scripts/setup.sh && bash scripts/gpu-check.sh      # PYTHON=... to use another interpreter
# Exits 2 with one line when there is no CUDA device.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if [ ! -x "$PY" ] && ! command -v "$PY" >/dev/null 2>&1; then
  echo "gpu-check: $PY not found; run scripts/setup.sh first" >&2
  exit 2
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu-check: no CUDA device (torch.cuda.is_available() is False); run this on a machine with a GPU" >&2
  exit 2
fi
"$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'gpu-check: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}')"

OUT=$(mktemp -d "${TMPDIR:-/tmp}/senslora-gpu-check.XXXXXX")
trap 'rm -rf "$OUT"' EXIT

echo "gpu-check: tests marked cuda"
start=$SECONDS
timeout 120 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py
echo "gpu-check: cuda tests took $((SECONDS - start)) s"

# One CLI command in this process, then its wall time and the peak GPU memory torch saw.
senslora() {
  timeout 150 "$PY" - "$@" <<'PY'
import sys
import time

import torch

from senslora.cli.main import main

start = time.perf_counter()
code = main(sys.argv[1:])
seconds = time.perf_counter() - start
peak = torch.cuda.max_memory_allocated() / 2**20
print(f"gpu-check: senslora {sys.argv[1]}: exit {code}, {seconds:.1f} s, peak GPU memory {peak:.0f} MiB")
sys.exit(code)
PY
}

common=(--model smollm2 --device cuda --dtype bfloat16 --no-progress)
senslora allocate "${common[@]}" --calib chat --calib-samples 64 --max-length 64 --avg-rank 8 \
  --measure-forward --no-plot --out "$OUT/alloc"
senslora train "${common[@]}" --method senslora --task chat-qa --max-train-samples 64 --max-eval-samples 16 \
  --epochs 1 --batch-size 8 --max-length 64 --max-new-tokens 16 --lr 2e-3 --avg-rank 8 --calib-samples 32 \
  --option plot=false --out "$OUT/train"
echo "gpu-check: all passed"
