#!/usr/bin/env python3
"""DPO and GRPO training throughput of TuneForge against TRL 1.16's DPOTrainer / GRPOTrainer, same settings, CPU.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_vs_trl.py --models tiny,smollm2 --methods lora,full \
        --algos dpo,grpo --steps 8 --warmup 2 --repeats 2 --threads 1

What is the same on both sides: the model folder (`tuneforge init-model tiny-qwen2`, or builtin:smollm2-135m-instruct),
fp32 on CPU, the data (DPO: the bundled pairs tuneforge/assets/example_prefs/train.jsonl, each row as a user prompt
and an assistant reply; GRPO: the bundled prompts tuneforge/assets/example_prompts/train.jsonl), max length, batch,
steps, learning rate (cosine, no warmup), AdamW, gradient clipping at 1.0, beta, LoRA (rank 8, alpha 16, q/k/v/o,
no dropout) or full with a frozen reference copy. DPO: sigmoid loss, live reference (adapters off for LoRA).
GRPO: G completions per prompt (TRL's per-device batch = prompts x G, one generation per optimizer step), one update
per generation, temperature 1, no top-p/top-k, beta (k3 KL to the reference), loss_type dapo, group-scaled
advantages, the reward `examples.rl_rewards:digit_share` (varied even on a random model).

Each run is its own process (`--worker`), so imports and allocator state do not leak between variants; variants
run interleaved, `--repeats` rounds in rotating order, and the best round counts (the machine is shared: the load
average is printed). Timing: wall time from the end of optimizer step `--warmup` to the end of the last step
(perf_counter after each step: TuneForge's `Trainer.train_step`, TRL's `on_step_end` callback).

Tokens, counted the same way for both: the non-pad tokens (prompt + response) of the rows the policy is trained on,
per optimizer step. DPO: the 2B rows of chosen and rejected sequences (the prompt counts once per side). GRPO: the
B x G rows of prompt + sampled completion (the stop token included). tokens/s = those tokens over the timed steps /
the timed wall time; for GRPO it includes sampling, scoring, the reference pass and the update.

`--before` adds, for GRPO, TuneForge as before its lm_head change (the output layer over every rollout position
instead of only those that predict a completion token), to measure that change in the same run.

`--check` runs instead the loss sanity check: the DPO loss of both on the same 4 pairs with a policy moved away from
the reference (LoRA B matrices set to small random values), the token ids of both renderings, and for GRPO the first
step's loss under both normalisations (see bench/RESULTS.md for what it can and cannot show).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PREFS = ROOT / "tuneforge" / "assets" / "example_prefs" / "train.jsonl"
PROMPTS = ROOT / "tuneforge" / "assets" / "example_prompts" / "train.jsonl"
REWARD = "examples.rl_rewards:digit_share"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


# ---- TuneForge side ----------------------------------------------------------------------------------------------

def tuneforge_config(job: dict, out: str):
    from tuneforge.configs.schema import load_train_config

    common = [f"model.name_or_path={job['model_dir']}", f"output_dir={out}", f"method={job['method']}",
              "lora.rank=8", "lora.alpha=16", "lora.dropout=0.0", f"lora.target_modules=[{','.join(LORA_TARGETS)}]",
              f"data.max_length={job['max_length']}", "data.eval=[]", f"training.batch_size={job['batch']}",
              f"training.max_steps={job['steps']}", f"training.lr={job['lr']}", "training.scheduler=cosine",
              "training.warmup_steps=0", "training.max_grad_norm=1.0", "training.save_steps=0",
              "training.eval_steps=0", "training.progress_bar=false", "training.plot_loss=false",
              "training.device=cpu", "training.precision=fp32", "training.logging_steps=1", "seed=42",
              "training.padding_free=never"]  # TRL's default (padding_free=False): padded batches on both sides
    if job["algo"] == "dpo":
        return load_train_config(str(ROOT / "examples" / "dpo_tiny.yaml"), common + [
            f"data.train=[{{path: {PREFS}, format: pairwise}}]", "dpo.loss=sigmoid", f"dpo.beta={job['beta']}",
            "dpo.precompute_reference=false"])
    return load_train_config(str(ROOT / "examples" / "grpo_tiny.yaml"), common + [
        f"data.train=[{PROMPTS}]", f"grpo.reward={{'{REWARD}': 1.0}}", f"grpo.num_generations={job['G']}",
        f"grpo.max_new_tokens={job['max_new_tokens']}", "grpo.loss_type=dapo", f"grpo.beta={job['beta']}",
        "grpo.temperature=1.0", "grpo.top_p=1.0", "grpo.top_k=0", "grpo.epochs=1", "grpo.mini_batch_size=0",
        "grpo.scale_rewards=true", "grpo.advantage=group"])


def run_tuneforge(job: dict, out: str) -> dict:
    """Train with TuneForge's own recipe; per step: end time, policy tokens, loss. GRPO's step already reports its
    rollout's non-pad tokens (`tokens`); DPO's counts the longer side of each pair, so its batches are counted here."""
    import torch

    import tuneforge.training.loop as loop
    from tuneforge.losses import label_positions
    from tuneforge.recipes.dpo import DPOStage
    from tuneforge.train import run_config
    from tuneforge.training import rl
    from tuneforge.training.rl import RLTrainer

    steps, tokens = [], [0]
    trainer_class = RLTrainer if job["algo"] == "grpo" else loop.Trainer
    original_step, original_dpo = trainer_class.train_step, DPOStage.loss

    def timed_step(self):
        metrics = original_step(self)
        count = metrics["tokens"] if job["algo"] == "grpo" else tokens[0]
        steps.append({"end": time.perf_counter(), "tokens": count, "loss": metrics["loss"]})
        tokens[0] = 0
        return metrics

    def counted_dpo(self, model, batch):
        if model.training:
            tokens[0] += int(batch["attention_mask"].sum())
        return original_dpo(self, model, batch)

    trainer_class.train_step, DPOStage.loss = timed_step, counted_dpo
    if job.get("whole_logits"):  # GRPO as before the fix: lm_head over every position of the rollout
        rl.label_positions = lambda labels: None
    try:
        torch.manual_seed(0)
        run_config(tuneforge_config(job, out), log=lambda _: None)
    finally:  # the hooks go once the run ends (the smoke test runs this in the test process)
        trainer_class.train_step, DPOStage.loss = original_step, original_dpo
        rl.label_positions = label_positions
    return {"steps": steps}


# ---- TRL side ----------------------------------------------------------------------------------------------------

def trl_args(job: dict, out: str, config_class, **extra):
    return config_class(
        output_dir=out, per_device_train_batch_size=job["batch"], gradient_accumulation_steps=1,
        learning_rate=job["lr"], lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, max_steps=job["steps"], logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, bf16=False, fp16=False, seed=42, dataloader_num_workers=0, disable_dropout=True,
        model_init_kwargs={"dtype": "float32"}, **extra)


def trl_peft(job: dict):
    if job["method"] != "lora":
        return None
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")


def trl_pairs():
    from datasets import Dataset

    rows = [json.loads(line) for line in PREFS.read_text(encoding="utf-8").splitlines() if line.strip()]
    return Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                               "chosen": [{"role": "assistant", "content": r["chosen"]}],
                               "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])


def trl_prompts():
    from datasets import Dataset

    rows = [json.loads(line) for line in PROMPTS.read_text(encoding="utf-8").splitlines() if line.strip()]
    return Dataset.from_list([{"prompt": [m for m in r["messages"] if m["role"] != "assistant"]} for r in rows])


def trl_digit_share(completions, **_):
    """examples.rl_rewards.digit_share on TRL's conversational completions."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from examples.rl_rewards import digit_share

    return [digit_share(c[0]["content"] if isinstance(c, list) else c) for c in completions]


