"""Hardware efficiency: the model FLOPs a training step needs, against what the device can do.

    MFU = model FLOPs per token x tokens per second / (peak FLOP/s of one device x processes)

Model FLOPs per token (the convention of PaLM appendix B and Megatron; padding and recomputation are not useful
work and are not counted). N is the weight count of every matrix multiply (nn.Linear: attention and MLP
projections, lm_head, adapter matrices; not the embedding lookup), T the trainable part of N, L layers, d the
hidden size, S the sequence length:

    forward 2N, backward through the activations 2N, weight gradients 2T, attention 12 L d S
    full fine-tune: 6N + 12 L d S;  adapters (LoRA, ...): 4N + 2T + 12 L d S
    plus 2N + 4 L d S per token pass of forward-only work the algorithm makes (DPO's and KTO's live reference
    model over the trained tokens, and KTO's policy and reference passes over its mismatched KL rows:
    `Stage.forward_only_tokens`), counted as `extra_forwards` = forward-only token passes / trained tokens
    plus, as model FLOPs (`other_flops`), forward passes over other tokens or of other models: an RL step's
    sampling, old-policy and reference passes (lm_head where each reads it) and its reward model's scoring

The output layer (lm_head, H of the N weights, H_T of them trained) is charged per *head position* instead: a
position whose logits the loss reads (a label position; none for a reward model, which reads its score head). Its
work anywhere else is not needed by the objective, and TuneForge skips it (`logits_to_keep`), so counting it at
every token overstated MFU on prompt-heavy SFT rows (one run read the 100% cap). Per head position: 4H + 2H_T, and
2H per extra forward. `head_share` = head positions / tokens; at 1 the formulas above hold unchanged. `copies`:
training passes over each token per step (R-Drop's two copies of every row; an RL step's epochs over its rollout).

The peak: the datasheet dense bf16 tensor-core figure for known GPUs, or, for CPUs, a short matmul probe in the
run's dtype at start (the faster of MKL and oneDNN), cached per machine under the TuneForge cache folder and
probed again once a day (`cpu_peak`); processes that share one machine's cores count their share of them
(`cpu_share`), not a whole probe each.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from tuneforge.data.packing import PackedRow
from tuneforge.data.types import EncodedPair
from tuneforge.kernels import cpu_cache, onednn_linear

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


def head_weights(model: torch.nn.Module) -> tuple[int, int]:
    """(H, H_T): the output layer's share of `matmul_weights` (the module `get_output_embeddings` names, under any
    wrapper: PEFT, a reward model's `lm`); (0, 0) when the model has none."""
    for module in model.modules():
        get = getattr(module, "get_output_embeddings", None)
        head = get() if callable(get) else None
        if isinstance(head, torch.nn.Module):
            return matmul_weights(head)
    return 0, 0


def flops_per_token(n_matmul: int, n_trainable: int, layers: int, hidden: int, seq_len: float,
                    extra_forwards: float = 0, head: tuple[int, int] = (0, 0), head_share: float = 1.0,
                    copies: float = 1) -> float:
    """Training FLOPs per token (`copies` forward + backward passes, and `extra_forwards` forward-only passes), see
    the module docstring: `head` = (H, H_T) of the N and T weights run only at `head_share` of the tokens."""
    h, h_trained = head
    body, body_trained = n_matmul - h, n_trainable - h_trained
    return (copies * (4 * body + 2 * body_trained + 12 * layers * hidden * seq_len + head_share * (4 * h + 2 * h_trained))
            + extra_forwards * (2 * body + 2 * h * head_share + 4 * layers * hidden * seq_len))


def forward_flops(n_matmul: int, head: int, layers: int, hidden: int, tokens: int, squares: float,
                  head_positions: int) -> float:
    """Model FLOPs of one forward-only pass over `tokens` tokens whose sequences' squared lengths sum to `squares`:
    2 per weight per token and attention 4 L d S per token (as `flops_per_token` counts extra forwards), the
    output layer's `head` weights (part of `n_matmul`) at `head_positions` positions only."""
    return 2 * (n_matmul - head) * tokens + 2 * head * head_positions + 4 * layers * hidden * squares


