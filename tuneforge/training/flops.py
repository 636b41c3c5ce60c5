"""Hardware efficiency: the model FLOPs a training step needs, against what the device can do.

    MFU = model FLOPs per token x tokens per second / (peak FLOP/s of one device x processes)

Model FLOPs per token (the convention of PaLM appendix B and Megatron; padding and recomputation are not useful
work and are not counted). N is the weight count of every matrix multiply (nn.Linear: attention and MLP
projections, lm_head, adapter matrices; not the embedding lookup), T the trainable part of N, L layers, d the
hidden size, S the sequence length:

    forward 2N, backward through the activations 2N, weight gradients 2T, attention 12 L d S
    full fine-tune: 6N + 12 L d S;  adapters (LoRA, ...): 4N + 2T + 12 L d S
    plus, per extra forward-only pass the algorithm makes over the same tokens (DPO's and KTO's live reference
    model: `Stage.reference_forwards`), 2N + 4 L d S

The peak: the datasheet dense bf16 tensor-core figure for known GPUs, or, for CPUs, a short matmul probe in the
run's dtype at start (the faster of MKL and oneDNN), cached per machine under the TuneForge cache folder.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from tuneforge.kernels import onednn_linear

# dense (no sparsity) bf16 tensor-core peak, FLOP/s, from the vendors' datasheets; the first name found wins
GPU_PEAK_BF16 = [
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H800", 989e12), ("GH200", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
    ("A10G", 70e12), ("A10", 125e12), ("A6000", 155e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12),
    ("V100", 125e12), ("T4", 65e12), ("MI300X", 1307e12), ("MI250X", 383e12),
]


def matmul_weights(model: torch.nn.Module) -> tuple[int, int]:
    """(N, T): weights of every nn.Linear, and of those that train. From the layer shapes, so sharded (FSDP) or
    4-bit packed weights count as the matrices they stand for."""
    total = trainable = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            n = module.in_features * module.out_features
            total += n
            if module.weight.requires_grad:
                trainable += n
    return total, trainable


def flops_per_token(n_matmul: int, n_trainable: int, layers: int, hidden: int, seq_len: float,
                    extra_forwards: int = 0) -> float:
    """Training FLOPs per token (forward + backward, and `extra_forwards` forward-only passes), see the module
    docstring."""
    return (4 * n_matmul + 2 * n_trainable + 12 * layers * hidden * seq_len
            + extra_forwards * (2 * n_matmul + 4 * layers * hidden * seq_len))


def model_shape(model: torch.nn.Module) -> tuple[int, int]:
    """(layers, hidden size) from the HF config of the model under any wrapper; (0, 0) when unknown."""
    config = getattr(model, "config", None)
    while config is None and hasattr(model, "base_model") and model.base_model is not model:
        model = model.base_model
        config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    return int(getattr(config, "num_hidden_layers", 0) or 0), int(getattr(config, "hidden_size", 0) or 0)


def gpu_peak(name: str) -> float | None:
    return next((peak for key, peak in GPU_PEAK_BF16 if key.lower() in name.lower()), None)


def cache_file() -> Path:
    return Path(os.environ.get("TUNEFORGE_CACHE") or "~/.cache/tuneforge").expanduser() / "cpu_peak.json"


def probe_cpu_peak(dtype: torch.dtype, size: int = 1024, seconds: float = 0.3) -> float:
    """FLOP/s of a square matmul in `dtype` on this process's threads (the best of several timed runs), by the
    faster of torch's own matmul (MKL for fp32) and oneDNN: training may use either (`training.cpu_matmul`), and
    on CPUs where MKL takes a slow path (AMD EPYC: ~2x, kernels/onednn_linear.py) MKL's figure is not the peak."""
    gen = torch.Generator().manual_seed(0)  # never the global RNG: a probe must not change a run's dropout masks
    a = torch.randn(size, size, generator=gen).to(dtype)
    b = torch.randn(size, size, generator=gen).to(dtype)
    products = [lambda: a @ b]
    if dtype == torch.float32 and onednn_linear.available():
        products.append(lambda: onednn_linear.linear(a, b))  # a @ b.T: the same FLOPs
    return max(_best_rate(product, 2 * size ** 3, seconds / len(products)) for product in products)


def _best_rate(product, flops: float, seconds: float) -> float:
    product()  # warm-up: thread pool and kernel selection
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == 0.0:
        start = time.perf_counter()
        product()
        elapsed = time.perf_counter() - start
        best = max(best, flops / max(elapsed, 1e-9))
    return best


def _peak_key(dtype: torch.dtype) -> str:
    # probe=2: the best of MKL and oneDNN (figures cached by the MKL-only probe were too low on AMD CPUs)
    return (f"{platform.processor() or platform.machine()}|{_cpu_model()}|threads={torch.get_num_threads()}|{dtype}"
            f"|probe=2")


def _read_peaks() -> dict:
    try:
        return json.loads(cache_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def cpu_peak(dtype: torch.dtype) -> float:
    """The probe's result, measured once per machine, thread count and dtype (cached: it takes ~0.5 s)."""
    cached = _read_peaks()
    if _peak_key(dtype) in cached:
        return float(cached[_peak_key(dtype)])
    peak = probe_cpu_peak(dtype)
    _write_peak(dtype, peak)
    return peak


def raise_cpu_peak(dtype: torch.dtype, achieved: float) -> None:
    """A run achieved more than the cached peak: the probe ran on a busy machine. A peak is at least what was
    achieved, so the cache is raised to it (it only ever goes up; a busy probe never lowers a good figure)."""
    if achieved > float(_read_peaks().get(_peak_key(dtype), 0.0)):
        _write_peak(dtype, achieved)


def _write_peak(dtype: torch.dtype, peak: float) -> None:
    path, cached = cache_file(), _read_peaks()
    cached[_peak_key(dtype)] = peak
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(cached, indent=1), encoding="utf-8")
        tmp.replace(path)
    except OSError:  # a read-only home: measure again next time
        pass


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def device_peak(device: torch.device, dtype: torch.dtype) -> tuple[float | None, str]:
    """(peak FLOP/s of one device or None when unknown, where the figure comes from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak(name)
        return peak, f"{name} datasheet bf16 dense" if peak else f"{name}: no datasheet figure known"
    if device.type == "cpu":
        return cpu_peak(dtype), f"measured {str(dtype).removeprefix('torch.')} matmul peak of this CPU"
    return None, f"{device.type}: no peak known"


class EfficiencyMeter:
    """Turns (tokens, items, seconds) into achieved model FLOP/s and MFU for the loop."""

    def __init__(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype, world_size: int):
        self.n_matmul, self.n_trainable = matmul_weights(model)
        self.layers, self.hidden = model_shape(model)
        peak, self.peak_source = device_peak(device, dtype)
        self.peak = peak * world_size if peak else None
        self.device, self.dtype, self.world_size = device, dtype, world_size

    def flops_per_token(self, seq_len: float, extra_forwards: int = 0) -> float:
        return flops_per_token(self.n_matmul, self.n_trainable, self.layers, self.hidden, seq_len, extra_forwards)

    def metrics(self, tokens_per_s: float, seq_len: float, extra_forwards: int = 0) -> dict:
        achieved = self.flops_per_token(seq_len, extra_forwards) * tokens_per_s
        out = {"model_tflops": achieved / 1e12}
        if self.peak and achieved > self.peak and self.device.type == "cpu":  # the cached probe ran on a busy CPU
            raise_cpu_peak(self.dtype, achieved / self.world_size)
            self.peak = achieved
        if self.peak:
            out["mfu"] = achieved / self.peak
        return out
