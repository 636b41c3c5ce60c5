#!/usr/bin/env python3
"""DPO step time and memory: live reference against the precomputed one, for LoRA and full, in one run.

    .venv/bin/python bench/bench_dpo_reference.py [--steps 20] [--hidden 256] [--layers 4] [--repeats 3]

Model: a `tuneforge init-model tiny-llama` model widened to --hidden/--layers; data: the bundled preference pairs
(tuneforge/assets/example_prefs/train.jsonl), max_length 128, batch 8 pairs (16 rows), fp32, no eval. Each
configuration runs `tuneforge train` in its own process:
- step time: wall time between the end of step 3 and the end of the last step (perf_counter after each optimizer
  step), divided by the steps in between. The precomputed runs' one pass over the data happens before step 1 and
  is not in it.
- peak memory: ru_maxrss of the worker process (peak RSS over its life, KiB on Linux). LoRA's live reference is the same model
  with adapters off, full's is a frozen copy: the difference between full live and full precomputed is that copy.
- the precompute pass: its wall time, and the number of training steps after which precomputing has paid for it.
The machine is shared: the four configurations run interleaved, `--repeats` rounds, and each keeps its best
(lowest) step time; the load average before and after is printed with the table.
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

ROOT = Path(__file__).resolve().parent.parent
PREFS = ROOT / "tuneforge" / "assets" / "example_prefs" / "train.jsonl"
RUNS = [("lora", False), ("lora", True), ("full", False), ("full", True)]


def worker(model_dir: str, out: str, method: str, precompute: bool, steps: int) -> None:
    """Runs inside the child: train and print one JSON line of timings."""
    import tuneforge.recipes.dpo as dpo
    import tuneforge.training.loop as loop
    from tuneforge.configs.schema import load_train_config
    from tuneforge.train import run_config

    ends, original, pass_s, original_pass = [], loop.Trainer.train_step, [], dpo.precompute

    def timed(self):
        out = original(self)
        ends.append(time.perf_counter())
        return out

    def timed_pass(*args, **kwargs):
        start = time.perf_counter()
        table = original_pass(*args, **kwargs)
        pass_s.append(time.perf_counter() - start)
        return table

    loop.Trainer.train_step = timed
    dpo.precompute = timed_pass
    cfg = load_train_config(str(ROOT / "examples" / "dpo_tiny.yaml"), [
        f"model.name_or_path={model_dir}", f"output_dir={out}", f"method={method}",
        f"dpo.precompute_reference={str(precompute).lower()}", f"training.max_steps={steps}",
        f"data.train=[{{path: {PREFS}, format: pairwise}}]", "data.eval=[]", "data.max_length=128",
        "training.batch_size=8", "training.save_steps=0", "training.eval_steps=0", "training.progress_bar=false",
        "training.plot_loss=false", "training.device=cpu"])
    run_config(cfg, log=lambda _: None)
    print(json.dumps({"step_s": (ends[-1] - ends[2]) / (len(ends) - 3), "pass_s": sum(pass_s)}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worker", nargs=5)
    args = ap.parse_args()
    if args.worker:
        model_dir, out, method, precompute, steps = args.worker
        return worker(model_dir, out, method, precompute == "1", int(steps))
    from tuneforge.models.presets import init_model

    tmp = Path(tempfile.mkdtemp())
    model_dir = init_model("tiny-llama", tmp / "model", hidden_size=args.hidden, layers=args.layers)
    load_before = os.getloadavg()[0]
    best: dict[tuple, tuple[dict, float]] = {}
    for round_ in range(args.repeats):  # interleaved: a burst of load on the shared machine hits every configuration
        for method, precompute in RUNS:
            result, rss = run_one(model_dir, tmp / f"round{round_}", method, precompute, args.steps)
            if (method, precompute) not in best or result["step_s"] < best[(method, precompute)][0]["step_s"]:
                best[(method, precompute)] = (result, rss)
    print(f"tiny-llama h{args.hidden} L{args.layers}, {args.steps} steps, batch 8 pairs, max_length 128, fp32, best of "
          f"{args.repeats} interleaved rounds, load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print("| method | reference | step s | live/precomputed step time | precompute pass s (pays off after) | peak RSS |")
    print("|---|---|---|---|---|---|")
    for (method, precompute), (result, rss) in best.items():
        live = best[(method, False)][0]["step_s"]
        ratio = f"**{live / result['step_s']:.2f}x**" if precompute else ""
        saved = live - result["step_s"]
        paid = f"{result['pass_s']:.2f} ({result['pass_s'] / saved:.1f} steps)" if precompute and saved > 0 else ""
        kind = "precomputed" if precompute else ("live (adapters off)" if method == "lora" else "live (frozen copy)")
        print(f"| {method} | {kind} | {result['step_s']:.3f} | {ratio} | {paid} | {rss:.0f} MiB |")


def run_one(model_dir, tmp: Path, method: str, precompute: bool, steps: int) -> tuple[dict, float]:
    """One configuration in a fresh process: (its timings, its peak RSS in MiB)."""
    cmd = [sys.executable, __file__, "--worker", str(model_dir), str(tmp / f"{method}{precompute}"), method,
           "1" if precompute else "0", str(steps)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    _, status, usage = os.wait4(proc.pid, 0)
    return json.loads(proc.stdout.read().strip().splitlines()[-1]), usage.ru_maxrss / 1024


if __name__ == "__main__":
    main()
