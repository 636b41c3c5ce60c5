#!/usr/bin/env python3
"""LoRA SFT speed and memory: TuneForge against LLaMA-Factory 0.9.5 on the same model, data and settings.

    bash bench/setup_llamafactory.sh            # once: bench/.venv-llamafactory (LLaMA-Factory 0.9.5, CPU torch)
    .venv/bin/python bench/bench_lora_sft.py    # both models, both sides, back to back; prints the table

For each model (1. a `tuneforge init-model tiny-llama` model, widened to --tiny-hidden/--tiny-layers; 2. the
built-in SmolLM2-135M-Instruct, as the Hugging Face folder TuneForge caches) it runs `tuneforge train` and then
LLaMA-Factory's `run_exp` on the same model folder, the same rows (tuneforge/assets/example_task/train.jsonl,
converted to LLaMA-Factory's sharegpt/openai layout), the same max length, batch size, steps, LoRA rank/alpha/
targets/dropout, learning rate and precision; no gradient checkpointing, no packing, grad accum 1, no eval.
`--settings` picks what is compared (several in one run, comma-separated): `equal` (the above), `grouped` (the same
with length-grouped batches on both sides) and `own-defaults` (each tool as its README example runs LoRA SFT:
TuneForge's examples/quickstart.yaml, LLaMA-Factory's examples/train_lora/llama3_lora_sft.yaml; only the model, data,
step count and output folder replaced).

What is measured, identically on both sides (each side runs as its own process; this file is also that worker):
- tokens/s: non-pad tokens fed to the model (the sum of `attention_mask` in every training forward call, seen by a
  forward pre-hook on the model) divided by the wall time between the end of step `--warmup` and the end of the
  last step (perf_counter at each optimizer step's end). Model load, data preparation and the first `--warmup`
  steps are excluded. The two sides render the chat rows with their own templates and shuffle differently, so
  their token counts differ a little; counting each side's real tokens keeps the rate fair.
- peak memory: ru_maxrss of the worker process (os.wait4), i.e. the peak RSS over its whole life (imports, model
  load, data prep and training). The RSS peak reached before training starts is printed too.
- hardware efficiency (MFU): TuneForge's model FLOPs per real token (training/flops.py, from its metrics.jsonl) x
  each side's tokens/s, over the peak TuneForge measured. Where LLaMA-Factory trains another LoRA rank
  (own-defaults), its count differs by 6 FLOPs per token per extra adapter weight, added here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
LF_VENV = BENCH / ".venv-llamafactory"
TASK = ROOT / "tuneforge" / "assets" / "example_task" / "train.jsonl"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


# ==== worker side (runs inside the TuneForge venv or the LLaMA-Factory venv; stdlib imports at top only) ==========
class StepRecorder:
    """Counts non-pad tokens of every training forward call and timestamps the end of each optimizer step."""

    def __init__(self):
        self.pending_tokens = 0
        self.pending_positions = 0  # input positions including padding (the work actually done)
        self.pending_forwards = 0
        self.mask_missing = 0
        self.steps: list[dict] = []
        self.rss_train_start_kib = None
        self.hooked = False

    def hook(self, model) -> None:
        if self.hooked:
            return
        self.hooked = True
        self.rss_train_start_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

        def pre_hook(module, args, kwargs):
            if not module.training:
                return None
            mask = kwargs.get("attention_mask")
            ids = kwargs.get("input_ids", args[0] if args else None)
            self.pending_positions += int(ids.numel()) if ids is not None else 0
            if mask is not None:
                self.pending_tokens += int(mask.sum().item())
            else:  # no 2D mask: count every input position; padding-free rows (position ids) hold no padding,
                self.pending_tokens += int(ids.numel()) if ids is not None else 0  # anything else is flagged
                self.mask_missing += kwargs.get("position_ids") is None
            self.pending_forwards += 1
            return None

        model.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def step_end(self) -> None:
        self.steps.append({"t": time.perf_counter(), "tokens": self.pending_tokens,
                           "positions": self.pending_positions, "forwards": self.pending_forwards})
        self.pending_tokens = self.pending_positions = self.pending_forwards = 0

    def dump(self, path: Path, extra: dict) -> None:
        import torch

        data = {"steps": self.steps, "mask_missing": self.mask_missing,
                "rss_train_start_kib": self.rss_train_start_kib,
                "rss_end_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                "torch": torch.__version__, "threads": torch.get_num_threads(), **extra}
        path.write_text(json.dumps(data, indent=1), encoding="utf-8")


def worker_tuneforge(config: Path, record: Path) -> int:
    import tuneforge
    from tuneforge import cli
    from tuneforge.training import loop

    rec = StepRecorder()
    original_train = loop.Trainer.train
    original_step = loop.Trainer.train_step

    def train(self, *a, **k):  # model loaded, data encoded, optimizer built: hook the model as training starts
        rec.hook(self.model)
        return original_train(self, *a, **k)

    def train_step(self, *a, **k):
        out = original_step(self, *a, **k)
        rec.step_end()
        return out

    loop.Trainer.train = train
    loop.Trainer.train_step = train_step
    rc = cli.main(["train", str(config)])
    import peft
    import transformers

    rec.dump(record, {"side": "tuneforge", "version": getattr(tuneforge, "__version__", "?"),
                      "transformers": transformers.__version__, "peft": peft.__version__})
    return rc or 0


def worker_llamafactory(config: Path, record: Path) -> int:
    import llamafactory
    import yaml
    from llamafactory.train.tuner import run_exp
    from transformers import TrainerCallback

    rec = StepRecorder()
    info: dict = {}

    class Recorder(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            rec.hook(model)
            info["optim"] = str(args.optim)

        def on_step_end(self, args, state, control, **kwargs):
            rec.step_end()

    run_exp(args=yaml.safe_load(config.read_text(encoding="utf-8")), callbacks=[Recorder()])
    import peft
    import transformers

    rec.dump(record, {"side": "llamafactory", "version": llamafactory.__version__,
                      "transformers": transformers.__version__, "peft": peft.__version__, **info})
    return 0


# ==== driver side ====================================================================================================
def run_measured(cmd: list[str], log: Path, env: dict) -> tuple[int, int, float]:
    """Run cmd with output to log; return (exit code, peak RSS in KiB of that process, wall seconds)."""
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss, time.perf_counter() - t0


def rate(record: dict, warmup: int) -> dict:
    steps = record["steps"]
    if len(steps) <= warmup:
        raise RuntimeError(f"only {len(steps)} steps recorded; need more than --warmup {warmup}")
    window = steps[warmup:]
    seconds = window[-1]["t"] - steps[warmup - 1]["t"] if warmup > 0 else None
    if seconds is None:
        raise RuntimeError("--warmup must be at least 1 (the first step has no start timestamp)")
    tokens = sum(s["tokens"] for s in window)
    positions = sum(s["positions"] for s in window)
    return {"tokens": tokens, "pad_share": 1 - tokens / max(positions, 1), "seconds": seconds, "tokens_per_s": tokens / seconds, "steps": len(window),
            "s_per_step": seconds / len(window), "forwards": sum(s["forwards"] for s in window)}


def write_task_for_llamafactory(folder: Path) -> None:
    rows = [json.loads(line) for line in TASK.read_text(encoding="utf-8").splitlines() if line.strip()]
    data = [{"messages": [{"role": m["role"], "content": m["content"]} for m in row["messages"]]} for row in rows]
    (folder / "bench_task.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    info = {"bench_task": {"file_name": "bench_task.json", "formatting": "sharegpt",
                           "columns": {"messages": "messages"},
                           "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                    "assistant_tag": "assistant", "system_tag": "system"}}}
    (folder / "dataset_info.json").write_text(json.dumps(info, indent=1), encoding="utf-8")


def tuneforge_config(model_dir: Path, out: Path, a) -> dict:
    return {
        "stage": "sft", "method": "lora", "output_dir": str(out), "seed": a.seed,
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": [{"path": str(TASK), "format": "openai"}], "max_length": a.max_length,
                 "packing": False, "eval_ratio": 0.0, "group_by_length": a.group_by_length},
        "lora": {"rank": a.rank, "alpha": a.alpha, "dropout": 0.0, "target_modules": TARGETS},
        "training": {"lr": a.lr, "scheduler": "cosine", "warmup_steps": 0, "batch_size": a.batch_size,
                     "grad_accum": 1, "max_steps": a.steps, "precision": a.precision, "max_grad_norm": 1.0,
                     "gradient_checkpointing": False, "logging_steps": 1, "eval_steps": 0, "save_steps": 0,
                     "device": "cpu", "plot_loss": False, "progress_bar": False, "cpu_matmul": a.tf_cpu_matmul},
    }


def quickstart_config() -> dict:
    """examples/quickstart.yaml as a dict (TuneForge's side of the own-defaults setting)."""
    import yaml

    return yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text(encoding="utf-8"))


