#!/usr/bin/env bash
# Set up a virtual environment in .venv with deepcluster and its test tools.
# Uses a torch that is already importable (e.g. a user's CUDA build); installs the CPU
# build torch==2.13.0 only when none is. TORCH_INDEX_URL names the index to take it from
# (e.g. https://download.pytorch.org/whl/cpu, PyTorch's CPU wheels, where the default
# index would pull the CUDA build); unset, pip's configured index is used, which on the
# project's machines and CI serves the CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  # System site-packages stay visible so an existing torch is reused, not reinstalled.
  "$PYTHON" -m venv --system-site-packages .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/pip install --quiet torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
.venv/bin/pip install --quiet -e ".[test,tools]"
.venv/bin/python -c "import torch, faiss, deepcluster; print(f'deepcluster {deepcluster.__version__} ready: torch {torch.__version__}, faiss {faiss.__version__}')"
