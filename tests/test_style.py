"""Codebase rules from DEVELOPERS.md that a machine can check: lint-clean, short functions, components never import
recipes."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "tuneforge"


def python_files():
    return sorted(PACKAGE.rglob("*.py"))


def test_no_function_longer_than_150_lines():
    long = [f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in python_files() for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 150]
    assert not long, long


def test_components_never_import_recipes():
    offenders = []
    for path in python_files():
        if "recipes" in path.parts or path.name in ("train.py", "cli.py", "quickstart.py", "docs.py"):
            continue  # the recipes themselves and the entry points that dispatch to them
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.startswith("tuneforge.recipes")]
    assert not offenders, offenders


def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (pip install -e .[test] installs it)")
    proc = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:]
