#!/usr/bin/env python3
"""RMSNorm and LoRA layers as one autograd node each (training.fused_layers, tuneforge/kernels/rms_norm.py and
lora_linear.py) against transformers' and PEFT's op-by-op layers, on CPU in fp32 with oneDNN linears (the
training defaults there).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_fused_layers.py [--rounds 6] [--tiny]

Per layer: forward + backward of one SmolLM2-135M norm (576 features) and one LoRA r8 q_proj (576 x 576) at
--tokens rows. Whole step: SmolLM2-135M-Instruct with LoRA r8 on q/k/v/o, one padding-free row of 8 sequences of
50-90 random tokens (as the training loop feeds SFT batches on CPU), loss at 11 positions per sequence; forward +
backward, the variants alternating in one process, best and median of --rounds (3 steps each). --tiny: a random
2-layer model instead of SmolLM2 (a smoke run for the tests).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tuneforge.kernels.lora_linear import fuse_lora_linears
from tuneforge.kernels.onednn_linear import onednn_linears
from tuneforge.kernels.rms_norm import fuse_rms_norms


def unfuse(model: torch.nn.Module) -> None:
    for module in model.modules():
        module.__dict__.pop("forward", None)


def timed(fn, rounds: int, calls: int) -> list[float]:
    fn()
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter() - start) / calls)
    return out


def layer_pair(name: str, module: torch.nn.Module, fuse, x: torch.Tensor, rounds: int) -> None:
    x = x.requires_grad_(True)
    g = torch.randn_like(module(x))

    def step():
        x.grad = None
        with onednn_linears("cpu"):
            module(x).backward(g)

    results = {}
    for _ in range(rounds):  # alternate, so machine load moves both alike
        for fused in (False, True):
            unfuse(module)
            if fused:
                fuse(module)
            results.setdefault(fused, []).extend(timed(step, 1, 20))
    plain, fused = min(results[False]), min(results[True])
    print(f"{name}: op by op {plain * 1e6:.0f} us, fused {fused * 1e6:.0f} us: {plain / fused:.2f}x")


def build_model(tiny: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tuneforge.models import attention

    attention.register()
    if tiny:
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=512)
        config._attn_implementation = attention.AUTO_ATTENTION
        model = AutoModelForCausalLM.from_config(config)
    else:
        from tuneforge.models.builtin import ensure_smollm2

        model = AutoModelForCausalLM.from_pretrained(ensure_smollm2(), dtype=torch.float32,
                                                     attn_implementation=attention.AUTO_ATTENTION)
    model.config.use_cache = False
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))


def whole_steps(model, rounds: int) -> None:
    gen = torch.Generator().manual_seed(0)
    lengths = [int(n) for n in torch.randint(50, 90, (8,), generator=gen)]
    ids = torch.randint(0, model.config.vocab_size, (1, sum(lengths)), generator=gen)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    ends = torch.tensor(lengths).cumsum(0).tolist()
    keep = torch.cat([torch.arange(end - 12, end - 1) for end in ends])
    targets = ids[0, keep + 1]

    def step():
        with onednn_linears("cpu"):
            logits = model(input_ids=ids, position_ids=positions, logits_to_keep=keep).logits[0]
            loss = torch.nn.functional.cross_entropy(logits, targets)
            loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    variants = {"op by op": lambda m: None, "fused norms": fuse_rms_norms,
                "fused norms + LoRA": lambda m: (fuse_rms_norms(m), fuse_lora_linears(m))}
    times, losses = {name: [] for name in variants}, {}
    for _ in range(rounds):
        for name, fuse in variants.items():
            unfuse(model)
            fuse(model)
            times[name].extend(timed(lambda: losses.__setitem__(name, step()), 1, 3))
    base = min(times["op by op"])
    print(f"whole step ({sum(lengths)} tokens, LoRA r8 q/k/v/o, best / median of {rounds} rounds of 3 steps):")
    for name, ts in times.items():
        print(f"  {name:20s} {min(ts) * 1e3:7.1f} ms / {statistics.median(ts) * 1e3:7.1f} ms  "
              f"{base / min(ts):.2f}x  loss {losses[name]:.6f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--tokens", type=int, default=560, help="rows of the per-layer products")
    p.add_argument("--tiny", action="store_true", help="a random 2-layer model (smoke run)")
    a = p.parse_args(argv)
    model = build_model(a.tiny)
    hidden = model.config.hidden_size
    layer = model.base_model.model.model.layers[0]
    x = torch.randn(1, a.tokens, hidden)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    layer_pair(f"RMSNorm ({hidden}), frozen weight", layer.input_layernorm, fuse_rms_norms, x.clone(), a.rounds)
    layer_pair(f"LoRA r8 q_proj ({hidden} x {layer.self_attn.q_proj.base_layer.out_features})",
               layer.self_attn.q_proj, fuse_lora_linears, x.clone(), a.rounds)
    whole_steps(model, a.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
