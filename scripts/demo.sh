#!/usr/bin/env bash
# Set up a virtual environment from the project's own files, then run the whole story on
# CPU: train with IntegrityCallback, verify, replay every segment, roll back, check weights.
# Usage: bash scripts/demo.sh [RUN_DIR]   (default: runs/demo-<timestamp>)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
RUN_DIR="${1:-runs/demo-$(date +%Y%m%d-%H%M%S)}"
exec "$VENV/bin/python" -m torch_integrity.demo --run-dir "$RUN_DIR"
