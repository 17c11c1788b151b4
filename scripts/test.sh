#!/usr/bin/env bash
# Set up a virtual environment from the project's own files and run lint, type check
# and the whole test suite. Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
echo "== ruff"
"$VENV/bin/ruff" check torch_integrity tests bench examples
echo "== mypy"
"$VENV/bin/mypy"
echo "== pytest"
"$VENV/bin/python" -m pytest -q "$@"
