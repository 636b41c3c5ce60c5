"""How the model is spread over processes: none, DDP, FSDP2 or DeepSpeed, applied from outside the model code.

A `Strategy` wraps the built model (torchtitan's order: the model code stays single-device, parallelism goes on
last) and answers the few questions the loop has whose answer depends on the engine: how to skip the gradient sync
of a micro-batch, how to clip, how to write and read a checkpoint, and how to gather the result for export.

    training.distributed: ddp     every rank holds the whole model; gradients all-reduced (torch DDP)
    training.distributed: fsdp    PyTorch FSDP2: `fully_shard` per decoder block, then the root; parameters,
                                  gradients and optimizer state sharded over ranks; checkpoints through
                                  torch.distributed.checkpoint (sharded, resumable with another process count)
    training.distributed: deepspeed   DeepSpeed ZeRO 2/3 through DeepSpeed's engine (training/deepspeed_zero.py;
                                      `pip install tuneforge[deepspeed]`; runs on CPU too)
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from tuneforge.errors import UserError
from tuneforge.methods.base import unwrap
from tuneforge.training.runtime import Runtime, rng_state, set_rng_state

ENGINES = ("auto", "none", "ddp", "fsdp", "deepspeed")


def resolve_engine(name: str, world_size: int) -> str:
    """`auto`: DDP under torchrun (more than one process), none in one process."""
    if name == "auto":
        return "ddp" if world_size > 1 else "none"
    if name == "none" and world_size > 1:
        raise UserError(f"training.distributed: none, but torchrun started {world_size} processes: each would train "
                        f"its own copy on its share of the data. Use `training.distributed=auto` (ddp) or fsdp, or "
                        f"start one process.")
    if name == "ddp" and world_size == 1:
        return "none"  # DDP over one process only adds a wrapper
    return name


class Strategy:
    """One process, or ranks that each hold the whole model (the base for DDP)."""

    name = "none"
    sharded_checkpoints = False  # True: checkpoints hold `shard_dir`/ (files per rank) instead of safetensors + .pt
    shard_dir = ""

    def wrap(self, model: torch.nn.Module, runtime: Runtime) -> torch.nn.Module:
        return model

    def prepare(self, model, optimizer, runtime: Runtime):
        """Once the optimizer exists: (model, optimizer) as the loop uses them (DeepSpeed's engine wraps both)."""
        return model, optimizer

    def no_sync(self, model, last: bool):
        """Skip the gradient exchange on all but the last micro-batch of a step (the sum is the same)."""
        return contextlib.nullcontext()

    # fp16 compute: gradients under fp16's smallest value (~6e-8) flush to zero in the backward unless the loss is
    # scaled up first; torch's GradScaler scales, unscales before clipping and skips a step whose gradients
    # overflowed, lowering the scale (set by build_strategy; DeepSpeed scales in its own engine)
    scaler: torch.amp.GradScaler | None = None

    def backward(self, model, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, model, optimizer, max_norm: float) -> float:
        """Clip, step the optimizer, zero the gradients; the gradient norm before clipping. Under fp16 loss scaling a
        non-finite norm means the step was skipped (the scale is lowered), not that training diverged."""
        params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        norm = self.clip(params, max_norm) if params else 0.0
        if self.scaler is not None:
            self.scaler.step(optimizer)  # skipped when unscale_ found inf/nan
            self.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def clip(self, params: list[torch.Tensor], max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def export_model(self, model, build_plain):
        """The model to hand to `Method.save` on rank 0 (None on other ranks). Collective: every rank calls it."""
        return unwrap(model)


class DDPStrategy(Strategy):
    name = "ddp"

    def wrap(self, model, runtime):
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        return DDP(model, device_ids=ids)

    def no_sync(self, model, last):
        return contextlib.nullcontext() if last else model.no_sync()


def decoder_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks: modules whose class the HF model lists in `_no_split_modules` (what
    Accelerate's device map and FSDP auto-wrap also use), else the children of the longest ModuleList."""
    plain = unwrap(model)
    base = plain.get_base_model() if hasattr(plain, "get_base_model") else plain
    names = set(getattr(base, "_no_split_modules", None) or [])
    blocks = [m for m in base.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in base.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


class FSDPStrategy(Strategy):
    """PyTorch FSDP2. Frozen weights are sharded like trainable ones (FSDP2 allows both in one group), so LoRA on a
    model too big for one device works; only the trainable tensors and their optimizer state go into checkpoints."""

    name = "fsdp"
    sharded_checkpoints = True
    shard_dir = "dcp"

    def __init__(self, cpu_offload: bool = False):
        self.cpu_offload = cpu_offload

    def wrap(self, model, runtime):
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        kwargs = {}
        if runtime.dtype != torch.float32:  # compute in bf16/fp16, reduce gradients in fp32
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=runtime.dtype, reduce_dtype=torch.float32)
        if self.cpu_offload and runtime.device.type != "cpu":  # on CPU the shards are in CPU memory already (and
            kwargs["offload_policy"] = CPUOffloadPolicy()  # its pinned copies need an accelerator: setup_run says so)
        for block in decoder_blocks(model):
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        return model

    def no_sync(self, model, last):
        model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def clip(self, params, max_norm):
        from torch.distributed.tensor import DTensor

        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        if isinstance(norm, DTensor):  # each rank holds a shard: the norm of the whole gradient needs them all
            norm = norm.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
        return float(norm)

    @staticmethod
    def _state_dicts(model, optimizer):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))

    def save_shards(self, tmp: Path, model, optimizer) -> None:
        """torch.distributed.checkpoint: the trainable tensors and their optimizer state, one file per rank."""
        import torch.distributed.checkpoint as dcp

        model_sd, optim_sd = self._state_dicts(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "dcp"))

    def load_shards(self, path: Path, model, optimizer) -> None:
        """DCP reshards on load: a checkpoint written by N processes loads into M."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        model_sd, optim_sd = self._state_dicts(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path / "dcp"))
        # strict=False: the state holds only the trainable tensors (frozen weights come from the base model)
        loaded = set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                                options=StateDictOptions(ignore_frozen_params=True, strict=False))
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        missing = [k for k in loaded.missing_keys if k in trainable]
        if missing:
            raise UserError(f"Checkpoint {path} lacks trainable tensors of this model (first: {missing[0]}). Resume "
                            f"with the same model, method and options.")

    def export_model(self, model, build_plain):
        """Gather the trained tensors to rank 0 (full, on CPU) and load them into a plain copy of the model built
        the way training built it, so every method's own `save` writes the usual HF/PEFT folder. Costs one more
        load of the base weights on rank 0."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        trained = get_model_state_dict(model, options=options)
        return load_into_plain(trained, build_plain) if dist.get_rank() == 0 else None


