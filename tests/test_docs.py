"""README stays true: generated tables are current, and the two commands at the top are the ones CI and users run."""

from __future__ import annotations

import re
from pathlib import Path

from tuneforge import docs

ROOT = Path(__file__).resolve().parent.parent


def test_generated_readme_blocks_are_current():
    text = docs.README.read_text(encoding="utf-8")
    assert docs.render(text) == text, "README.md is out of date: run `python -m tuneforge.docs`"


def test_readme_tables_cover_every_method_verb_and_config_key():
    from tuneforge.cli import VERBS
    from tuneforge.configs.schema import TrainConfig
    from tuneforge.configs.typed import field_help_rows
    from tuneforge.methods import METHODS

    text = docs.README.read_text(encoding="utf-8")
    assert all(f"| `{name}` |" in text for name in METHODS)
    assert all(f"`tuneforge {v.name}`" in text for v in VERBS)
    assert all(f"| `{key}` |" in text for key, *_ in field_help_rows(TrainConfig) if key != "method_options")


def test_the_two_commands_at_the_top_exist_and_ci_runs_the_test_one():
    text = docs.README.read_text(encoding="utf-8")
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert commands == ["bash scripts/quickstart.sh", "bash scripts/test.sh"]
    assert all((ROOT / c.split()[1]).is_file() for c in commands)
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
