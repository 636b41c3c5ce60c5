#!/usr/bin/env python3
"""`model.attn_implementation: auto` against `sdpa` on CPU: one attention call by row length, then the quickstart.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_attention.py                 # both parts (about 6 minutes)
    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_attention.py --part kernel   # seconds
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_attention.py --part mask     # seconds
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_attention.py --part row      # about a minute

Part 1 (kernel): forward + backward of one attention call (9 heads of 64 dims as SmolLM2-135M, 1024 positions per
batch, causal + padding mask as transformers makes it) through torch's SDPA and through the eager matmul-softmax-
matmul, in bf16 and fp32, by row length. Part 2 (train): `tuneforge train examples/quickstart.yaml` (SmolLM2-135M
LoRA, bf16 on CPUs that compute it, rows up to 128 tokens) with `model.attn_implementation` sdpa and auto,
alternating, --pairs times; tokens/s as the run logs it (its last logging window), the ratio auto / sdpa.
Part 3 (mask): what transformers' `create_causal_mask` costs for one padding-free row (position ids restarting every
L positions) under `sdpa` (a dense row x row boolean mask) and under `auto` (deferred, never built).
Part 4 (row): the attention of one padding-free row, forward + backward, both ways `segment_attention` has: its
sequences gathered into a padded batch (one call under a mask), or one causal call per sequence; fp32 and bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent


def eager(q, k, v, additive_mask):
    """transformers' eager attention: scores + an fp32 additive mask, softmax in fp32."""
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5 + additive_mask
    return torch.softmax(scores, -1, dtype=torch.float32).to(q.dtype) @ v


def seconds_per_call(fn, *args, repeats: int = 5) -> float:
    for _ in range(2):
        fn(*args).sum().backward()
    start = time.perf_counter()
    for _ in range(repeats):
        fn(*args).sum().backward()
    return (time.perf_counter() - start) / repeats


def kernel_part() -> None:
    print("one attention call, forward + backward, about 1024 positions per batch "
          "(ms; eager / sdpa < 1 means eager faster)")
    for dtype in (torch.bfloat16, torch.float32):
        for batch, length in ((16, 64), (8, 128), (5, 192), (4, 256), (2, 512), (1, 1024)):
            gen = torch.Generator().manual_seed(length)
            q, k, v = (torch.randn(batch, 9, length, 64, generator=gen).to(dtype).requires_grad_() for _ in range(3))
            lengths = torch.randint(length // 2, length + 1, (batch,), generator=gen)
            lengths[0] = length
            keep = torch.arange(length)[None, :] < lengths[:, None]
            mask = (torch.ones(length, length, dtype=torch.bool).tril()[None] & keep[:, None, :])[:, None]
            t_sdpa = seconds_per_call(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), q, k, v)
            additive = torch.zeros(mask.shape).masked_fill_(~mask, torch.finfo(torch.float32).min)
            t_eager = seconds_per_call(lambda q, k, v: eager(q, k, v, additive), q, k, v)
            print(f"  {str(dtype)[6:]:8} rows of {length:4}: sdpa {t_sdpa * 1e3:6.1f}  eager {t_eager * 1e3:6.1f}  "
                  f"eager / sdpa {t_eager / t_sdpa:.2f}", flush=True)


def mask_part() -> None:
    from transformers import LlamaConfig
    from transformers.masking_utils import create_causal_mask

    from tuneforge.models.attention import resolve_attention

    print("the mask of one padding-free row (best of 3)")
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1, vocab_size=100)
    for sequences, length in ((16, 512), (16, 1024), (32, 1024)):
        row = sequences * length
        positions, embeds = torch.arange(length).repeat(sequences)[None], torch.zeros(1, row, 8)
        for attn in ("sdpa", resolve_attention("auto")):
            config._attn_implementation = attn
            best, mask = float("inf"), None
            for _ in range(3):
                start = time.perf_counter()
                mask = create_causal_mask(config=config, inputs_embeds=embeds, attention_mask=None,
                                          past_key_values=None, position_ids=positions)
                best = min(best, time.perf_counter() - start)
            mib = mask.numel() * mask.element_size() / 2 ** 20 if isinstance(mask, torch.Tensor) else 0
            print(f"  {sequences} x {length} = {row:6}  {attn:15} {best * 1e3:8.1f} ms  {mib:6.0f} MiB  "
                  f"{type(mask).__name__}")


