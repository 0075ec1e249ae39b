#!/usr/bin/env bash
# Every CUDA check in one command: scripts/gpu_check.sh REPORT_DIR [--dry-run]  (see scripts/gpu_check.py)
set -euo pipefail
cd "$(dirname "$0")/.."
exec python scripts/gpu_check.py "$@"
