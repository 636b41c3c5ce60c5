#!/usr/bin/env bash
# Installs (if needed) and runs the whole default test suite (slow and GPU tests are opt-in).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