class CausalModule(torch.nn.Module):
    is_causal = True


def gathered_row(segments):
    from tuneforge.models import attention

    def run(q, k, v):
        return attention.segment_attention(CausalModule(), q, k, v, segments._replace(one_by_one=False), None,
                                           scaling=0.125, dropout=0.0)[0]
    return run


def looped_row(segments):
    """One causal SDPA call per sequence (what segment_attention runs in fp32 when it picks the loop)."""
    def run(q, k, v):
        return torch.cat([F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True,
                                                         scale=0.125).transpose(1, 2) for a, b in segments.bounds], 1)
    return run


def row_part() -> None:
    from tuneforge.models import attention

    print("one padding-free row's attention, forward + backward, 9 heads x 64 dims (ms; loop / gathered < 1: loop "
          "faster)")
    rows = ([58, 40, 83, 61, 47, 70, 52, 80], [120, 30, 60, 90, 128, 45, 100, 70], [500, 300, 800, 200],
            [58, 40, 83, 61, 47, 70, 52, 80] * 2, [120, 130, 90, 140] * 4, [20, 35, 28, 40] * 8)
    for dtype in (torch.float32, torch.bfloat16):
        for lengths in rows:
            gen = torch.Generator().manual_seed(len(lengths))
            q, k, v = (torch.randn(1, 9, sum(lengths), 64, generator=gen).to(dtype).requires_grad_() for _ in range(3))
            segments = attention.row_segments(torch.cat([torch.arange(n) for n in lengths])[None])
            gathered, looped = (min(seconds_per_call(make(segments), q, k, v) for _ in range(3))
                                for make in (gathered_row, looped_row))
            print(f"  {str(dtype)[6:]:8} {len(lengths):2} sequences of {min(lengths)}-{max(lengths)}: gathered "
                  f"{gathered * 1e3:6.1f}  loop {looped * 1e3:6.1f}  loop / gathered {looped / gathered:.2f}  "
                  f"(fp32 picks {'loop' if segments.one_by_one else 'gathered'})")


def train_tokens_per_s(attn: str, steps: int, work: Path) -> float:
    out = work / attn
    cmd = [sys.executable, "-m", "tuneforge", "train", str(ROOT / "examples" / "quickstart.yaml"),
           f"model.attn_implementation={attn}", f"output_dir={out}", f"training.max_steps={steps}",
           "training.progress_bar=false", f"training.logging_steps={steps // 2}", "overwrite_output_dir=true"]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "tokens_per_s" in r][-1]["tokens_per_s"]


def train_part(pairs: int, steps: int) -> None:
    print(f"\ntuneforge train examples/quickstart.yaml, {steps} steps, tokens/s of the last {steps // 2} "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")
    ratios = []
    with tempfile.TemporaryDirectory(prefix="tuneforge-bench-attn-") as tmp:
        for pair in range(pairs):
            sdpa = train_tokens_per_s("sdpa", steps, Path(tmp))
            auto = train_tokens_per_s("auto", steps, Path(tmp))
            ratios.append(auto / sdpa)
            print(f"  pair {pair + 1}: sdpa {sdpa:6.1f} tok/s  auto {auto:6.1f} tok/s  auto / sdpa {auto / sdpa:.2f}x",
                  flush=True)
    print(f"  median auto / sdpa: {sorted(ratios)[len(ratios) // 2]:.2f}x")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["kernel", "train", "mask", "row", "both"], default="both",
                   help="both: kernel and train")
    p.add_argument("--pairs", type=int, default=3, help="Alternating sdpa/auto training runs.")
    p.add_argument("--steps", type=int, default=20, help="Optimizer steps per training run.")
    args = p.parse_args(argv)
    if args.part in ("kernel", "both"):
        kernel_part()
    if args.part in ("train", "both"):
        train_part(args.pairs, args.steps)
    if args.part == "mask":
        mask_part()
    if args.part == "row":
        row_part()
    return 0


if __name__ == "__main__":
    sys.exit(main())
