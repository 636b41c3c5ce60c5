#!/usr/bin/env python3
"""Step time with and without `training.compile` (torch.compile of each decoder block), after warm-up.

    .venv/bin/python bench/bench_compile.py                 # tiny-llama widened to hidden 256, 4 layers, LoRA
    .venv/bin/python bench/bench_compile.py --method full

Each variant is a `tuneforge train` run in its own process on the same model, rows and settings (fp32, batch 8,
max_length 128, 30 steps). The time per step is taken from metrics.jsonl's timestamps between step --warmup and
the last step, so the compilation (the first steps) is excluded; the compile time is printed separately (time to
step --warmup minus the eager run's). The final losses of both runs are printed to show they agree.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASK = ROOT / "tuneforge" / "assets" / "example_task" / "train.jsonl"


def run(model: Path, out: Path, method: str, steps: int, compile_: bool) -> tuple[list[dict], float]:
    args = [sys.executable, "-m", "tuneforge", "train", str(ROOT / "examples" / "sft_lora_tiny.yaml"),
            f"model.name_or_path={model}", f"output_dir={out}", f"data.train=[{TASK}]", f"method={method}",
            f"training.max_steps={steps}", "training.batch_size=8", "data.max_length=128", "training.device=cpu",
            "training.precision=fp32", "training.progress_bar=false", "training.plot_loss=false",
            "training.save_steps=0", "training.eval_steps=0", "data.eval_ratio=0.0", "training.logging_steps=1",
            f"training.compile={str(compile_).lower()}", "overwrite_output_dir=true"]
    start = time.time()
    subprocess.run(args, check=True, cwd=ROOT, capture_output=True, text=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    return rows, start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="lora")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        subprocess.run([sys.executable, "-m", "tuneforge", "init-model", "tiny-llama", "--out", str(model),
                        "--hidden-size", "256", "--layers", "4"], check=True, cwd=ROOT, capture_output=True)
        print(f"| variant | s/step after step {args.warmup} | time to step {args.warmup} (s) | final loss |")
        print("|---------|------:|------:|------|")
        results = {}
        for compile_ in (False, True):
            rows, start = run(model, Path(tmp) / f"out-{compile_}", args.method, args.steps, compile_)
            per_step = (rows[-1]["time"] - rows[args.warmup - 1]["time"]) / (len(rows) - args.warmup)
            results[compile_] = per_step
            name = "compile" if compile_ else "eager"
            print(f"| {name} | {per_step:.3f} | {rows[args.warmup - 1]['time'] - start:.1f} | {rows[-1]['loss']:.6f} |")
        print(f"\nspeed-up of compile after warm-up: {results[False] / results[True]:.2f}x")


if __name__ == "__main__":
    main()
