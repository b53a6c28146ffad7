#!/usr/bin/env bash
# The GPU check (README "GPU check"): attention kernels fp32/bf16 up to n = 32,768 for every backend and a
# 200-step ListOps training run per backend at 2,048 tokens, as one table; about 5-8 minutes on one GPU.
# Uses the environment `make install` built (with the CUDA torch you chose); installs nothing.
# Fails within seconds, measuring nothing, where torch sees no CUDA device.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
if [[ ! -x "$PY" ]]; then
  echo "gpu_check: $PY not found; run \`make install\` first (GPU users: make install TORCH=\"torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128\")." >&2
  exit 2
fi
export PATH="$(dirname "$PY"):$PATH" WANDB_MODE="${WANDB_MODE:-disabled}"
exec "$PY" scripts/gpu_check.py "$@"
