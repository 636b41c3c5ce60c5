"""Hand-written compute kernels shared by training and inference, each with a comment saying why no library does it."""

from __future__ import annotations

import torch


def fused_layer_counts(model: torch.nn.Module) -> dict[str, int]:
    """How many layers of `model` run a fused forward (`training.fused_layers`): {"RMSNorm": n, "LoRA": m}. A LoRA
    layer counts when its adapter is one the fused path computes (no dropout or variant); the input's dtype and
    device are checked per call."""
    from tuneforge.kernels import lora_linear, rms_norm

    kinds = {rms_norm._fused_forward: "RMSNorm", lora_linear._fused_forward: "LoRA"}
    counts = dict.fromkeys(kinds.values(), 0)
    for module in model.modules():
        forward = vars(module).get("forward")
        kind = kinds.get(getattr(forward, "__func__", None))
        if kind == "LoRA" and lora_linear.plain_adapter(module) is None:
            continue  # switched, but its calls go to PEFT's forward (dropout, a variant, ...): not counted as fused
        if kind:
            counts[kind] += 1
    return counts