def tuneforge_own_defaults(model_dir: Path, out: Path, a) -> dict:
    """examples/quickstart.yaml (TuneForge's README example of LoRA SFT) with the model, data, steps and output
    replaced and the per-step logging the benchmark reads."""
    cfg = quickstart_config()
    cfg.update({"output_dir": str(out), "seed": a.seed, "model": {"name_or_path": str(model_dir)}})
    cfg["data"]["train"] = [{"path": str(TASK), "format": "openai"}]
    cfg["training"].update({"max_steps": a.steps, "logging_steps": 1, "eval_steps": 0, "save_steps": 0,
                            "device": "cpu", "plot_loss": False, "progress_bar": False})
    return cfg


# LLaMA-Factory 0.9.5 examples/train_lora/llama3_lora_sft.yaml, its training settings as they are (the dataset,
# model and output are the benchmark's; num_train_epochs gives way to max_steps; preprocessing_num_workers 16 -> 1
# changes only the data preparation, which is not timed)
LF_OWN_DEFAULTS = {
    "finetuning_type": "lora", "lora_rank": 8, "lora_target": "all", "cutoff_len": 2048,
    "per_device_train_batch_size": 1, "gradient_accumulation_steps": 8, "learning_rate": 1.0e-4,
    "lr_scheduler_type": "cosine", "warmup_ratio": 0.1, "bf16": True, "dataloader_num_workers": 4,
    "logging_steps": 10, "plot_loss": True,
}


