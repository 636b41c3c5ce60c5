"""Shared helpers for the method test matrix: tiny models, a fixed batch, a few training steps, parameter diffs.

Usage from a method test:

    from tests.methods.harness import tiny_model, fixed_batch, train_steps, snapshot, changed_params, logits

    model = tiny_model("llama")                     # or tiny_model("qwen2"), or tiny_model(path=<HF folder>)
    batch = fixed_batch()                           # {"input_ids", "attention_mask", "labels"}
    before = snapshot(model)
    losses = train_steps(model, batch, steps=5, lr=1e-2)
    assert losses[-1] < losses[0]
    assert changed_params(before, snapshot(model)) == {names that should train}

All out_features are multiples of 32 (k/v: 2 heads x 16) so bitsandbytes 4-bit/8-bit layers accept them (its CPU
inference layout needs out_features divisible by 32).
"""

from __future__ import annotations

import os

import torch

from tuneforge.losses import causal_lm_loss

KINDS = ("llama", "qwen2")
VOCAB = 256
HIDDEN = 64
SEED = 0


def tiny_config(kind: str):
    """A transformers config shaped like the tiny-llama / tiny-qwen2 presets: 2 layers, hidden 64, 4 query heads and
    2 key/value heads (GQA); Qwen2 has q/k/v biases and tied embeddings."""
    from transformers import LlamaConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind == "llama":
        return LlamaConfig(tie_word_embeddings=False, **common)
    if kind == "qwen2":
        return Qwen2Config(tie_word_embeddings=True, **common)
    raise ValueError(f"unknown tiny model kind {kind!r}; use one of {KINDS}")


def tiny_model(kind: str = "llama", path: str | os.PathLike | None = None, dtype=torch.float32, **load_kwargs):
    """A tiny causal LM: from `path` (an HF folder, e.g. the tiny_llama_dir fixture)
    or built from `tiny_config(kind)` with a fixed seed (so two calls give identical weights)."""
    from transformers import AutoModelForCausalLM

    if path is not None:
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **load_kwargs)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(tiny_config(kind), dtype=dtype)
    return model


def save_tiny_model(kind: str, out_dir) -> str:
    """Write `tiny_model(kind)` as an HF folder (safetensors) and return its path (for fresh-process loads)."""
    model = tiny_model(kind)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return str(out_dir)


def fixed_batch(batch_size: int = 2, seq_len: int = 16, vocab: int = VOCAB, seed: int = 1) -> dict:
    """A fixed token batch: random ids (no pad), labels = ids with the first 3 positions masked (a 'prompt')."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch_size, seq_len), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def loss_of(model, batch) -> torch.Tensor:
    """Mean next-token loss of `batch` (labels never go to the model, so prompt methods see the same inputs)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits_ = out.logits[:, -batch["labels"].shape[1]:, :]  # prompt-learning models may prepend virtual tokens
    total, n = causal_lm_loss(logits_, batch["labels"])
    return total / n


def train_steps(model, batch, steps: int = 5, lr: float = 1e-2, param_groups: list[dict] | None = None,
                optimizer_class=None) -> list[float]:
    """Run `steps` optimizer steps on one fixed batch; returns the loss before each step plus the final loss
    (length steps + 1). AdamW over the trainable parameters unless `param_groups`/`optimizer_class` are given."""
    model.train()
    groups = param_groups or [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]
    optimizer = (optimizer_class or torch.optim.AdamW)(groups, lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = loss_of(model, batch)
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        losses.append(loss_of(model, batch).item())
    return losses


def snapshot(model) -> dict[str, torch.Tensor]:
    """A copy of every parameter and buffer, by name (packed quantized weights included, as raw tensors)."""
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    state.update({f"buffer:{n}": b.detach().clone() for n, b in model.named_buffers()})
    return state


def changed_params(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    """Names whose tensors are not bit-identical between two snapshots (names present in only one count too)."""
    changed = set(before.keys() ^ after.keys())
    for name in before.keys() & after.keys():
        a, b = before[name], after[name]
        if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b):
            changed.add(name)
    return changed


def trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def logits(model, batch) -> torch.Tensor:
    """fp32 logits of `batch` in eval mode (for comparing save/load/merge)."""
    was_training = model.training
    model.eval()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    model.train(was_training)
    return out[:, -batch["input_ids"].shape[1]:, :]


@torch.no_grad()
def greedy_new_tokens(model, batch, max_new_tokens: int = 4) -> torch.Tensor:
    """Greedy-generate from the first row of `batch`; returns only the new tokens."""
    model.eval()
    ids = batch["input_ids"][:1, :8]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:]