def build_trl(job: dict, out: str):
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
    if job["algo"] == "dpo":
        args = trl_args(job, out, DPOConfig, beta=job["beta"], max_length=job["max_length"], loss_type=["sigmoid"],
                        precompute_ref_log_probs=False)
        return DPOTrainer(model=job["model_dir"], args=args, train_dataset=trl_pairs(), processing_class=tokenizer,
                          peft_config=trl_peft(job))
    args = trl_args({**job, "batch": job["batch"] * job["G"]}, out, GRPOConfig, beta=job["beta"],
                    num_generations=job["G"], max_completion_length=job["max_new_tokens"], loss_type="dapo",
                    temperature=1.0, top_p=1.0, top_k=0, num_iterations=1, epsilon=0.2, scale_rewards="group",
                    steps_per_generation=1, log_completions=False)
    return GRPOTrainer(model=job["model_dir"], reward_funcs=[trl_digit_share], args=args,
                       train_dataset=trl_prompts(), processing_class=tokenizer, peft_config=trl_peft(job))


def run_trl(job: dict, out: str) -> dict:
    """Train with TRL's trainer; per step: end time, policy tokens, loss (from TRL's log)."""
    import torch
    from transformers import TrainerCallback

    torch.manual_seed(0)
    trainer = build_trl(job, out)
    steps, tokens = [], [0]
    original = trainer.compute_loss

    def counted(model, inputs, *args, **kwargs):
        if model.training:
            if job["algo"] == "dpo":
                tokens[0] += int(inputs["attention_mask"].sum())
            else:
                tokens[0] += int(inputs["prompt_mask"].sum() + inputs["completion_mask"].sum())
        return original(model, inputs, *args, **kwargs)

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps.append({"end": time.perf_counter(), "tokens": tokens[0]})
            tokens[0] = 0

    trainer.compute_loss = counted
    trainer.add_callback(Clock())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    for step, loss in zip(steps, losses):
        step["loss"] = loss
    return {"steps": steps}