def llamafactory_own_defaults(model_dir: Path, template: str, default_system: str | None, data_dir: Path, out: Path,
                              a) -> dict:
    cfg = llamafactory_config(model_dir, template, default_system, data_dir, out, a)
    for key in ("lora_alpha", "lora_dropout", "max_grad_norm", "warmup_steps", "disable_gradient_checkpointing",
                "train_sampling_strategy", "flash_attn"):
        cfg.pop(key, None)  # LLaMA-Factory's own defaults for these
    return {**cfg, **LF_OWN_DEFAULTS}


def llamafactory_config(model_dir: Path, template: str, default_system: str | None, data_dir: Path, out: Path,
                        a) -> dict:
    cfg = {
        "model_name_or_path": str(model_dir), "trust_remote_code": False,
        "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_rank": a.rank, "lora_alpha": a.alpha, "lora_dropout": 0.0, "lora_target": ",".join(TARGETS),
        "dataset_dir": str(data_dir), "dataset": "bench_task", "template": template, "cutoff_len": a.max_length,
        "packing": False, "overwrite_cache": True, "preprocessing_num_workers": 1, "val_size": 0.0,
        "output_dir": str(out), "logging_steps": 1, "save_strategy": "no",
        "plot_loss": False, "report_to": "none", "disable_tqdm": True,
        "per_device_train_batch_size": a.batch_size, "gradient_accumulation_steps": 1, "max_steps": a.steps,
        "learning_rate": a.lr, "lr_scheduler_type": "cosine", "warmup_steps": 0, "max_grad_norm": 1.0,
        "disable_gradient_checkpointing": True, "use_cpu": True, "seed": a.seed, "dataloader_num_workers": 0,
        "flash_attn": "sdpa",  # transformers 5 renamed group_by_length to train_sampling_strategy
        "train_sampling_strategy": "group_by_length" if a.group_by_length else "random",
    }
    if a.precision == "bf16":
        cfg["bf16"] = True
    if default_system is not None:
        cfg["default_system"] = default_system
    return cfg


