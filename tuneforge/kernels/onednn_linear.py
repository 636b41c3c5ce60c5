"""fp32 linear layers through oneDNN on CPU, for training (forward and backward) and for the engine's decoding.

Why this is hand-written: PyTorch's CPU build sends fp32 `linear` (and `mm`) to MKL's sgemm and has no switch that
sends fp32 at full precision to oneDNN instead (its oneDNN matmul flags are for bf16/fp16 or reduced-precision
fp32). On the machines we measured (a 2-core AMD EPYC with AVX512, torch 2.13, 1 thread) MKL runs the same fp32
products about 2x slower than oneDNN: SmolLM2's projections at 1024 rows 61-82 vs 150-250 GFLOP/s, its lm_head 70 vs
120-145 (probably a non-AVX512 path on AMD). On an Intel Xeon with AVX-512 the same code is the slower one (MKL
~120 GFLOP/s, oneDNN ~105; 0.86x per SmolLM2 LoRA step), so `training.cpu_matmul: auto` and the engine use oneDNN
only where `measure_speedup` found it faster on this CPU (`faster_here`). The results are fp32 products like MKL's,
to rounding.

`onednn_linears()` is a TorchFunctionMode: it applies to the calling thread, inside the `with` only, and changes
nothing on the model (no patched modules, nothing that survives a deepcopy or a save). It takes over
`F.linear` calls (so every nn.Linear and PEFT's adapter layers) whose input, weight and bias are plain fp32 CPU
tensors with a contiguous 2-D weight, outside autocast; everything else (bf16, GPUs, quantized or sharded
weights, which are tensor subclasses) runs as before. With autograd on, `OneDNNLinear` runs the backward products
through oneDNN too, and only those that are needed (a frozen weight gets no weight gradient; an input that needs
no gradient gets none):

    grad_input  [M, K] = grad [M, N] @ W [N, K]       oneDNN with W.t() as its "weight" (a view, no copy)
    grad_weight [N, K] = grad.t() [N, M] @ x [M, K]   oneDNN with x.t() as its "weight" (views, no copies)

oneDNN reads the transposed views through their strides, so no step pays a transpose copy, frozen weights included.
Measured alternatives (same machine, 1024 rows, GFLOP/s): copying the transposes first was no faster except for
grad_input of a vocabulary-sized frozen weight held transposed once (lm_head 143 vs 122 via the view): not worth a
second copy of the largest matrix; aten's `mkldnn_linear_backward_*` ops take only oneDNN-layout tensors (a
conversion each call). Set TUNEFORGE_ONEDNN_LINEAR=0 to turn the mode off everywhere (training: also
`training.cpu_matmul: default`).
"""

from __future__ import annotations

import contextlib
import math
import os
import time

import torch
from torch.autograd.function import once_differentiable
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

from tuneforge.kernels import cpu_cache

_LINEAR = torch._C._nn.linear  # what torch.nn.functional.linear (and so nn.Linear) calls
_PLAIN = (torch.Tensor, torch.nn.Parameter)  # not DTensor (FSDP), not 4-bit/8-bit parameter classes


def available() -> bool:
    return (os.environ.get("TUNEFORGE_ONEDNN_LINEAR", "1") != "0" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


SPEEDUP_NEEDED = 1.05  # oneDNN takes over only where it measured this much faster than torch's own path


def measure_speedup(rows: int = 512, size: int = 1024, rounds: int = 5) -> float:
    """How many times faster oneDNN runs a training product than torch's own path (MKL) on this process's threads:
    forward, grad_input and grad_weight of a trainable [size, size] fp32 weight over `rows` rows, the two paths
    alternating, the best round of each (~1 s on one core). Why measure: the gain is the CPU's, not the code's
    (AMD EPYC with AVX-512: 1.5-2x; an Intel Xeon with AVX-512: 0.86x per SmolLM2 step; bench/RESULTS.md)."""
    # autograd on even when asked from inside inference mode (the engine's first decoding step)
    with torch.inference_mode(False), torch.enable_grad():
        gen = torch.Generator().manual_seed(0)  # never the global RNG: a probe must not change a run's dropout
        x = torch.randn(rows, size, generator=gen).requires_grad_()
        weight = torch.randn(size, size, generator=gen).requires_grad_()
        grad = torch.randn(rows, size, generator=gen)

        def seconds(use: bool) -> float:
            x.grad = weight.grad = None
            start = time.perf_counter()
            with onednn_linears("cpu", enabled=use):
                torch.nn.functional.linear(x, weight).backward(grad)
            return time.perf_counter() - start

        best = {False: math.inf, True: math.inf}
        for use in best:
            seconds(use)  # warm-up: thread pool, kernel selection
        for _ in range(rounds):
            for use in best:
                best[use] = min(best[use], seconds(use))
    return best[False] / best[True]


_FASTER: dict[int, bool] = {}  # per thread count, for this process (the engine asks at every decoding step)


def faster_here() -> bool:
    """Whether oneDNN should multiply this machine's fp32 CPU linears (`training.cpu_matmul: auto`, the engine's
    decoding): where it measured at least SPEEDUP_NEEDED x faster than torch's own path on this CPU and thread
    count (`measure_speedup`, cached for good per machine, threads and torch build in kernels/cpu_cache.py)."""
    if not available():
        return False
    threads = torch.get_num_threads()
    if threads not in _FASTER:
        key = f"{cpu_cache.machine_key()}|torch={torch.__version__}|onednn_speedup"
        speedup = cpu_cache.read().get(key)
        if not isinstance(speedup, (int, float)):
            speedup = measure_speedup()
            cpu_cache.update({key: speedup})
        _FASTER[threads] = speedup >= SPEEDUP_NEEDED
    return _FASTER[threads]


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K].T (+ bias) by oneDNN; either may be a transposed view."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _strided_2d(t: torch.Tensor) -> torch.Tensor:
    """`t` as oneDNN reads it without a copy: row- or column-major (not broadcast or sliced gradients)."""
    return t if t.is_contiguous() or t.t().is_contiguous() else t.contiguous()