# ---- the loss sanity check (--check) ------------------------------------------------------------------------------

def tuneforge_parts(job: dict, out: str):
    """TuneForge's model (method applied), tokenizer and encoded training items, as its recipes build them."""
    from tuneforge.training.setup import read_data, setup_data, setup_model, setup_run

    cfg = tuneforge_config(job, out)
    runtime = setup_run(cfg, log=lambda _: None)
    model, tokenizer, _ = setup_model(cfg, runtime)
    items, _, collate = setup_data(cfg, tokenizer, job["algo"], runtime, lambda _: None, read=read_data(cfg))
    return cfg, runtime, model, tokenizer, items, collate


def move_policy(model, method: str) -> None:
    """Move the policy away from the reference, so the losses compare more than log(2) at ratio 1."""
    import torch

    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and (method != "lora" or "lora_B" in name):
                p.add_(torch.randn(p.shape, generator=gen) * (0.02 if method == "lora" else 0.002))


def check_dpo(job: dict) -> dict:
    """Both DPO losses on the same 4 pairs: TuneForge's DPOStage on its batch, TRL's compute_loss on its batch."""
    from trl import DPOConfig, DPOTrainer

    from tuneforge.recipes.dpo import DPOStage
    from tuneforge.training.loop import accepts_logits_to_keep
    from tuneforge.training.reference import Reference

    cfg, _, model, tokenizer, items, collate = tuneforge_parts(job, tempfile.mkdtemp())
    reference = Reference(model)  # before moving the policy: a frozen copy for full, adapters off for LoRA
    move_policy(model, job["method"])
    model.eval()
    stage = DPOStage(cfg.dpo, reference)
    stage.logits_at_labels = accepts_logits_to_keep(model)
    picked = items[:4]
    rows = [int(item.source.rsplit(" ", 1)[-1]) - 1 for item in picked]  # "path:line N"
    tf_batch = collate(picked)
    tf_loss = float(stage.loss(model, tf_batch)[0].detach()) / len(picked)
    args = trl_args(job, tempfile.mkdtemp(), DPOConfig, beta=job["beta"], max_length=job["max_length"],
                    loss_type=["sigmoid"])
    args.model_init_kwargs = None
    trainer = DPOTrainer(model=model, ref_model=reference.copy, args=args, train_dataset=trl_pairs(),
                         processing_class=tokenizer)
    if "ref" in getattr(trainer.model, "peft_config", {}):  # TRL copies a pretrained adapter as the reference;
        trainer.model.delete_adapter("ref")                 # TuneForge's (and a fresh TRL run's) is adapters off
    trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in rows])
    trl_loss = float(trainer.compute_loss(trainer.model, trl_batch).detach())
    same_ids = all(a[m.bool()].tolist() == b[n.bool()].tolist() for a, m, b, n in zip(
        tf_batch["input_ids"], tf_batch["attention_mask"], trl_batch["input_ids"], trl_batch["attention_mask"]))
    return {"tuneforge": tf_loss, "trl": trl_loss, "same_token_ids": same_ids}


