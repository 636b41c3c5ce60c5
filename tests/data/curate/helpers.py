"""Small helpers for the data-tool tests: write rows, read outputs, run a sub-verb through the real CLI parser."""

from __future__ import annotations

import json
from pathlib import Path

from tuneforge.cli import Verb, parse_verb_args
from tuneforge.data.curate import SUBVERBS


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def parse(sub: str, argv: list[str]):
    """The typed args of `tuneforge data <sub> argv...`, parsed exactly as the CLI parses them."""
    target, args, help_ = SUBVERBS[sub]
    return parse_verb_args(Verb(f"data {sub}", target, args, help_), argv)
