#!/usr/bin/env python3
"""Peak memory of one training step with and without `training.chunked_loss`, at Qwen's vocabulary (151,936).

    .venv/bin/python bench/bench_chunked_loss.py                   # prints the table for bench/RESULTS.md
    .venv/bin/python bench/bench_chunked_loss.py --batch 1 --seq 64 --hidden 64   # a quick look

A random-init Llama-shaped model (hidden --hidden, 2 layers, vocab 151,936, untied lm_head), a batch whose every
position has a label (the worst case: continued pre-training), one forward + backward of TuneForge's `Stage.loss`
in fp32 on CPU, for the full model (lm_head trains) and for LoRA (lm_head frozen). Each variant runs in its own
process; memory is that process's peak RSS (ru_maxrss) minus its RSS just before the step (the model, inputs and
imports), i.e. what the step itself added at its peak. The losses of both variants are printed to show they agree.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 151_936


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def worker(args) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tuneforge.training.loop import Stage

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    if args.method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(0, VOCAB, (args.batch, args.seq))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    stage = Stage()
    stage.logits_at_labels, stage.chunked_loss = True, args.chunked
    before = rss_mib()
    start = time.perf_counter()
    loss, _ = stage.loss(model, batch)
    loss.backward()
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"loss": loss.item() / (args.batch * (args.seq - 1)), "step_mib": peak - before, "peak_mib": peak,
            "seconds": elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="full", help=argparse.SUPPRESS)
    parser.add_argument("--chunked", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    shape = f"--batch {args.batch} --seq {args.seq} --hidden {args.hidden}".split()
    logits_mib = args.batch * args.seq * VOCAB * 4 / 2**20
    print(f"batch {args.batch} x seq {args.seq}, vocab {VOCAB}: fp32 logits alone are {logits_mib:.0f} MiB\n")
    print("| method | loss path | step peak (MiB over the model) | process peak RSS (MiB) | step s | loss |")
    print("|--------|-----------|-------------------------------:|-----------------------:|-------:|------|")
    for method in ("full", "lora"):
        for chunked in (False, True):
            cmd = [sys.executable, __file__, "--worker", "--method", method, *shape] + (["--chunked"] * chunked)
            out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
                             .stdout.strip().splitlines()[-1])
            path = "chunked" if chunked else "full logits"
            print(f"| {method} | {path} | {out['step_mib']:.0f} | {out['peak_mib']:.0f} | {out['seconds']:.2f} "
                  f"| {out['loss']:.6f} |")


if __name__ == "__main__":
    main()
