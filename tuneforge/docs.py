"""README tables generated from the typed configs, the method registry and the verb table (one source of help).

    python -m tuneforge.docs          # rewrite the generated blocks of README.md in place
    python -m tuneforge.docs --check  # exit 1 when README.md is out of date (a test runs this)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def config_table() -> str:
    from tuneforge.configs.schema import TrainConfig, _method_sections
    from tuneforge.configs.typed import field_help_rows

    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, tp, default, text in field_help_rows(TrainConfig):
        if key != "method_options":
            rows.append(f"| `{key}` | {_cell(tp)} | `{_cell(default)}` | {_cell(text)} |")
    for section, cls in _method_sections().items():
        for key, tp, default, text in field_help_rows(cls, prefix=section + "."):
            rows.append(f"| `{key}` | {_cell(tp)} | `{_cell(default)}` | {_cell(text)} |")
    return "\n".join(rows)


def verbs_table() -> str:
    from tuneforge.cli import VERBS

    rows = ["| verb | what it does |", "|---|---|"]
    rows += [f"| `tuneforge {v.name}` | {_cell(v.help)} |" for v in VERBS]
    return "\n".join(rows)


def _share(method: str, preset: str) -> str:
    """Trainable share of a 7B model with the method's default options, from the estimator (`tuneforge estimate`)."""
    from tuneforge.estimate.memory import EstimateArgs, trainable_params
    from tuneforge.estimate.shapes import resolve_shape
    from tuneforge.methods import METHODS

    shape = resolve_shape(preset)
    if not METHODS[method].supports(shape.model_type):
        return "n/a"
    total = shape.total_params()
    share = trainable_params(shape, method, EstimateArgs(model=preset)).trainable / total
    return "0" if share == 0 else f"{share:.3%}" if share < 0.001 else f"{share:.2%}"


def methods_table() -> str:
    from dataclasses import fields

    from tuneforge.methods import METHODS

    rows = ["| method | what it trains | trainable share, Llama-2-7B / Qwen2-7B | merges | key options | "
            "choose it when |", "|---|---|---|---|---|---|"]
    for name, m in METHODS.items():
        keys = ", ".join(f"`{m.section}.{f.name}`" for f in fields(m.Options)) if m.section else "-"
        share = f"{_share(name, 'llama-7b')} / {_share(name, 'qwen2-7b')}"
        rows.append(f"| `{name}` | {_cell(m.summary)} | {share} | {'yes' if m.mergeable else 'no'} | {keys} | "
                    f"{_cell(m.guide)} |")
    return "\n".join(rows)


BLOCKS = {"config": config_table, "verbs": verbs_table, "methods": methods_table}


def render(text: str) -> str:
    for name, make in BLOCKS.items():
        pattern = re.compile(rf"(<!-- {name}:start -->\n)(?:.*?\n)?(<!-- {name}:end -->)", re.S)
        text = pattern.sub(lambda m, make=make: m.group(1) + make() + "\n" + m.group(2), text)
    return text


def main(argv: list[str]) -> int:
    text = README.read_text(encoding="utf-8")
    new = render(text)
    if "--check" in argv:
        if new != text:
            print("README.md generated blocks are out of date: run `python -m tuneforge.docs`.")
            return 1
        return 0
    tmp = README.with_suffix(".md.tmp")
    tmp.write_text(new, encoding="utf-8")
    tmp.replace(README)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
