#!/usr/bin/env bash
# Creates ./.venv (if missing) and installs TuneForge with its test extras.
# torch is pinned through constraints.txt (the CPU build on this machine's disk), not in the package metadata.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.tuneforge-installed
want=$(cat pyproject.toml constraints.txt | sha1sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test,qlora]" 2>&1 \
    | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import tuneforge, torch, transformers, peft" 
  echo "$want" > "$stamp"
fi