def plain_fp32_cpu(*tensors: torch.Tensor) -> bool:
    """Plain (not quantized or sharded) fp32 CPU tensors, outside autocast: what the hand-written CPU kernels take."""
    return (all(type(t) in _PLAIN and t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
            and not torch.is_autocast_enabled("cpu"))


def takes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether `F.linear(x, weight, bias)` is one this module computes (fp32, CPU, plain tensors, no autocast)."""
    return (plain_fp32_cpu(*((x, weight) if bias is None else (x, weight, bias)))
            and weight.dim() == 2 and weight.is_contiguous() and x.dim() >= 1 and x.shape[-1] == weight.shape[1]
            and x.numel() > 0 and (bias is None or bias.dim() == 1))


class OneDNNLinear(torch.autograd.Function):
    """`F.linear` of a 2-D input with every product (forward, grad_input, grad_weight) through oneDNN."""

    @staticmethod
    def forward(ctx, x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # the input is kept only for the weight's gradient: a frozen layer (LoRA's untargeted o_proj, down_proj)
        # would otherwise hold an activation per layer that nothing reads
        ctx.save_for_backward(x2d if ctx.needs_input_grad[1] else None, weight)
        ctx.has_bias = bias is not None
        return _onednn(x2d, weight, bias)

    @staticmethod
    @once_differentiable  # double backward (gradient penalties) is not supported: fail loudly, never silently
    def backward(ctx, grad: torch.Tensor):
        x2d, weight = ctx.saved_tensors
        grad = _strided_2d(grad)
        grad_x = _onednn(grad, weight.t()) if ctx.needs_input_grad[0] else None
        grad_w = _onednn(grad.t(), x2d.t()) if ctx.needs_input_grad[1] else None
        grad_b = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` through oneDNN for inputs `takes()` accepts (any leading dims); autograd when needed."""
    x2d = x.reshape(-1, x.shape[-1])
    if not x2d.is_contiguous():
        x2d = x2d.contiguous()
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    out = OneDNNLinear.apply(x2d, weight, bias) if grads else _onednn(x2d, weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])


class _OneDNNLinears(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _LINEAR and len(args) + len(kwargs) <= 3:
            x = args[0] if args else kwargs.get("input")
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor) and takes(x, weight, bias):
                return linear(x, weight, bias)
        return func(*args, **kwargs)


def active() -> bool:
    """Whether the calling thread is inside `onednn_linears()`."""
    return any(isinstance(mode, _OneDNNLinears) for mode in _get_current_function_mode_stack())


def checkpoint_contexts():
    """`context_fn` for torch.utils.checkpoint (non-reentrant): the recomputation in the backward pass runs under
    the mode when the forward did. The autograd engine does not carry Python function modes into the backward, so
    without this a recomputed block would save other tensors than the first forward and checkpoint refuses it."""
    return contextlib.nullcontext(), (_OneDNNLinears() if active() else contextlib.nullcontext())


def checkpointing_kwargs() -> dict:
    """torch.utils.checkpoint options of every run (gradient checkpointing): non-reentrant, and blocks recomputed
    in the backward pass use the same matmul library as their forward did."""
    return {"use_reentrant": False, "context_fn": checkpoint_contexts}


def onednn_linears(device: torch.device | str = "cpu", enabled: bool = True):
    """A context in which fp32 CPU linears (and their gradients) run through oneDNN; a no-op context when not
    `enabled`, off the CPU, or where this torch build has no oneDNN linear."""
    if not enabled or torch.device(device).type != "cpu" or not available():
        return contextlib.nullcontext()
    return _OneDNNLinears()


def auto_linears(device: torch.device | str = "cpu"):
    """`onednn_linears` where oneDNN measured faster on this CPU (`faster_here`); a no-op context elsewhere."""
    return onednn_linears(device, enabled=torch.device(device).type == "cpu" and available() and faster_here())