def model_forward_flops(model: torch.nn.Module, lengths: list[int], head: torch.nn.Module | None = None,
                        head_positions: int = 0) -> float:
    """`forward_flops` of another model than the one training (a reward model scoring rollouts) over sequences of
    `lengths` tokens, its `head` run at `head_positions` positions (a reward model's score head: one per sequence)."""
    layers, hidden = model_shape(model)
    return forward_flops(matmul_weights(model)[0], matmul_weights(head)[0] if head is not None else 0, layers,
                         hidden, sum(lengths), sum(s * s for s in lengths), head_positions)


def model_shape(model: torch.nn.Module) -> tuple[int, int]:
    """(layers, hidden size) from the HF config of the model under any wrapper; (0, 0) when unknown."""
    config = getattr(model, "config", None)
    while config is None and hasattr(model, "base_model") and model.base_model is not model:
        model = model.base_model
        config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    return int(getattr(config, "num_hidden_layers", 0) or 0), int(getattr(config, "hidden_size", 0) or 0)


def fed_counts(items: list) -> tuple[int, int]:
    """(tokens, sum of squared sequence lengths) of what the model runs on for these examples: both sides of a
    preference pair, each document of a packed row (KTO's mismatched KL rows are not counted). The attention term's
    S is the token-weighted length, sum s^2 / sum s: a short and a long sequence cost what they each cost."""
    tokens = squares = 0
    for item in items:
        for side in (item.chosen, item.rejected) if isinstance(item, EncodedPair) else (item,):
            lengths = side.example_lengths() if isinstance(side, PackedRow) else [len(side)]
            tokens += sum(lengths)
            squares += sum(n * n for n in lengths)
    return tokens, squares


@dataclass
class WorkTally:
    """What the steps since the run (re)started ran on, for the MFU: tokens, the sum of their sequences' squared
    lengths, head positions (where lm_head's logits are read), token passes of forward-only work, and model FLOPs
    counted as such (`other_flops`: an RL step's forward-only passes and its reward model)."""

    tokens: int = 0
    squares: float = 0.0
    head_positions: int = 0
    forward_only_tokens: int = 0
    other_flops: float = 0.0

    def add(self, tokens: int, squares: float, head_positions: int, forward_only_tokens: int = 0,
            other_flops: float = 0.0) -> None:
        self.tokens, self.squares = self.tokens + tokens, self.squares + squares
        self.head_positions += head_positions
        self.forward_only_tokens += forward_only_tokens
        self.other_flops += other_flops

    @property
    def seq_len(self) -> float:
        return self.squares / max(self.tokens, 1)

    @property
    def head_share(self) -> float:
        return self.head_positions / max(self.tokens, 1)

    @property
    def forward_share(self) -> float:
        return self.forward_only_tokens / max(self.tokens, 1)

    @property
    def other_flops_per_token(self) -> float:
        return self.other_flops / max(self.tokens, 1)


def gpu_peak(name: str) -> float | None:
    return next((peak for key, peak in GPU_PEAK_BF16 if key.lower() in name.lower()), None)


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
    # probe=2: the best of MKL and oneDNN (figures cached by the MKL-only probe were too low on AMD CPUs);
    # probe=3: peaks cached since were raised by runs whose count charged lm_head at every position (too high)
    return f"{cpu_cache.machine_key()}|{dtype}|probe=3"


PEAK_MAX_AGE_S = 24 * 3600  # a cached peak older than this is probed again (and kept if the new probe is lower)


def cpu_peak(dtype: torch.dtype) -> float:
    """The best rate this machine has shown for `dtype` on this many threads: the probe's, cached (it takes ~0.5 s),
    probed again once the figure is a day old, and raised by any run that achieves more. Why not probe once for
    good: a probe on a busy or throttled CPU reads low and then overstated every later run's MFU (a 1-thread figure
    cached at 232 GFLOP/s on a loaded evening read 253 on a quiet morning; bench/RESULTS.md run 16)."""
    cached, key = cpu_cache.read(), _peak_key(dtype)
    probed_at = cached.get("probed_at", {}).get(key, 0.0) if isinstance(cached.get("probed_at"), dict) else 0.0
    if key in cached and time.time() - probed_at < PEAK_MAX_AGE_S:
        return float(cached[key])
    return refresh_cpu_peak(dtype)


def refresh_cpu_peak(dtype: torch.dtype, seconds: float = 0.3) -> float:
    """Probe now and cache the better of the new figure and the cached one (a peak never goes down)."""
    peak = max(probe_cpu_peak(dtype, seconds=seconds), float(cpu_cache.read().get(_peak_key(dtype), 0.0)))
    _write_peak(dtype, peak, probed=True)
    return peak


