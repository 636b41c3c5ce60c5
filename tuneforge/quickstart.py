"""`tuneforge quickstart`: a real fine-tune in a few minutes on CPU, with answers and accuracy before and after.

    tuneforge quickstart                      # SmolLM2-135M-Instruct, LoRA, the bundled bilingual task
    tuneforge quickstart --model DIR --steps 5   # any local model (the tests use a tiny one)

It trains through the same `tuneforge train` path as any config (examples/quickstart.yaml), then compares greedy
answers of the base model and of the base model + the saved LoRA adapter on held-out questions whose phrasing was
never seen in training.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from tuneforge.configs.typed import opt
from tuneforge.data.example_task import exact_match, generate_example_task
from tuneforge.errors import UserError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
QUICKSTART_FAMILIES = ("identity", "units")  # learnable by a 135M model in a couple of minutes on 2 CPU cores


@dataclass
class QuickstartArgs:
    model: str = opt("builtin:smollm2-135m-instruct", "Model to fine-tune (local folder, hub id or builtin:...).")
    output_dir: str = opt("outputs/quickstart", "Where the data, adapter, metrics and loss plot go.")
    steps: int = opt(0, "Optimizer steps (0: the number in examples/quickstart.yaml).")
    heldout: int = opt(40, "How many held-out questions to score before and after.")
    show: int = opt(6, "How many held-out answers to print side by side.")
    precision: str = opt("auto", "fp32, bf16, or auto (bf16 where the CPU/GPU computes it natively, else fp32).")


def make_task(out_dir: Path, n_heldout: int) -> tuple[Path, list[dict]]:
    """Generate the bilingual task (our own generator; held-out questions use unseen phrasings and values)."""
    paths = generate_example_task(out_dir, families=QUICKSTART_FAMILIES, n_train=600, n_heldout=n_heldout, seed=0)
    rows = [json.loads(line) for line in paths["heldout"].read_text(encoding="utf-8").splitlines() if line.strip()]
    return paths["train"], rows


def score(model, tokenizer, rows: list[dict]) -> tuple[float, list[str]]:
    from tuneforge.inference import generate_replies

    prompts = [[m for m in r["messages"] if m["role"] != "assistant"] for r in rows]
    replies = generate_replies(model, tokenizer, prompts, max_new_tokens=32, batch_size=16)
    correct = sum(exact_match(reply, r["answer"]) for reply, r in zip(replies, rows))
    return correct / max(len(rows), 1), replies


def show_table(rows, before, after, n: int) -> None:
    for r, b, a in list(zip(rows, before, after))[:n]:
        question = next(m["content"] for m in r["messages"] if m["role"] == "user")
        print(f"\nQ: {question}\n   expected: {r['answer']}")
        print(f"   before:   {b.strip()[:100]!r} {'OK' if exact_match(b, r['answer']) else 'x'}")
        print(f"   after:    {a.strip()[:100]!r} {'OK' if exact_match(a, r['answer']) else 'x'}")


def quickstart_cli(args: QuickstartArgs) -> int:
    from tuneforge.configs.schema import load_train_config
    from tuneforge.methods import get_method
    from tuneforge.models.loading import load_model_and_tokenizer
    from tuneforge.train import run_config

    bad = [f"--{name} {value}" for name, value, least in (("steps", args.steps, 0), ("heldout", args.heldout, 1),
                                                           ("show", args.show, 0)) if value < least]
    if bad:  # -1 steps ran the full default, 0 held-out questions scored "0.0%" of nothing
        raise UserError(f"{', '.join(bad)}: --steps and --show must be at least 0 (0 steps: the example config's "
                        f"count), --heldout at least 1.")
    # the quickstart owns its folder: a rerun starts over (its generated data/ is this run's input and is kept)
    overrides = [f"model.name_or_path={args.model}", f"output_dir={args.output_dir}", "overwrite_output_dir=true",
                 f"training.precision={args.precision}"]
    if args.steps:
        overrides.append(f"training.max_steps={args.steps}")
    train_file, rows = make_task(Path(args.output_dir) / "data", args.heldout)
    overrides.append(f"data.train=[{train_file}]")
    cfg = load_train_config(str(EXAMPLES / "quickstart.yaml"), overrides)
    t0 = time.perf_counter()
    base, tokenizer = load_model_and_tokenizer(cfg.model)
    print(f"Scoring {len(rows)} held-out questions with the base model...")
    acc_before, before = score(base, tokenizer, rows)
    print(f"held-out exact match before: {acc_before:.1%}")
    print(f"\nFine-tuning with {cfg.method} for {cfg.training.max_steps} steps on {cfg.data.train[0].path} ...")
    result = run_config(cfg)
    if not result.finished:  # SIGINT/SIGTERM: a checkpoint was written, but there is no final adapter to score
        print(f"\nquickstart stopped after step {result.steps} of {cfg.training.max_steps}; run it again to start "
              f"over (it owns {cfg.output_dir}).")
        return 128 + result.interrupted if result.interrupted else 1
    tuned = get_method(cfg.method).load(base, Path(cfg.output_dir))
    acc_after, after = score(tuned, tokenizer, rows)
    show_table(rows, before, after, args.show)
    print(f"\nheld-out exact match: before {acc_before:.1%} -> after {acc_after:.1%} "
          f"({len(rows)} questions, {time.perf_counter() - t0:.0f} s)")
    print(f"adapter saved in {cfg.output_dir}; chat with it: tuneforge chat --model {args.model} "
          f"--adapter {cfg.output_dir}")
    return 0
