"""The real built-in SmolLM2-135M-Instruct on an MMLU subset (slow: downloads/loads the model, scores on CPU).

With an adapter from `tuneforge quickstart` at $TUNEFORGE_QUICKSTART_ADAPTER (default outputs/quickstart), base and
adapter are evaluated side by side on MMLU and the bundled task's held-out split, and the adapter must beat the base (ROUGE-L)
on the task it was trained for."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tuneforge.cli import main

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_base_vs_quickstart_adapter(shared_assets, tmp_path):
    adapter = Path(os.environ.get("TUNEFORGE_QUICKSTART_ADAPTER", ROOT / "outputs" / "quickstart"))
    tasks = "mmlu,data:" + str(ROOT / "tuneforge/assets/example_task/heldout.jsonl")
    argv = ["eval", "--model", "builtin:smollm2-135m-instruct", "--tasks", tasks, "--data-dir",
            str(shared_assets / "eval"), "--limit", "10", "--out", str(tmp_path)]
    if (adapter / "adapter_config.json").is_file():
        argv += ["--adapter", str(adapter)]
    assert main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    for model in results.values():
        assert model["mmlu"]["questions"] == 50 and 0.1 <= model["mmlu"]["accuracy_micro"] <= 0.6
    if len(results) == 2:
        task = "data:" + str(ROOT / "tuneforge/assets/example_task/heldout.jsonl")
        base, tuned = results["base"][task], results[adapter.name][task]
        assert tuned["rougeL"] > base["rougeL"]
