#!/usr/bin/env python3
"""One linear layer's forward + backward on CPU, fp32: PyTorch's own path (MKL sgemm) against oneDNN
(training.cpu_matmul, tuneforge/kernels/onednn_linear.py), on SmolLM2-135M's shapes.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_cpu_matmul.py [--rows 1024] [--repeats 5] [--steps 3]

For each shape: a trainable weight (forward, grad_input, grad_weight: 6MKN FLOPs) and a frozen one whose input
needs a gradient (LoRA's base layers and lm_head: forward and grad_input, 4MKN). The two paths alternate, the best
of --repeats counts. Also prints the CPU peak probe of training/flops.py per library.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from tuneforge.kernels.onednn_linear import onednn_linears
from tuneforge.training import flops

SHAPES = [(576, 576, "q/o_proj"), (576, 192, "k/v_proj"), (576, 1536, "gate/up_proj"), (1536, 576, "down_proj"),
          (576, 49152, "lm_head")]


def step_seconds(x, layer, use: bool) -> float:
    x.grad = None
    layer.weight.grad = None
    start = time.perf_counter()
    with onednn_linears("cpu", enabled=use):
        layer(x).backward(torch.ones(x.shape[0], layer.out_features))
    return time.perf_counter() - start


def whole_steps(repeats: int, batch: int, length: int) -> None:
    """SmolLM2-135M-Instruct with LoRA r=8 on q/k/v/o (as bench_lora_sft.py), one fixed batch of random tokens,
    forward + backward (loss over every position) alternating between the two paths in one process: a paired
    comparison that machine load moves alike for both."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tuneforge.models.builtin import ensure_smollm2

    model = AutoModelForCausalLM.from_pretrained(ensure_smollm2(), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                  "o_proj"]))
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
    best, losses = {False: float("inf"), True: float("inf")}, {}
    for _ in range(repeats):
        for use in (False, True):
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            with onednn_linears("cpu", enabled=use):
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
            best[use] = min(best[use], time.perf_counter() - start)
            losses[use] = loss.item()
    print(f"SmolLM2-135M LoRA step (batch {batch} x {length}, forward + backward, best of {repeats}): MKL "
          f"{best[False]:.2f} s, oneDNN {best[True]:.2f} s: {best[False] / best[True]:.2f}x; losses "
          f"{losses[False]:.6f} / {losses[True]:.6f}; load average {os.getloadavg()[0]:.2f}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1024, help="tokens per batch (M)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=0, help="also time N whole SmolLM2 LoRA steps per path (0: skip)")
    a = p.parse_args()
    if a.steps:
        whole_steps(a.steps, 8, 128)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), load average {os.getloadavg()[0]:.2f}; "
          f"M = {a.rows} rows; GFLOP/s, best of {a.repeats} (the two paths alternate)")
    print(f"| {'layer':<12} | {'K x N':>11} | weight    | {'MKL':>6} | {'oneDNN':>6} | ratio |")
    print("|--------------|-------------|-----------|--------|--------|-------|")
    for k, n, name in SHAPES:
        layer = torch.nn.Linear(k, n, bias=False)
        x = torch.randn(a.rows, k, requires_grad=True)
        for frozen in (False, True):
            layer.weight.requires_grad_(not frozen)
            work = (4 if frozen else 6) * a.rows * k * n
            best = {False: float("inf"), True: float("inf")}
            for _ in range(a.repeats):
                for use in (False, True):
                    best[use] = min(best[use], step_seconds(x, layer, use))
            mkl, dnn = work / best[False] / 1e9, work / best[True] / 1e9
            print(f"| {name:<12} | {k:>5}x{n:<5} | {'frozen' if frozen else 'trainable':<9} | {mkl:6.1f} | "
                  f"{dnn:6.1f} | {dnn / mkl:4.2f}x |", flush=True)
    sq = torch.randn(1024, 1024), torch.randn(1024, 1024)
    mkl_peak = flops._best_rate(lambda: sq[0] @ sq[1], 2 * 1024 ** 3, 0.5)
    probe = flops.probe_cpu_peak(torch.float32, seconds=1.0)
    print(f"peak probe, 1024^3 matmul: MKL alone {mkl_peak / 1e9:.1f} GFLOP/s; training/flops.py (best of MKL and "
          f"oneDNN) {probe / 1e9:.1f} GFLOP/s")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
