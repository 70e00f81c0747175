#!/usr/bin/env bash
# Set up a virtual environment in .venv with deepcluster and its test tools.
# Uses a torch that is already importable (e.g. a user's CUDA build); installs the CPU
# build torch==2.13.0 only when none is, from PyTorch's CPU wheel index (TORCH_INDEX_URL
# overrides it, e.g. for a mirror), so no CUDA packages are ever pulled in here.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  # System site-packages stay visible so an existing torch is reused, not reinstalled.
  "$PYTHON" -m venv --system-site-packages .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/pip install --quiet torch==2.13.0 --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
fi
.venv/bin/pip install --quiet -e ".[test,tools]"
.venv/bin/python -c "import torch, faiss, deepcluster; print(f'deepcluster {deepcluster.__version__} ready: torch {torch.__version__}, faiss {faiss.__version__}')"
