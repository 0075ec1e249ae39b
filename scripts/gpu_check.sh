#!/usr/bin/env bash
# Every CUDA check in one command: scripts/gpu_check.sh REPORT_DIR [--dry-run]  (see scripts/gpu_check.py)
# It runs under $PYTHON, else the python3 on PATH: PYTHON=path/to/venv/bin/python picks the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
