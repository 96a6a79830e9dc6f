#!/usr/bin/env bash
# One command: dependencies, the native CPU kernels, and the package (editable).
# TORCH_SPEC picks the torch to install when none is present (CI pins torch==2.13.0, a CPU wheel).
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install "${TORCH_SPEC:-torch}"
fi
"$PY" -m pip install -r requirements.txt
# --no-build-isolation: build against the torch/pybind11 already installed instead of downloading new ones.
"$PY" -m pip install --no-build-isolation -e .
"$PY" -c "import ktransformers, sys; print('ktransformers', ktransformers.__version__, 'installed for', sys.executable)"
