"""`{{name}}`-style placeholders left in data rows.

LLaMA-Factory's identity.json ships answers such as "I am {{name}}, developed by {{author}}" for the user to fill
in before training; trained as they are, the model learns to introduce itself as `{{name}}`. The data path does not
replace them (only the user knows the values): it counts them per file and the report warns once per file.
"""

from __future__ import annotations

import re

from tuneforge.data.formats import strings_of
from tuneforge.data.types import DataReport

# `{{name}}`, `{{ author }}`: a bare identifier. Jinja/Handlebars expressions with filters or dots are code.
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_]\w*)\s*\}\}")
# Fenced code (a Vue or Jinja snippet in a coding answer) is meant literally, so it is not searched.
CODE_BLOCK = re.compile(r"```.*?(?:```|$)", re.S)


def placeholders_in(example) -> set[str]:
    """The placeholder names in an example's texts (chat contents, pairs' sides, plain text, tool schemas)."""
    names: set[str] = set()
    for _, text in strings_of(example):
        if "{{" in text:
            names.update(PLACEHOLDER.findall(CODE_BLOCK.sub(" ", text)))
    return names


def file_of(source: str) -> str:
    """The file of an example's source (`data/x.json:record 3`, `... (pair 2: a > b)` for typed rows)."""
    return source.split(" (pair ", 1)[0].rsplit(":", 1)[0]


def count_placeholders(examples: list, report: DataReport) -> None:
    """Add the rows of `examples` holding placeholders to `report.placeholders`, per file (a typed row's pairs
    count as one row)."""
    found: dict[str, tuple[set[str], set[str]]] = {}  # file -> (row sources, names)
    for example in examples:
        names = placeholders_in(example)
        if names:
            rows, seen = found.setdefault(file_of(example.source), (set(), set()))
            rows.add(example.source.split(" (pair ", 1)[0])
            seen.update(names)
    for file, (rows, names) in found.items():
        before_rows, before_names = report.placeholders.get(file, (0, []))
        report.placeholders[file] = (before_rows + len(rows), sorted(set(before_names) | names))