def load_into_plain(trained: dict, build_plain):
    """The gathered trained tensors (rank 0) in a plain copy of the model, built the way training built it, so each
    method's own `save` writes the usual HF/PEFT folder (FSDP2 and DeepSpeed exports share this)."""
    plain = build_plain()
    result = plain.load_state_dict(trained, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"export: gathered tensors the plain model lacks: {result.unexpected_keys[:3]}")
    return plain


def check_deepspeed(cfg, runtime: Runtime) -> list[str]:
    """Before the model loads: DeepSpeed is installed (it picks the run's device as its accelerator) and a user's
    DeepSpeed JSON reads and agrees with training.* (its bucket sizes are filled later, from the model). Returns
    notes on what runs differently from what the file would make DeepSpeed do."""
    from tuneforge.training.deepspeed_zero import DeepSpeedStrategy, import_deepspeed, load_user_config, warmup_note

    import_deepspeed(runtime.device)
    if not DeepSpeedStrategy(cfg).is_user_file:
        return []
    load_user_config(cfg.training.deepspeed, cfg.training, runtime.world_size, hidden_size=1)
    note = warmup_note(cfg.training.deepspeed, cfg.training)
    return [note] if note else []


def build_strategy(cfg, runtime: Runtime) -> Strategy:
    t = cfg.training
    engine = runtime.engine
    if engine == "fsdp":
        return FSDPStrategy(cpu_offload=t.fsdp_cpu_offload)
    if engine == "deepspeed":
        from tuneforge.training.deepspeed_zero import DeepSpeedStrategy

        return DeepSpeedStrategy(cfg)
    strategy = DDPStrategy() if engine == "ddp" else Strategy()
    if runtime.dtype == torch.float16:
        strategy.scaler = torch.amp.GradScaler(runtime.device.type)
    return strategy