def check_grpo(job: dict) -> dict:
    """Both GRPO losses (dapo) on one TuneForge rollout: TuneForge's grpo_loss and TRL's _compute_loss, same rewards,
    the same moved policy and reference; also each side's advantages of the same rewards."""
    import torch
    from trl import GRPOConfig, GRPOTrainer
    from trl.trainer.utils import pad

    from tuneforge.losses import group_advantages, grpo_loss
    from tuneforge.recipes.grpo import GRPOStage
    from tuneforge.training.rl import policy_forward, sample

    cfg, runtime, model, tokenizer, items, _ = tuneforge_parts(job, tempfile.mkdtemp())
    stage = GRPOStage(cfg, model, tokenizer, runtime, log=lambda _: None)
    move_policy(model, job["method"])
    model.eval()
    G, prompts = job["G"], [p for p in items[:job["batch"]] for _ in range(job["G"])]
    roll = sample(stage.engine, prompts, cfg.grpo, list(range(len(prompts))), runtime.device)
    rewards, _ = stage.rewards.score(roll.texts, roll.completion_ids, roll.prompts)
    adv = group_advantages(rewards, G)
    batch = roll.rows(torch.arange(len(prompts)))
    logps, mask, _, _ = policy_forward(model, batch)
    total, count, _ = grpo_loss(logps, None, stage.reference.token_logps(batch), adv, mask, job["beta"], 0.2, None,
                                "dapo", job["max_new_tokens"])
    args = trl_args({**job, "batch": job["batch"] * G}, tempfile.mkdtemp(), GRPOConfig, beta=job["beta"],
                    num_generations=G, max_completion_length=job["max_new_tokens"], loss_type="dapo")
    args.model_init_kwargs = None
    trainer = GRPOTrainer(model=model, reward_funcs=[trl_digit_share], args=args, train_dataset=trl_prompts(),
                          processing_class=tokenizer)
    p_ids = [torch.tensor(p.input_ids) for p in prompts]
    c_ids = [torch.tensor(c) for c in roll.completion_ids]
    inputs = {"prompt_ids": pad(p_ids, padding_value=0, padding_side="left"),
              "prompt_mask": pad([torch.ones_like(t) for t in p_ids], padding_value=0, padding_side="left"),
              "completion_ids": pad(c_ids, padding_value=0, padding_side="right"),
              "completion_mask": pad([torch.ones_like(t) for t in c_ids], padding_value=0, padding_side="right")}
    grouped = rewards.reshape(-1, G)
    trl_adv = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).reshape(-1)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad(), trainer.model.disable_adapter() if job["method"] == "lora" else contextlib.nullcontext():
        ref_model = trainer.model if job["method"] == "lora" else trainer.ref_model
        ref = trainer._get_per_token_logps_and_entropies(ref_model, ids, att, inputs["completion_ids"].shape[1])[0]
    inputs.update(advantages=adv, ref_per_token_logps=ref, num_items_in_batch=inputs["completion_mask"].sum().float())
    trl_loss = float(trainer._compute_loss(trainer.model, inputs).detach())
    return {"tuneforge": float(total) / max(int(count), 1), "trl": trl_loss,
            "max_advantage_difference": float((adv - trl_adv).abs().max())}


def check(args, dirs: dict[str, str]) -> None:
    for model in dirs:
        for method in args.methods:
            for algo in args.algos:
                job = {"model": model, "method": method, "algo": algo, "model_dir": dirs[model],
                       **settings(args, algo)}
                found = (check_dpo if algo == "dpo" else check_grpo)(job)
                print(f"check {model} {method} {algo}: " + json.dumps(found), flush=True)


# ---- the comparison ----------------------------------------------------------------------------------------------

def summarise(result: dict, warmup: int) -> dict:
    steps = result["steps"]
    timed = steps[warmup:]
    seconds = timed[-1]["end"] - steps[warmup - 1]["end"] if warmup else float("nan")
    n_tokens = sum(s["tokens"] for s in timed)
    return {"tok_s": n_tokens / seconds, "s_step": seconds / len(timed), "tokens_step": n_tokens / len(timed),
            "first_loss": steps[0].get("loss"), "n_steps": len(steps)}


def worker(job: dict) -> None:
    """Inside the child process: one training run, then one JSON line."""
    out = tempfile.mkdtemp(prefix=f"bench_{job['framework']}_")
    result = (run_tuneforge if job["framework"] == "tuneforge" else run_trl)(job, out)
    print("RESULT " + json.dumps(summarise(result, job["warmup"])), flush=True)


