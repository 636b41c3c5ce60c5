"""bench/bench_gpu.py: the CPU smoke run (tiny shape) counts the tokens it trains, reports a sane MFU from the
loop's own FLOP count, and refuses the big shapes on CPU; the `gpu` test runs the real shapes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("bench_gpu", None)


def llama_matmul_weights(shape: dict) -> int:
    """Weights of every nn.Linear of a Llama block stack plus the LM head, from the shape alone."""
    h, i, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    return layers * (2 * h * h + 2 * h * kv + 3 * h * i) + h * shape["vocab_size"]


def test_tiny_cpu_run_counts_tokens_and_reports_mfu(bench, tmp_path, capsys):
    out = tmp_path / "results.json"
    rc = bench.main(["--shape", "tiny", "--method", "all", "--device", "cpu", "--precision", "fp32", "--steps", "2",
                     "--warmup", "1", "--seq", "48", "--batch", "3", "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    results = {r["method"]: r for r in json.loads(out.read_text())}
    ran = ["lora", "full"] + (["qlora"] if importlib.util.find_spec("bitsandbytes") else [])
    for method in ran:
        r = results[method]
        assert r["tokens"] == 3 * 48 * 2  # batch x seq x timed steps: warmup steps are not counted
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] <= 1
        assert r["model_tflops"] * 1e12 == pytest.approx(r["flops_per_token"] * r["tokens_per_s"], rel=1e-6)
        assert r["peak_gb"] is None and r["estimate_gb"] > 0  # no CUDA allocator on CPU
    shape = bench.SHAPES["tiny"]
    n, attention = llama_matmul_weights(shape), 12 * shape["num_hidden_layers"] * shape["hidden_size"] * 48
    assert results["full"]["flops_per_token"] == 6 * n + attention  # everything trains: 6N
    lora = results["lora"]
    h, i = shape["hidden_size"], shape["intermediate_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    # rank-8 A and B on every block projection (all-linear: not the LM head); they train and are matmuls too
    adapters = 8 * shape["num_hidden_layers"] * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 3)
    assert lora["trainable"] == adapters
    assert lora["flops_per_token"] == 4 * (n + adapters) + 2 * adapters + attention  # 4N + 2T + attention
    assert "MFU" in printed and "lora: MFU" in printed and "goal is for GPUs: not comparable" in printed
    assert "no peak memory on cpu" in printed


def test_big_shapes_are_refused_on_cpu(bench, capsys):
    assert bench.main(["--shape", "8b", "--method", "lora", "--device", "cpu"]) == 2
    assert "--shape tiny" in capsys.readouterr().err


@pytest.mark.gpu
def test_real_shapes_on_gpu(bench, tmp_path, capsys):
    """Llama-3-8B LoRA, Llama-3.2-1B full and 8B QLoRA at seq 2048 (a few steps): sane figures, printed."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    out = tmp_path / "results.json"
    assert bench.main(["--steps", "3", "--warmup", "1", "--json", str(out)]) == 0
    print(capsys.readouterr().out)
    for r in json.loads(out.read_text()):
        if r["note"]:
            continue
        assert r["tokens"] == r["batch"] * 2048 * 3 and 0 < r["mfu"] <= 1
        assert r["peak_gb"] > 0 and r["estimate_gb"] > 0 and r["chunked_loss"]
