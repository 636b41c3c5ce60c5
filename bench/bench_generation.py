#!/usr/bin/env python3
"""Generation speed: the TuneForge engine at batch 16 against a naive per-prompt `model.generate` loop.

    .venv/bin/python bench/bench_generation.py                         # SmolLM2-135M-Instruct, 16 prompts, 64 tokens
    .venv/bin/python bench/bench_generation.py --model /tmp/tiny --max-new-tokens 32
    .venv/bin/python bench/bench_generation.py --dtype bf16     # both sides in bf16 (fast on AVX512-BF16/AMX CPUs)

Both sides get the same 16 chat prompts (held-out questions of the bundled task, rendered by the engine's
chat-template code), greedy decoding, the same weights in the same precision (--dtype), exactly --max-new-tokens new
tokens per prompt (end-of-turn tokens are ignored on both sides so every prompt costs the same work), and the same
torch thread count. Measured in the same run, after one warm-up call per side:
- baseline: `model.generate(input_ids, max_new_tokens=N, do_sample=False)` for one prompt at a time, in a loop;
- engine batch 1: `Engine.generate` one prompt at a time (the engine's own loop, no batching);
- engine batch 16: `Engine.generate` of all prompts at once (continuous batching with 16 slots).
tokens/s = new tokens / wall time of the best of --repeats runs per variant (the order rotates between repeats, so
a change in machine load does not favour one side). Both sides are checked to make exactly --max-new-tokens tokens
(`generate` gets `min_new_tokens`: left to itself it stops at end of turn, doing less work). The engine's greedy
replies (up to the end-of-turn token) are compared with the baseline's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
HELDOUT = ROOT / "tuneforge" / "assets" / "example_task" / "heldout.jsonl"


def prompts(n: int) -> list[list[dict]]:
    rows = [json.loads(line) for line in HELDOUT.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [[m for m in r["messages"] if m["role"] != "assistant"] for r in rows[:n]]


def naive_loop(model, ids: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    from transformers import GenerationConfig

    # min_new_tokens: transformers fills an unset eos_token_id from the model's generation config, so without it
    # `generate` stops at end of turn and does less work than the engine (which ignores eos here)
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    outs = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for prompt in ids:
            x = torch.tensor([prompt])
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=config)
            outs.append(out[0, len(prompt):].tolist())
            assert len(outs[-1]) == new_tokens, f"generate made {len(outs[-1])} tokens, not {new_tokens}"
    return time.perf_counter() - t0, outs


def engine_run(engine, ids: list[list[int]], new_tokens: int, together: bool) -> tuple[float, list[list[int]]]:
    from tuneforge.inference import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    if together:
        done = engine.generate(ids, params)
    else:
        done = [engine.generate([p], params)[0] for p in ids]
    elapsed = time.perf_counter() - t0
    assert all(c.completion_tokens == new_tokens for c in done), "the engine stopped early"
    return elapsed, [c.token_ids for c in done]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="precision of both sides")
    parser.add_argument("--repeats", type=int, default=2, help="runs per variant, in rotating order; the best counts")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from tuneforge.configs.schema import ModelConfig
    from tuneforge.inference import Engine
    from tuneforge.models.loading import load_model_and_tokenizer

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=args.model), dtype=dtype)
    model.eval()
    engine = Engine(model, tok, max_batch_size=args.batch)
    ids = [engine.encode_chat(p) for p in prompts(args.prompts)]
    n_new = args.max_new_tokens * len(ids)
    naive_loop(model, ids[:1], 4)  # warm-up both paths (allocator, thread pools)
    engine_run(engine, ids[:2], 4, together=True)

    runs = {"naive": lambda: naive_loop(model, ids, args.max_new_tokens),
            "one": lambda: engine_run(engine, ids, args.max_new_tokens, together=False),
            "batch": lambda: engine_run(engine, ids, args.max_new_tokens, together=True)}
    times, outs = {k: [] for k in runs}, {}
    for rep in range(args.repeats):  # rotate the order so a change in machine load hits every variant alike
        for name in list(runs)[rep % 3:] + list(runs)[:rep % 3]:
            t, outs[name] = runs[name]()
            times[name].append(t)
            print(f"  [{name} run {rep + 1}: {t:.2f} s]", flush=True)
    t_naive, t_one, t_batch = (min(times[k]) for k in runs)  # best of the repeats: the least disturbed run
    ref, one, batched = outs["naive"], outs["one"], outs["batch"]
    rows = [("naive model.generate loop", t_naive), ("engine, batch 1", t_one), (f"engine, batch {args.batch}", t_batch)]
    print(f"model {args.model}  prompts {len(ids)}  new tokens/prompt {args.max_new_tokens}  threads {args.threads}  "
          f"dtype {args.dtype}  "
          f"prompt tokens {min(map(len, ids))}-{max(map(len, ids))}  torch {torch.__version__}  "
          f"cpu {platform.processor() or platform.machine()}")
    for name, t in rows:
        print(f"  {name:<28} {t:7.2f} s  {n_new / t:8.1f} tok/s  {t_naive / t:5.2f}x")
    def same_reply(engine_tokens, generate_tokens):
        """The engine's reply proper (up to its end-of-turn token) opens generate's tokens: at that position
        `min_new_tokens` makes generate take its second choice, so the two part there by design."""
        end = next((i for i, t in enumerate(engine_tokens) if t in engine.stop_ids), len(engine_tokens))
        return engine_tokens[:end] == generate_tokens[:end]

    same = sum(same_reply(a, b) for a, b in zip(batched, ref))
    same_one = sum(same_reply(a, b) for a, b in zip(one, ref))
    print(f"greedy replies (up to end of turn) equal to the baseline's: batch 1 {same_one}/{len(ids)}, "
          f"batch {args.batch} {same}/{len(ids)}")
    print(f"RATIO engine batch {args.batch} / naive loop: {t_naive / t_batch:.2f}x")


if __name__ == "__main__":
    main()