def raise_cpu_peak(dtype: torch.dtype, achieved: float) -> None:
    """A run achieved more than the cached peak: the probe ran on a busy machine. A peak is at least what was
    achieved, so the cache is raised to it (it only ever goes up; a busy probe never lowers a good figure)."""
    if achieved > float(cpu_cache.read().get(_peak_key(dtype), 0.0)):
        _write_peak(dtype, achieved)


def _write_peak(dtype: torch.dtype, peak: float, probed: bool = False) -> None:
    entries: dict = {_peak_key(dtype): peak}
    if probed:
        stamps = cpu_cache.read().get("probed_at")
        entries["probed_at"] = {**(stamps if isinstance(stamps, dict) else {}), _peak_key(dtype): time.time()}
    cpu_cache.update(entries)


def cpu_share() -> tuple[float, int, int, int]:
    """(the part of the probed rate this process can count on, its threads, the cores it may run on, processes on
    this machine). The probe times this process's threads alone, on at most the machine's cores; LOCAL_WORLD_SIZE
    processes sharing those cores cannot each reach it: together they are bounded by the cores, so each counts the
    per-core rate on at most its equal part of them (a fraction of a core when there are more processes than
    cores): probe x min(threads, cores / processes) / min(threads, cores)."""
    threads = torch.get_num_threads()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    local = max(int(os.environ.get("LOCAL_WORLD_SIZE") or 1), 1)
    return min(threads, cores / local) / min(threads, cores), threads, cores, local


def device_peak(device: torch.device, dtype: torch.dtype) -> tuple[float | None, str]:
    """(peak FLOP/s of one process's device or None when unknown, where the figure comes from). On CPU the probed
    rate of this process's threads, cut to its share of the cores when processes share them (`cpu_share`)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak(name)
        return peak, f"{name} datasheet bf16 dense" if peak else f"{name}: no datasheet figure known"
    if device.type == "cpu":
        share, threads, cores, local = cpu_share()
        source = f"measured {str(dtype).removeprefix('torch.')} matmul peak of this CPU"
        if share < 1:
            source += f"; {local} processes of {threads} threads share {cores} cores: {share:.3g} of it each"
        return cpu_peak(dtype) * share, source
    return None, f"{device.type}: no peak known"


class EfficiencyMeter:
    """Turns (tokens, items, seconds) into achieved model FLOP/s and MFU for the loop."""

    def __init__(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype, world_size: int):
        self.n_matmul, self.n_trainable = matmul_weights(model)
        self.head = head_weights(model)
        self.layers, self.hidden = model_shape(model)
        peak, self.peak_source = device_peak(device, dtype)
        self.peak = peak * world_size if peak else None
        self.device, self.dtype, self.world_size = device, dtype, world_size

    def flops_per_token(self, seq_len: float, extra_forwards: float = 0, head_share: float = 1.0,
                        copies: float = 1) -> float:
        return flops_per_token(self.n_matmul, self.n_trainable, self.layers, self.hidden, seq_len, extra_forwards,
                               self.head, head_share, copies)

    def forward_flops(self, tokens: int, squares: float, head_positions: int) -> float:
        """`forward_flops` of this model: a forward-only pass of it over other tokens than the trained ones."""
        return forward_flops(self.n_matmul, self.head[0], self.layers, self.hidden, tokens, squares, head_positions)

    def metrics(self, tokens_per_s: float, seq_len: float, extra_forwards: float = 0, head_share: float = 1.0,
                copies: float = 1, other_flops_per_token: float = 0.0) -> dict:
        """`other_flops_per_token`: model FLOPs counted as such (WorkTally.other_flops) per trained token."""
        per_token = self.flops_per_token(seq_len, extra_forwards, head_share, copies) + other_flops_per_token
        achieved = per_token * tokens_per_s
        out = {"model_tflops": achieved / 1e12}
        if self.peak and achieved > self.peak and self.device.type == "cpu":  # the cached probe ran on a busy CPU
            # the cache holds what one process's threads do alone, before its share of shared cores
            raise_cpu_peak(self.dtype, achieved / self.world_size / cpu_share()[0])
            self.peak = achieved
        if self.peak:
            out["mfu"] = achieved / self.peak
        return out
