#!/usr/bin/env bash
# Installs (if needed) and runs the quickstart: LoRA on SmolLM2-135M-Instruct on CPU, accuracy before/after.
# Extra arguments go to `tuneforge quickstart` (e.g. --output-dir DIR --steps N).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/tuneforge quickstart "$@"