def prepare_tiny(work: Path, a, env: dict) -> Path:
    out = work / "tiny-llama"
    cmd = [str(ROOT / ".venv" / "bin" / "tuneforge"), "init-model", "tiny-llama", "--out", str(out),
           "--hidden-size", str(a.tiny_hidden), "--layers", str(a.tiny_layers)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode != 0:
        # `tuneforge init-model` must take --hidden-size/--layers; if the CLI refuses them, build the same model
        # through the function the verb calls, and say so (a TuneForge CLI bug, not a benchmark setting).
        print(f"note: `{' '.join(cmd[1:])}` failed: {(result.stderr or result.stdout).strip().splitlines()[-1]}"
              f"\n      building the same model through tuneforge.models.presets.init_model instead", flush=True)
        code = ("import sys; from tuneforge.models.presets import init_model; "
                "init_model('tiny-llama', sys.argv[1], hidden_size=int(sys.argv[2]), layers=int(sys.argv[3]))")
        subprocess.run([a.tuneforge_python, "-c", code, str(out), str(a.tiny_hidden), str(a.tiny_layers)],
                       check=True, env=env, cwd=ROOT, capture_output=True)
    return out


def prepare_smollm2(a, env: dict) -> Path:
    code = "from tuneforge.models.builtin import ensure_smollm2; print(ensure_smollm2())"
    result = subprocess.run([a.tuneforge_python, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                            check=True)
    return Path(result.stdout.strip().splitlines()[-1])


def smollm2_system(model_dir: Path) -> str | None:
    """SmolLM2's own chat template adds a default system turn; give LLaMA-Factory's smollm2 template exactly the
    same text so both sides train on the same token sequences."""
    template = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template", "")
    marker = "<|im_start|>system\n"
    if marker in template:
        return template.split(marker, 1)[1].split("<|im_end|>", 1)[0]
    return None


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,smollm2", help="comma list of: tiny, smollm2")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per side (tiny model)")
    p.add_argument("--smollm2-steps", type=int, default=20, help="optimizer steps per side (SmolLM2-135M)")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the rate")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--settings", default="equal",
                   help="comma list of: equal (same settings on both sides), grouped (equal + length-grouped "
                        "batches), own-defaults (each tool's README example settings)")
    p.add_argument("--group-by-length", action="store_true", help="the same as --settings grouped")
    p.add_argument("--tiny-hidden", type=int, default=256)
    p.add_argument("--tiny-layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=0,
                   help="torch/OpenMP threads for both sides (0: torch's default, one per core). On a machine "
                        "shared with other work, 1 gives far steadier numbers: with every core in use, one busy "
                        "core stalls each multi-threaded op")
    p.add_argument("--order", choices=["tf-first", "lf-first"], default="tf-first",
                   help="which side runs first for each model")
    p.add_argument("--tf-cpu-matmul", choices=["auto", "onednn", "default"], default="auto",
                   help="TuneForge's training.cpu_matmul (default: PyTorch's MKL sgemm, as before oneDNN)")
    p.add_argument("--keep", action="store_true", help="keep the temp folder (configs, logs, per-step records)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--worker", choices=["tuneforge", "llamafactory"], help=argparse.SUPPRESS)
    p.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--record", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker == "tuneforge":
        return worker_tuneforge(a.config, a.record)
    if a.worker == "llamafactory":
        return worker_llamafactory(a.config, a.record)

    a.tuneforge_python = str(ROOT / ".venv" / "bin" / "python")
    lf_python = LF_VENV / "bin" / "python"
    if not lf_python.exists():
        print(f"{lf_python} is missing: run `bash bench/setup_llamafactory.sh` first.", file=sys.stderr)
        return 2
    if not TASK.exists():
        print(f"{TASK} is missing (the bundled task file).", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="tf-bench-lora-"))
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "HF_DATASETS_CACHE": str(work / "hf_datasets"), "TOKENIZERS_PARALLELISM": "false",
                "WANDB_DISABLED": "true", "DISABLE_VERSION_CHECK": "1", "PYTHONUNBUFFERED": "1"})
    if a.threads > 0:
        env.update({"OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)})
    print(f"work dir {work}; load average {load_avg()}; {os.cpu_count()} CPUs", flush=True)
    if a.threads == 0 and os.getloadavg()[0] > 0.5:
        print("warning: the machine is busy (load average above 0.5) and each side uses every core; timings will "
              "be noisy. Consider --threads 1.", flush=True)
    refresh_peaks(a.tuneforge_python, env)
    data_dir = work / "lf_data"
    data_dir.mkdir()
    write_task_for_llamafactory(data_dir)

    models = []
    for name in [m.strip() for m in a.models.split(",") if m.strip()]:
        if name == "tiny":
            d = prepare_tiny(work, a, env)
            models.append((f"tiny-llama h{a.tiny_hidden} L{a.tiny_layers}", d, "llama3", None, a.steps))
        elif name == "smollm2":
            d = prepare_smollm2(a, env)
            models.append(("SmolLM2-135M-Instruct", d, "smollm2", smollm2_system(d), a.smollm2_steps))
        else:
            p.error(f"unknown model {name!r}")

    settings = ["grouped"] if a.group_by_length else [x.strip() for x in a.settings.split(",") if x.strip()]
    unknown = set(settings) - set(SETTINGS)
    if unknown:
        p.error(f"unknown --settings {sorted(unknown)}; choose from {', '.join(SETTINGS)}")
    results = []
    for setting, (label, model_dir, template, system, steps) in [(x, m) for x in settings for m in models]:
        sides = ["tuneforge", "llamafactory"] if a.order == "tf-first" else ["llamafactory", "tuneforge"]
        row = {"setting": setting, "model": label, "model_dir": str(model_dir), "steps": steps}
        for side in sides:
            tag = f"{setting}-{label.split()[0]}-{side}"
            out = work / f"out-{tag}"
            cfg_path = work / f"{tag}.yaml"
            record = work / f"{tag}.record.json"
            local = argparse.Namespace(**{**vars(a), "steps": steps, "group_by_length": setting == "grouped"})
            cfg = side_config(side, setting, model_dir, template, system, data_dir, out, local)
            # JSON is YAML: `tuneforge train` reads it as is, and the driver needs only the standard library
            cfg_path.write_text(json.dumps(cfg, indent=1, ensure_ascii=False), encoding="utf-8")
            python = a.tuneforge_python if side == "tuneforge" else str(lf_python)
            cmd = [python, str(Path(__file__).resolve()), "--worker", side, "--config", str(cfg_path),
                   "--record", str(record)]
            before = load_avg()
            print(f"[{label}] {side}: {steps} steps ... (load {before})", flush=True)
            rc, peak_kib, wall = run_measured(cmd, work / f"{tag}.log", env)
            if rc != 0 or not record.exists():
                tail = (work / f"{tag}.log").read_text(encoding="utf-8", errors="replace").splitlines()[-25:]
                print(f"[{label}] {side} FAILED (exit {rc}); log {work / f'{tag}.log'}:\n  " + "\n  ".join(tail))
                a.keep = True
                return 1
            r = side_result(json.loads(record.read_text(encoding="utf-8")), a.warmup, peak_kib, wall, before,
                            out if side == "tuneforge" else None)
            row[side] = r
            print(f"[{label}] {side}: {r['tokens_per_s']:.0f} tok/s ({r['tokens']} tokens in {r['seconds']:.2f} s,"
                  f" {r['s_per_step']:.3f} s/step), peak RSS {r['peak_rss_mib']:.0f} MiB, process {wall:.0f} s",
                  flush=True)
        row["speed_ratio"] = row["tuneforge"]["tokens_per_s"] / row["llamafactory"]["tokens_per_s"]
        row["rss_ratio"] = row["tuneforge"]["peak_rss_mib"] / row["llamafactory"]["peak_rss_mib"]
        add_mfu(row, model_dir)
        results.append(row)

    described = (f"equal: TuneForge training.cpu_matmul={a.tf_cpu_matmul}; LoRA r={a.rank} alpha={a.alpha:g} dropout=0 "
                 f"on {','.join(TARGETS)}; batch {a.batch_size}, grad accum 1, max_length {a.max_length}, "
                 f"{a.precision}, lr {a.lr:g} cosine, no packing, no gradient checkpointing (grouped: the same with "
                 f"length-grouped batches on both sides; own-defaults: examples/quickstart.yaml vs "
                 f"llama3_lora_sft.yaml); rate over steps {a.warmup + 1}..N")
    print_results(results, described)
    if a.json:
        a.json.write_text(json.dumps({"settings": described, "results": results}, indent=1), encoding="utf-8")
    if a.keep:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def refresh_peaks(python: str, env: dict) -> None:
    """Probe this CPU's matmul peaks now (fp32 and bf16, the bench's thread count), so both sides' MFU is measured
    against today's figure, not one cached on a busier day (the cache keeps the better of the two)."""
    code = ("import torch; from tuneforge.training import flops; "
            "print(' '.join(f'{d}: {flops.refresh_cpu_peak(d, seconds=1.0) / 1e9:.0f}' "
            "for d in (torch.float32, torch.bfloat16)))")
    out = subprocess.run([python, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True)
    print(f"CPU matmul peaks, GFLOP/s (probed now, or better cached): {out.stdout.strip() or out.stderr[-500:]}",
          flush=True)


def side_result(rec: dict, warmup: int, peak_kib: int, wall: float, before: str, tf_out: Path | None) -> dict:
    """One side's rate, memory and versions from its worker record; for TuneForge (`tf_out`) also its own logged
    rate, MFU, model FLOPs per token and the peak its meter used."""
    r = rate(rec, warmup)
    r.update({"peak_rss_mib": peak_kib / 1024, "rss_before_train_mib": (rec["rss_train_start_kib"] or 0) / 1024,
              "process_wall_s": wall, "threads": rec["threads"], "mask_missing": rec["mask_missing"],
              "version": rec["version"], "transformers": rec["transformers"], "peft": rec["peft"],
              "torch": rec["torch"], "optim": rec.get("optim", "torch.optim.AdamW"),
              "load_before": before, "load_after": load_avg()})
    if tf_out is not None:
        metrics = [json.loads(x) for x in (tf_out / "metrics.jsonl").read_text().splitlines() if x.strip()]
        own = [m for m in metrics if "tokens_per_s" in m]
        r["own_tokens_per_s_last"] = own[-1]["tokens_per_s"] if own else None
        r["mfu_last"] = own[-1].get("mfu") if own else None
        if own and own[-1].get("mfu"):  # the model FLOPs per token and the peak TuneForge's meter used
            r["flops_per_token"] = own[-1]["model_tflops"] * 1e12 / own[-1]["tokens_per_s"]
            r["peak_flops"] = own[-1]["model_tflops"] * 1e12 / own[-1]["mfu"]
    return r


def print_results(results: list[dict], described: str) -> None:
    print("\n" + described)
    head = (f"| {'setting':<12} | {'model':<24} | {'steps':>5} | {'TF tok/s':>9} | {'LF tok/s':>9} | "
            f"{'TF/LF tok/s':>11} | {'TF MFU':>6} | {'LF MFU':>6} | {'TF peak RSS':>11} | {'LF peak RSS':>11} | "
            f"{'TF/LF RSS':>9} |")
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for row in results:
        tf, lf = row["tuneforge"], row["llamafactory"]
        print(f"| {row['setting']:<12} | {row['model']:<24} | {row['steps']:>5} | {tf['tokens_per_s']:>9.0f} | "
              f"{lf['tokens_per_s']:>9.0f} | "
              f"{row['speed_ratio']:>10.2f}x | {percent(tf.get('mfu')):>6} | {percent(lf.get('mfu')):>6} | "
              f"{tf['peak_rss_mib']:>7.0f} MiB | {lf['peak_rss_mib']:>7.0f} MiB | "
              f"{row['rss_ratio']:>8.2f}x |")
    print("\ndetails (per side: non-pad tokens / seconds / s per step / share of padded positions / RSS peak before "
          "training / threads):")
    for row in results:
        for side in ("tuneforge", "llamafactory"):
            r = row[side]
            own = (f"; its own metrics.jsonl tokens_per_s (all steps) {r['own_tokens_per_s_last']:.0f}"
                   if r.get("own_tokens_per_s_last") else "")
            own += f", mfu {r['mfu_last']:.1%}" if r.get("mfu_last") else ""
            print(f"  {row['setting']:<12} {row['model']:<24} {side:<12} {r['tokens']:>6} tok / {r['seconds']:6.2f} s / "
                  f"{r['s_per_step']:.3f} s/step / pad {100 * r['pad_share']:.0f}% / {r['rss_before_train_mib']:.0f} MiB "
                  f"before train / "
                  f"{r['threads']} threads; {side} {r['version']}, transformers {r['transformers']}, peft "
                  f"{r['peft']}, torch {r['torch']}, optimizer {r['optim']}; load {r['load_before']} -> "
                  f"{r['load_after']}{own}" + (f"; WARNING: {r['mask_missing']} forwards without attention_mask"
                                               if r["mask_missing"] else ""))
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average now {load_avg()}")


SETTINGS = ("equal", "grouped", "own-defaults")


def side_config(side: str, setting: str, model_dir: Path, template: str, system: str | None, data_dir: Path,
                out: Path, a) -> dict:
    if side == "tuneforge":
        return tuneforge_own_defaults(model_dir, out, a) if setting == "own-defaults" else \
            tuneforge_config(model_dir, out, a)
    if setting == "own-defaults":
        return llamafactory_own_defaults(model_dir, template, system, data_dir, out, a)
    return llamafactory_config(model_dir, template, system, data_dir, out, a)


def add_mfu(row: dict, model_dir: Path) -> None:
    """Hardware efficiency of both sides over the timed steps: the same model, data and settings need the same model
    FLOPs per real token (TuneForge's count, training/flops.py), so each side's MFU is that x its own tokens/s over
    the peak TuneForge measured (the faster of MKL and oneDNN on CPU). own-defaults: the two sides train LoRA of
    different ranks on every linear layer; each adapter weight costs 6 FLOPs per token (forward, backward, gradient)."""
    tf = row["tuneforge"]
    if not (tf.get("flops_per_token") and tf.get("peak_flops")):
        return
    lf_flops = tf["flops_per_token"]
    if row["setting"] == "own-defaults":
        tf_rank = quickstart_config()["lora"]["rank"]
        lf_flops += 6 * all_linear_adapter_weights(model_dir, LF_OWN_DEFAULTS["lora_rank"] - tf_rank)
    row["tuneforge"]["mfu"] = tf["flops_per_token"] * tf["tokens_per_s"] / tf["peak_flops"]
    row["llamafactory"]["mfu"] = lf_flops * row["llamafactory"]["tokens_per_s"] / tf["peak_flops"]


def all_linear_adapter_weights(model_dir: Path, rank: int) -> int:
    """LoRA weights of `rank` on every projection of the decoder: rank x (in + out) each (A and B)."""
    c = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    h, inter, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    head_dim = c.get("head_dim") or h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * head_dim, c.get("num_key_value_heads", c["num_attention_heads"]) * head_dim
    per_layer = (h + q) + 2 * (h + kv) + (q + h) + 2 * (h + inter) + (inter + h)
    return rank * per_layer * layers


def percent(value) -> str:
    return f"{value:.1%}" if value is not None else "-"


if __name__ == "__main__":
    sys.exit(main())
