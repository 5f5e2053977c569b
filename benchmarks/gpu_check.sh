#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py has the list): one line per figure, non-zero exit on any error.
#   bash benchmarks/gpu_check.sh              # on a CUDA machine, ~8 minutes on one GPU
#   bash benchmarks/gpu_check.sh --cpu-smoke  # the same code paths on CPU at tiny sizes (make test-slow runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
exec "$PY" benchmarks/gpu_check.py "$@"
