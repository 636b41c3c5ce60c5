"""fp32 linear layers through oneDNN while the engine decodes on CPU.

Why this is hand-written: PyTorch's CPU build sends fp32 `linear` to MKL's sgemm; it has no switch that sends fp32
(at full precision) to oneDNN instead (its oneDNN matmul flags are for bf16/fp16 or reduced-precision fp32). On
decode-shaped products (a few rows against a big weight) MKL is far slower than oneDNN on the machines we measured
(a 2-core AMD EPYC with AVX512, torch 2.13, 1 thread, 16 rows: SmolLM2's lm_head 58 -> 22 ms, its 576x1536
projections 0.34 -> 0.21 ms), so a whole batch-16 decode ran 1.4x faster (bench/RESULTS.md). The results are fp32
products like MKL's, to rounding.

`onednn_linears()` is a TorchFunctionMode: it applies to the calling thread, inside the `with` only, and changes
nothing on the model (no patched modules, nothing that survives a deepcopy or a save). It takes over only calls that
are fp32, on CPU, with autograd off (the engine runs under inference mode) and a contiguous weight; everything else
(bf16, GPUs, quantized weights, training) runs as before. Set TUNEFORGE_ONEDNN_LINEAR=0 to turn it off.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch.overrides import TorchFunctionMode

_LINEAR = torch._C._nn.linear  # what torch.nn.functional.linear (and so nn.Linear) calls


def available() -> bool:
    return (os.environ.get("TUNEFORGE_ONEDNN_LINEAR", "1") != "0" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _takes(x: torch.Tensor, weight: torch.Tensor, bias) -> bool:
    return (x.dtype == torch.float32 and weight.dtype == torch.float32 and x.device.type == "cpu"
            and weight.device.type == "cpu" and weight.dim() == 2 and weight.is_contiguous()
            and not torch.is_grad_enabled()
            and (bias is None or (bias.dtype == torch.float32 and bias.dim() == 1)))


class _OneDNNLinear(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _LINEAR:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if _takes(x, weight, bias) and x.shape[-1] == weight.shape[1]:
                out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]).contiguous(), weight, bias, "none", [], "")
                return out.view(*x.shape[:-1], weight.shape[0])
        return func(*args, **kwargs)


def onednn_linears(device: torch.device):
    """A context in which fp32 CPU linears run through oneDNN (a no-op context elsewhere)."""
    if torch.device(device).type != "cpu" or not available():
        return contextlib.nullcontext()
    return _OneDNNLinear()