def spawn(job: dict, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True,
                          cwd=ROOT, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"worker failed for {job}:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def model_dirs(names: list[str], tmp: Path) -> dict[str, str]:
    from tuneforge.models.builtin import resolve_builtin
    from tuneforge.models.presets import init_model

    found = {}
    for name in names:
        if name == "tiny":
            found[name] = str(init_model("tiny-qwen2", tmp / "tiny-qwen2"))
        elif name == "smollm2":
            found[name] = str(resolve_builtin("smollm2-135m-instruct"))
        else:
            raise SystemExit(f"unknown model {name!r}: tiny or smollm2")
    return found


def bench(args, dirs: dict[str, str]) -> list[dict]:
    variants = [dict(model=m, method=meth, algo=a) for m in dirs for meth in args.methods for a in args.algos]
    best: dict[tuple, dict] = {}
    loads = [os.getloadavg()[0]]
    for round_ in range(args.repeats):
        for i, v in enumerate(variants):
            frameworks = ["tuneforge", "trl"] + (["before"] if args.before and v["algo"] == "grpo" else [])
            frameworks = frameworks[(round_ + i) % len(frameworks):] + frameworks[:(round_ + i) % len(frameworks)]
            for framework in frameworks:  # the order rotates from round to round
                job = {**v, "framework": "tuneforge" if framework == "before" else framework,
                       "whole_logits": framework == "before", "model_dir": dirs[v["model"]],
                       **settings(args, v["algo"])}
                res = spawn(job, args.threads)
                loads.append(os.getloadavg()[0])
                key = (v["model"], v["method"], v["algo"], framework)
                print(f"round {round_ + 1} {key}: {res['tok_s']:.1f} tok/s, {res['s_step']:.3f} s/step, first loss "
                      f"{res['first_loss']}, load {loads[-1]:.1f}", flush=True)
                if key not in best or res["tok_s"] > best[key]["tok_s"]:
                    best[key] = res
    table(args, variants, best, loads)
    return [{"key": list(k), **v} for k, v in best.items()]


def settings(args, algo: str) -> dict:
    return {"steps": args.steps, "warmup": args.warmup, "batch": args.batch, "max_length": args.max_length,
            "lr": args.lr, "beta": args.dpo_beta if algo == "dpo" else args.grpo_beta, "G": args.G,
            "max_new_tokens": args.max_new_tokens}


def table(args, variants, best, loads) -> None:
    print(f"\n{args.steps} steps ({args.warmup} untimed), batch {args.batch} (DPO pairs / GRPO prompts x G={args.G}), "
          f"max_length {args.max_length}, max_new_tokens {args.max_new_tokens}, fp32, {args.threads} thread(s), best "
          f"of {args.repeats}; load average {min(loads):.1f}-{max(loads):.1f}")
    print("| model | method | algo | TuneForge tok/s | TRL tok/s | TuneForge / TRL | s/step TF / TRL | tokens/step "
          "TF / TRL | first loss TF / TRL |")
    print("|---|---|---|---:|---:|---:|---|---|---|")
    for v in variants:
        tf, trl = (best[(v["model"], v["method"], v["algo"], f)] for f in ("tuneforge", "trl"))
        print(f"| {v['model']} | {v['method']} | {v['algo']} | {tf['tok_s']:.1f} | {trl['tok_s']:.1f} | "
              f"**{tf['tok_s'] / trl['tok_s']:.2f}x** | {tf['s_step']:.2f} / {trl['s_step']:.2f} | "
              f"{tf['tokens_step']:.0f} / {trl['tokens_step']:.0f} | {fmt(tf['first_loss'])} / {fmt(trl['first_loss'])} |")
    for v in variants:
        before = best.get((v["model"], v["method"], v["algo"], "before"))
        if before:
            tf = best[(v["model"], v["method"], v["algo"], "tuneforge")]
            print(f"{v['model']} {v['method']} {v['algo']}: TuneForge with lm_head over whole rollouts (before the "
                  f"fix) {before['tok_s']:.1f} tok/s, {before['s_step']:.2f} s/step: the fix gives "
                  f"{tf['tok_s'] / before['tok_s']:.2f}x")


def fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny", type=lambda s: s.split(","), help="tiny,smollm2")
    ap.add_argument("--methods", default="lora", type=lambda s: s.split(","), help="lora,full")
    ap.add_argument("--algos", default="dpo,grpo", type=lambda s: s.split(","), help="dpo,grpo")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2, help="untimed first steps (at least 1)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4, help="DPO pairs / GRPO prompts per optimizer step")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--dpo-beta", type=float, default=0.1)
    ap.add_argument("--grpo-beta", type=float, default=0.04)
    ap.add_argument("--G", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--before", action="store_true",
                    help="GRPO also as before the lm_head fix (TuneForge with lm_head over whole rollouts)")
    ap.add_argument("--json", help="also write the best results here")
    ap.add_argument("--check", action="store_true", help="run the loss sanity check instead of the timing")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.warmup < 1 or args.steps <= args.warmup:
        ap.error("need 1 <= --warmup < --steps")
    return args


def main(argv=None) -> None:
    args = parse(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    dirs = model_dirs(args.models, Path(tempfile.mkdtemp(prefix="bench_vs_trl_")))
    if args.check:
        return check(args, dirs)
    results = bench(args, dirs)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
