"""A LoRA linear layer as one autograd node on CPU: `x W^T + b + scale * (x A^T) B^T`.

Why this is hand-written: PEFT's `lora.Linear` computes the adapter as four separate ops (lora_A, lora_B, the
scaling multiply, the add to the base output), each a module call or tensor op with its own autograd node, and its
backward adds the adapter's input gradient into the base layer's as one more pass. For rank-8 adapters on
SmolLM2-sized layers those [tokens, features] passes and per-op costs cost more than the rank-8 products themselves
(one q_proj layer, forward + backward: 1.5x faster fused; bench/RESULTS.md run 15). Here the rank update is folded into the products with `addmm` (forward:
into the base output; backward: into the input gradient), so the adapter costs two small products each way and no
full-size elementwise pass. Same values as PEFT's forward to float rounding (the products are the same, summed in
another order). No library does this for CPU tensors (Unsloth's fused LoRA is Triton, for NVIDIA GPUs).

`fuse_lora_linears(model)` gives each PEFT `lora.Linear` this forward as an attribute of the module instance (its
class, weights, state dict and adapter files are untouched). The fused path runs only where it means the same:
one active plain LoRA adapter, no dropout, not merged, a plain nn.Linear base, fp32 CPU tensors, no per-call
adapter names; every other call (and every other case) runs PEFT's own forward.
"""

from __future__ import annotations

import types

import torch

from tuneforge.kernels import onednn_linear


def _product(onednn: bool, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K].T (+ bias): through oneDNN where the run multiplies that way (training.cpu_matmul;
    either may be a transposed view), else torch's own."""
    if onednn:
        return onednn_linear._onednn(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


class LoRALinearFunction(torch.autograd.Function):
    """out = x W^T + b + scale * (x A^T) B^T for a 2-D x; gradients for x, A and B (and W, b when they train)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale: float):
        onednn = onednn_linear.active()  # the backward runs outside the caller's context: remember it
        x_a = _product(onednn, x, lora_a)  # [M, r]
        out = torch.addmm(_product(onednn, x, weight, bias), x_a, lora_b.t(), alpha=scale)
        ctx.save_for_backward(x, weight, lora_a, lora_b, x_a)
        ctx.scale, ctx.has_bias, ctx.onednn = scale, bias is not None, onednn
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight, lora_a, lora_b, x_a = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_bb, _ = ctx.needs_input_grad
        grad = onednn_linear._strided_2d(grad)
        onednn = ctx.onednn
        grad_x_a = _product(onednn, grad, lora_b.t()).mul_(ctx.scale)  # [M, r]
        grad_x = torch.addmm(_product(onednn, grad, weight.t()), grad_x_a, lora_a) if need_x else None
        grad_w = _product(onednn, grad.t(), x.t()) if need_w else None
        grad_bias = grad.sum(0) if ctx.has_bias and need_b else None
        grad_a = _product(onednn, grad_x_a.t(), x.t()) if need_a else None  # [r, K]
        # [N, r] as the transpose of x_a.T @ grad: oneDNN runs it 3-4x faster than grad.T @ x_a (measured)
        grad_lora_b = _product(onednn, x_a.t(), grad.t()).t().mul(ctx.scale) if need_bb else None
        return grad_x, grad_w, grad_bias, grad_a, grad_lora_b, None


def plain_adapter(module) -> str | None:
    """The one active adapter of a PEFT `lora.Linear` when it is a plain LoRA (no dropout, variant or bias, not
    merged or disabled, a plain nn.Linear base): what the fused path can compute; else None."""
    if module.disable_adapters or module.merged or len(module.active_adapters) != 1:
        return None
    name = module.active_adapters[0]
    if name not in module.lora_A or name in getattr(module, "lora_variant", {}):
        return None
    base, lora_a, lora_b = module.base_layer, module.lora_A[name], module.lora_B[name]
    if (type(base) is not torch.nn.Linear or type(lora_a) is not torch.nn.Linear or lora_a.bias is not None
            or type(lora_b) is not torch.nn.Linear or lora_b.bias is not None
            or not isinstance(module.lora_dropout[name], torch.nn.Identity)):
        return None
    return name


def _plain_lora(module, x: torch.Tensor, args, kwargs) -> str | None:
    """The one active adapter when this call is a plain LoRA product the fused path computes the same; else None."""
    name = None if args or kwargs else plain_adapter(module)
    if name is None:
        return None
    base, lora_a, lora_b = module.base_layer, module.lora_A[name], module.lora_B[name]
    plain = (onednn_linear.takes(x, base.weight, base.bias) and onednn_linear.takes(x, lora_a.weight, None)
             and onednn_linear.plain_fp32_cpu(lora_b.weight) and lora_b.weight.is_contiguous())
    return name if plain else None


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    name = _plain_lora(self, x, args, kwargs)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    x2d = x.reshape(-1, x.shape[-1])
    if not x2d.is_contiguous():
        x2d = x2d.contiguous()
    base = self.base_layer
    out = LoRALinearFunction.apply(x2d, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                                   float(self.scaling[name]))
    return out.view(*x.shape[:-1], out.shape[-1])


def fuse_lora_linears(model: torch.nn.Module) -> int:
    """Give every PEFT `lora.Linear` of `model` the fused forward; returns how many were switched."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:
        return 0
    switched = 0
    for module in model.modules():
        if type(module) is LoraLinear and "forward" not in vars(module) and not module.fan_in_fan_out:
            module.forward = types.MethodType(_fused_forward, module)
            switched += 1
    return switched
