#!/usr/bin/env bash
# Creates bench/.venv-llamafactory with LLaMA-Factory 0.9.5 next to the CPU build of torch 2.13.0.
# Idempotent: rerunning skips what is already in place. Usage: bash bench/setup_llamafactory.sh
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.venv-llamafactory"
PY="$VENV/bin/python"

if [ ! -x "$PY" ]; then
  python3 -m venv "$VENV"
fi

# torch==2.13.0 as a constraint so no dependency pulls a CUDA build (the CPU wheel lies in $PIP_FIND_LINKS / PyPI).
CONSTRAINTS="$VENV/bench-constraints.txt"
echo "torch==2.13.0" > "$CONSTRAINTS"

if ! "$PY" -c "import llamafactory, sys; sys.exit(0 if llamafactory.__version__ == '0.9.5' else 1)" 2>/dev/null; then
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -c "$CONSTRAINTS" "torch==2.13.0" "llamafactory==0.9.5"
fi

# PyPI's torchvision / torchaudio wheels are CUDA builds whose compiled ops fail to load next to CPU torch and
# break LLaMA-Factory's imports. LLaMA-Factory's text SFT path needs neither, but its data/mm_plugin.py imports
# torchaudio unconditionally: uninstall torchvision (transformers then skips it) and keep torchaudio's Python
# package with its compiled libraries removed (torchaudio then imports fine; its ops are never called here).
if "$PY" -m pip show -q torchvision >/dev/null 2>&1; then
  "$PY" -m pip uninstall -y -q torchvision
fi
if ! "$PY" -m pip show -q torchaudio >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-deps -c "$CONSTRAINTS" "torchaudio==2.11.0"
fi
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
rm -f "$SITE"/torchaudio/lib/*.so "$SITE"/torchaudio/lib/*.so.*

# Smoke check: the entry points the benchmark uses import cleanly.
"$PY" - <<'PY'
import torch, transformers, peft, llamafactory
from llamafactory.train.tuner import run_exp  # noqa: F401
from llamafactory.data.template import TEMPLATES
assert "llama3" in TEMPLATES and "smollm2" in TEMPLATES, sorted(TEMPLATES)  # the templates the benchmark uses
print(f"llamafactory {llamafactory.__version__}  torch {torch.__version__}  transformers {transformers.__version__}  peft {peft.__version__}")
assert torch.__version__.startswith("2.13.0"), torch.__version__
PY