def check_eval_suite_unsharded(t, runtime: Runtime) -> None:
    """training.eval_suite runs on rank 0 alone (the others wait at a barrier): with FSDP or ZeRO-3 each forward of
    rank 0 gathers the weight shards from every rank, which never join, and the run hung at the first eval step. In
    one process rank 0 holds every shard. Called before the model loads."""
    if not t.eval_suite or runtime.world_size == 1:
        return
    zero3 = False
    if runtime.engine == "deepspeed":
        from tuneforge.training.deepspeed_zero import zero_setting

        setting = zero_setting(t)
        zero3 = setting == "3" or (not setting.isdigit() and _json_zero_stage(setting) == 3)
    if runtime.engine == "fsdp" or zero3:
        engine = "fsdp" if runtime.engine == "fsdp" else "deepspeed with ZeRO-3"
        raise UserError(f"training.eval_suite runs on the first process alone, which cannot run a model sharded with "
                        f"training.distributed={engine} (the run would hang at the first eval step). Use "
                        f"`training.distributed=ddp` (or ZeRO-2) with the eval suite, or drop `training.eval_suite` "
                        f"and score the checkpoints or the final model with `tuneforge eval`.")


def _json_zero_stage(path: str) -> int | None:
    """zero_optimization.stage of a user's DeepSpeed JSON, None where it cannot be read (said later, when loaded)."""
    try:
        stage = json.loads(Path(path).read_text(encoding="utf-8")).get("zero_optimization", {}).get("stage")
    except (OSError, ValueError, AttributeError):
        return None
    return stage if isinstance(stage, int) else None


def check_method_supported(engine: str, method_name: str) -> None:
    if engine == "fsdp" and method_name == "qlora":
        raise UserError("training.distributed: fsdp cannot shard qlora's packed 4-bit weights here. Use "
                        "`training.distributed=ddp` for qlora, or method=lora with fsdp (the frozen base is sharded "
                        "over the processes instead of quantized).")


# ---- sharded checkpoints: the engine writes the tensors, rank 0 the rest ---------------------------------------------
def save_sharded(tmp: Path, strategy: Strategy, model, optimizer, scheduler, trainer_state: dict,
                 runtime: Runtime) -> None:
    """Every rank writes its shards of the trainable tensors and their optimizer state into `tmp/<shard_dir>`;
    rank 0 adds the scheduler, RNG and trainer state (the same files as an unsharded checkpoint)."""
    strategy.save_shards(tmp, model, optimizer)
    if runtime.is_main:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))


def load_sharded(path: Path, strategy: Strategy, model, optimizer, scheduler) -> dict:
    if not (path / strategy.shard_dir).is_dir():
        raise UserError(f"{path} was written without training.distributed={strategy.name} (it has no "
                        f"{strategy.shard_dir}/ folder of sharded tensors). Resume it with the engine that wrote it "
                        f"(see its tuneforge_config.yaml).")
    strategy.load_shards(path, model, optimizer)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return json.loads((path / "trainer_state.json").read_text())


def shared_temp_name(final: Path, runtime: Runtime) -> Path:
    """One temp folder name for all ranks (rank 0's pid), so every rank writes its shards into the same place."""
    names = [f"{final.name}.tmp-{os.getpid()}"]
    if runtime.distributed:
        dist.broadcast_object_list(names, src=0)
    return final.with_name(names[0])


def sharded_frozen_copy(model, cfg, runtime: Runtime):
    """A frozen copy of an FSDP-sharded model with its current weights (FSDP2 refuses `copy.deepcopy`: DPO's and
    KTO's reference for full/freeze crashed with "FSDP does not support deepcopy"): a second model built as
    training built it, sharded the same way, then given the model's own shards (same placements: no gathering)."""
    from tuneforge.training.setup import build_model

    plain = build_model(cfg, runtime, runtime.device, getattr(model, "tuneforge_extend", None))[0]
    frozen = FSDPStrategy(cpu_offload=cfg.training.fsdp_cpu_offload).wrap(plain, runtime)  # as the policy's
    with torch.no_grad():
        frozen.load_state_dict(model.state_dict())
    frozen.requires_grad_(False)
    return frozen.eval()
