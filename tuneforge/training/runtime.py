"""Where the run executes: device, precision, and (under torchrun) the process group.

The recipe code is the same for 1..N processes; this module reads torchrun's environment (RANK, WORLD_SIZE,
LOCAL_RANK) and picks gloo on CPU or NCCL on GPU.
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype  # compute dtype of the forward pass
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    engine: str = "none"  # training.distributed resolved: none, ddp, fsdp or deepspeed (training/distributed.py)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def precision(self) -> str:
        """The compute dtype's config name (fp32, bf16, fp16): what `precision: auto` resolved to."""
        return next(name for name, dtype in DTYPES.items() if dtype == self.dtype)

    @property
    def sharded(self) -> bool:
        """Each process holds a part of the weights (FSDP, DeepSpeed ZeRO): a forward is a collective."""
        return self.engine in ("fsdp", "deepspeed")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        """Mixed precision: frozen weights may be stored in bf16/fp16 while trainable ones stay fp32."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX). Without it, PyTorch emulates bf16 matmuls
    and a bf16 run is an order of magnitude slower than fp32 (measured here on an AVX2-only EPYC: 25x)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` becomes bf16 where the hardware computes it natively, else fp32; other values pass through."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"


def setup_runtime(device: str, precision: str, distributed: str = "auto") -> Runtime:
    """Initialise the process group when launched by torchrun (or, for a sharding engine, a group of one process,
    so FSDP and its sharded checkpoints work the same in one process); otherwise a single process."""
    from tuneforge.training.distributed import resolve_engine

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    engine = resolve_engine(distributed, world_size)
    if (world_size > 1 or engine in ("fsdp", "deepspeed")) and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend=backend)
        else:  # one process started without torchrun
            dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                                    world_size=1)
    if rank != 0:
        quiet_progress_bars()
    dtype = DTYPES[resolve_precision(precision, dev)]
    return Runtime(device=dev, dtype=dtype, rank=rank, world_size=world_size, local_rank=local_rank, engine=engine)


def quiet_progress_bars() -> None:
    """On ranks other than 0: transformers' and the Hub's progress bars (`Loading weights`, downloads) off, as every
    rank loads the same model and a torchrun log showed each bar once per process; rank 0's bars still show."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with contextlib.suppress(ImportError):
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def rng_state() -> dict:
    """All RNG states as plain data/tensors (loadable with torch.load(weights_only=True))."""
    np_state = np.random.get_state()
    state = {"python": list(random.getstate()), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
             "torch": torch.get_rng_state()}
    state["python"][1] = list(state["python"][1])
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
