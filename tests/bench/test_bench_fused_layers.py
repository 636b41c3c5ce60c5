"""bench/bench_fused_layers.py on a tiny model: it runs, and its three variants compute the same loss."""

from __future__ import annotations

import re

from tests.bench.scripts import load_script


def test_fused_layers_bench_runs_and_the_variants_agree(capsys):
    bench = load_script("bench_fused_layers")
    assert bench.main(["--tiny", "--rounds", "1", "--tokens", "32"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"RMSNorm \(64\), frozen weight: op by op \d+ us, fused \d+ us: [\d.]+x", out), out
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", out)]
    assert len(losses) == 3 and max(losses) - min(losses) < 1e-5, out
