#!/usr/bin/env python3
"""`tuneforge estimate` against measured training peaks on CPU (fp32), through the product's own training step.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_estimate_cpu.py                      # the default grid (minutes)
    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_estimate_cpu.py --models tiny --variant product
    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_estimate_cpu.py --models smollm2 --shapes 1x512,4x512 --json out.json

Each setting (model, method, batch x seq, gradient checkpointing) runs in a fresh subprocess, one after the other:
the model goes through `training.setup.prepare_model` and every step is `training.loop.Trainer.train_step` (stage
sft, fp32, AdamW as training builds it, clipping, loss on every token: synthetic rows with no padding), --steps
optimizer steps (the first creates AdamW's state; the peak of the second is the steady one).

How memory is measured (and why): PyTorch's CPU allocator keeps no peak counter, and peak RSS mixes live tensors
with malloc's retained pages, oneDNN scratchpads and the interpreter. So the main figure is the CPU analogue of
`torch.cuda.max_memory_allocated`: `torch.profiler` with profile_memory=True reports every c10 CPU allocation and
free (bytes, timestamp); the running sum over the steps, plus the bytes of the parameters and buffers that exist
before the first step, gives the peak of live tensor bytes. It includes weights, gradients, AdamW states, saved
activations, logits and every temporary an aten kernel allocates through c10 (cross-entropy's buffers, fused
AdamW's); it excludes what oneDNN/MKL allocate themselves, Python objects and allocator slack. The second figure,
peak RSS growth (VmHWM reset through /proc/self/clear_refs just before the steps, glibc told to return big blocks
to the OS with MALLOC_MMAP_THRESHOLD_), plus the weights, includes all of that and the profiler's own event buffers.

--variant plain (default) runs what a GPU run would: PyTorch's own linear and RMSNorm (training.cpu_matmul: default,
fused_layers: never, padding_free: never, sdpa). --variant product runs `tuneforge train`'s CPU defaults (oneDNN
linears, fused RMSNorm/LoRA nodes, padding-free rows), whose saved tensors are CPU-specific.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

# a 4-layer Llama with grouped-query attention (~4.3M params, vocab 8000): fast enough for 8 x 1024 tokens on CPU
TINY = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
            vocab_size=8000, tie_word_embeddings=False, max_position_embeddings=4096, use_cache=False,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)
SMOLLM2 = "builtin:smollm2-135m-instruct"
DEFAULT_SHAPES = {"tiny": "4x512,8x1024", "smollm2": "1x512,4x512"}
VARIANTS = {"plain": {"cpu_matmul": "default", "fused_layers": "never", "padding_free": "never"},
            "product": {}}  # product: training's CPU defaults


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="tiny,smollm2", help="tiny and/or smollm2")
    p.add_argument("--methods", default="full,lora")
    p.add_argument("--shapes", default=None, help="BxS,... (default per model: " + str(DEFAULT_SHAPES) + ")")
    p.add_argument("--checkpointing", default="off,on")
    p.add_argument("--variant", choices=list(VARIANTS), default="plain")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--measured", default=None, help="a --json file of an earlier run: recompute the estimates "
                                                    "against its measurements (after an estimator change)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- child: one setting in its own process ----------------------------------------------------------------------

def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def reset_peak_rss() -> bool:
    try:  # Linux >= 4.0: resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def build(setting: dict, work: Path):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tuneforge.configs.schema import load_train_config
    from tuneforge.methods import get_method
    from tuneforge.models.loading import load_model_and_tokenizer
    from tuneforge.training.setup import prepare_model

    model_name = SMOLLM2 if setting["model"] == "smollm2" else str(work / "tiny")
    cfg = load_train_config(None, base={
        "stage": "sft", "method": setting["method"], "output_dir": str(work / "out"),
        "model": {"name_or_path": model_name, "attn_implementation": "sdpa"},
        "data": {"train": ["synthetic"], "max_length": setting["seq"]},
        "training": {"batch_size": setting["batch"], "max_steps": setting["steps"], "device": "cpu",
                     "precision": "fp32", "gradient_checkpointing": setting["checkpointing"],
                     "progress_bar": False, "plot_loss": False, "distributed": "none", "chunked_loss": "never",
                     **VARIANTS[setting["variant"]]},
        "lora": {"rank": setting["lora_rank"]},
    })
    torch.manual_seed(0)
    if setting["model"] == "smollm2":
        model, _ = load_model_and_tokenizer(cfg.model, torch.float32, "cpu")
    else:
        model = AutoModelForCausalLM.from_config(LlamaConfig(**TINY), dtype=torch.float32,
                                                 attn_implementation="sdpa")
    method = get_method(cfg.method)
    return cfg, prepare_model(cfg, model, method, torch.device("cpu")), method


def child(setting: dict) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from tuneforge.data.collate import collate
    from tuneforge.data.types import Encoded
    from tuneforge.training.loop import Trainer
    from tuneforge.training.runtime import setup_runtime

    with tempfile.TemporaryDirectory(prefix="tuneforge-bench-est-") as tmp:
        work = Path(tmp)
        if setting["model"] == "tiny":
            from transformers import LlamaConfig

            LlamaConfig(**TINY).save_pretrained(work / "tiny")
        cfg, model, method = build(setting, work)
        vocab = model.get_input_embeddings().num_embeddings
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(3, vocab, (setting["batch"] * setting["steps"], setting["seq"]), generator=gen).tolist()
        rows = [Encoded(r, list(r), source=f"synthetic-{i}") for i, r in enumerate(ids)]
        trainer = Trainer(cfg, setup_runtime("cpu", "fp32", "none"), model, method, rows, [],
                          lambda items: collate(items, 0), log=lambda _: None)
        live = list(model.parameters()) + list(model.buffers())
        base = storage_bytes(live)  # everything the c10 allocator holds for the model before the first step
        import gc

        gc.collect()
        reset = reset_peak_rss()
        rss_before = rss()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            for _ in range(setting["steps"]):
                trainer.train_step()
        rss_growth = peak_rss() - rss_before
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        current = peak = 0
        for e in sorted(events, key=lambda e: e.start_ns()):
            current += e.nbytes()
            peak = max(peak, current)
        opt = trainer.optimizer
        states = storage_bytes(v for s in opt.state.values() for v in s.values()
                               if torch.is_tensor(v) and v.numel() > 1)
        trainable = [p for p in model.parameters() if p.requires_grad]
        return {"weights": storage_bytes(model.parameters()), "base": base, "optimizer_states": states,
                "trainable": sum(p.numel() for p in trainable), "peak_tensors": base + peak,
                "peak_rss": base + rss_growth if reset else None}


# ---- parent: the grid, the estimates, the table -----------------------------------------------------------------

def estimated(setting: dict, work: Path) -> dict:
    from tuneforge.estimate.memory import EstimateArgs, estimate

    model = "smollm2-135m" if setting["model"] == "smollm2" else str(work / "tiny")
    args = EstimateArgs(model=model, method=setting["method"], batch_size=setting["batch"],
                        seq_len=setting["seq"], dtype="fp32", gradient_checkpointing=setting["checkpointing"],
                        lora_rank=setting["lora_rank"])
    c = estimate(args).columns[0]
    return {"est_before_activations": c.before_activations,
            "est_activations": c.activations_checkpointed if setting["checkpointing"] else c.activations,
            "est_total": c.total}


def run_child(setting: dict) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(setting)], capture_output=True,
                          text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{setting}: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def grid(args) -> list[dict]:
    out = []
    for model in args.models.split(","):
        for shape in (args.shapes or DEFAULT_SHAPES[model]).split(","):
            batch, seq = (int(x) for x in shape.lower().split("x"))
            for method in args.methods.split(","):
                for ckpt in args.checkpointing.split(","):
                    out.append(dict(model=model, method=method, batch=batch, seq=seq, checkpointing=ckpt == "on",
                                    variant=args.variant, steps=args.steps, lora_rank=args.lora_rank))
    return out


def render(rows: list[dict]) -> str:
    mb = 1e6
    lines = ["| model | method | batch x seq | ckpt | estimated MB | measured tensors MB | est/meas | "
             "measured RSS MB | est/RSS |", "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        rss_cells = (f"{r['peak_rss'] / mb:.0f} | {r['est_total'] / r['peak_rss']:.2f}" if r["peak_rss"]
                     else "- | -")
        ckpt = "on" if r["checkpointing"] else "off"
        lines.append(f"| {r['model']} | {r['method']} | {r['batch']}x{r['seq']} | {ckpt} | {r['est_total'] / mb:.0f} | "
                     f"{r['peak_tensors'] / mb:.0f} | {r['est_total'] / r['peak_tensors']:.2f} | {rss_cells} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        print(json.dumps(child(json.loads(args.child))))
        return 0
    rows = []
    measured = json.loads(Path(args.measured).read_text()) if args.measured else None
    with tempfile.TemporaryDirectory(prefix="tuneforge-bench-est-") as tmp:
        from transformers import LlamaConfig

        LlamaConfig(**TINY).save_pretrained(Path(tmp) / "tiny")
        for setting in measured or grid(args):
            row = {**setting, **(setting if measured else run_child(setting)), **estimated(setting, Path(tmp))}
            rows.append(row)
            if args.json:  # after every row: a long grid stopped halfway keeps what it measured
                Path(args.json).write_text(json.dumps(rows, indent=2))
            print(json.dumps({k: row[k] for k in ("model", "method", "batch", "seq", "checkpointing")})
                  + f" est {row['est_total'] / 1e6:.0f} MB, tensors {row['peak_tensors'] / 1e6:.0f} MB, "
                    f"rss {(row['peak_rss'] or 0) / 1e6:.0f} MB", flush=True)
    when = "measured earlier" if measured else f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    print(f"\n{when}, variant {rows[0]['variant'] if rows else args.variant}, {args.steps} steps\n")
    print(render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
