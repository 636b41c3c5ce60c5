"""training.distributed: deepspeed: DeepSpeed ZeRO 2/3 through DeepSpeed's own engine (`deepspeed.initialize`).

    training.deepspeed: 2          ZeRO-2: gradients and optimizer state sharded over the processes
    training.deepspeed: 3          ZeRO-3: the weights too (gathered block by block for forward and backward)
    training.deepspeed_offload: optimizer | all      optimizer state (and with `all` the weights) in CPU memory
    training.deepspeed: ds.json    your own DeepSpeed config, used as is; its "auto" values are filled from this
                                   config the way Hugging Face Trainer fills them (optimizer and scheduler sections
                                   too, when they agree with training.*: TuneForge's own AdamW and schedule run)

The engine takes over what the loop does itself for the other engines: the micro-batch boundary
(`set_gradient_accumulation_boundary`), backward, gradient clipping and the optimizer step. TuneForge still builds
the optimizer (AdamW from training.lr, betas, weight decay, the method's parameter groups) and steps the schedule, so
a run is the same objective as one process. DeepSpeed also runs on CPU (its CPU accelerator, over the gloo process
group TuneForge starts), which is how the tests run it.

Checkpoints go through the engine's save/load_checkpoint (`checkpoint-N/deepspeed/`, one optimizer-state file per
process, the trainable tensors only); the final save gathers the fp32 master copy of every trained tensor to rank 0
and writes the usual Hugging Face / PEFT folder.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import warnings
from pathlib import Path

import torch

from tuneforge.errors import UserError
from tuneforge.methods.base import unwrap
from tuneforge.training.checkpoint import GLOBAL_MICRO_BATCH
from tuneforge.training.distributed import Strategy, load_into_plain
from tuneforge.training.runtime import Runtime

SHARD_DIR = "deepspeed"  # inside checkpoint-N/
TAG = "state"  # the engine's checkpoint tag: one checkpoint per folder, so a fixed name


def import_deepspeed(device: torch.device):
    """DeepSpeed picks its accelerator at import time; make it the device this run trains on (a CUDA machine running
    `training.device=cpu` would otherwise get the CUDA accelerator)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    # DeepSpeed's ZeRO calls torch collectives that torch now deprecates: every rank warned at the first step, about
    # library code the user cannot change
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` "
                            r"is deprecated", category=FutureWarning)
    try:
        import deepspeed
    except ImportError:
        raise UserError("training.distributed: deepspeed needs the DeepSpeed package, which is not installed: "
                        "`pip install 'tuneforge[deepspeed]'` (or `pip install deepspeed`), or use "
                        "`training.distributed=fsdp` (PyTorch FSDP2 shards like ZeRO-3).") from None
    return deepspeed


# ---- the DeepSpeed config ------------------------------------------------------------------------------------------
def zero_setting(t) -> str:
    """training.deepspeed as text: a stage ("2", "3") or a file path; unset means ZeRO-2."""
    return "2" if t.deepspeed is None else str(t.deepspeed)


def build_config(t, world_size: int) -> dict:
    """A ZeRO config from our own settings: batch geometry, clipping, precision and offload."""
    zero: dict = {"stage": int(zero_setting(t))}
    if t.deepspeed_offload in ("optimizer", "all"):
        zero["offload_optimizer"] = {"device": "cpu"}
    if t.deepspeed_offload == "all":
        zero["offload_param"] = {"device": "cpu"}
    return {**_ours(t, world_size), "zero_optimization": zero}


def _ours(t, world_size: int) -> dict:
    """The values our loop decides; a user's config must agree with them (or say "auto")."""
    return {"train_micro_batch_size_per_gpu": t.batch_size, "gradient_accumulation_steps": t.grad_accum,
            "train_batch_size": t.batch_size * t.grad_accum * world_size,
            "gradient_clipping": float(t.max_grad_norm) if t.max_grad_norm > 0 else 0.0,
            "bf16": {"enabled": t.precision == "bf16"}, "fp16": {"enabled": t.precision == "fp16"}}


def load_user_config(path: str, t, world_size: int, hidden_size: int) -> dict:
    """The user's DeepSpeed JSON as is, with "auto" filled (HF Trainer's rules) and checked against our loop."""
    try:
        user = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"training.deepspeed: cannot read {path} ({e.strerror}). Give a DeepSpeed JSON file or a "
                        f"ZeRO stage (2 or 3).") from None
    except json.JSONDecodeError as e:
        raise UserError(f"training.deepspeed: {path} is not valid JSON (line {e.lineno}, column {e.colno}: "
                        f"{e.msg}). Fix the file, or give a ZeRO stage (2 or 3) instead.") from None
    if not isinstance(user, dict) or not isinstance(user.get("zero_optimization", {}), dict):
        raise UserError(f"training.deepspeed: {path} must hold a JSON object with a `zero_optimization` object.")
    for section, check in (("optimizer", _check_optimizer), ("scheduler", _check_scheduler)):
        if section in user:
            check(user[section], t, path)  # it says what training.* already runs: TuneForge's own runs instead
            user = {k: v for k, v in user.items() if k != section}
    stage = user.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise UserError(f"training.deepspeed: {path} has zero_optimization.stage {stage!r}; use 0, 1, 2 or 3.")
    return fill_auto(user, _ours(t, world_size), hidden_size, path)


# ---- optimizer / scheduler sections: Hugging Face's example ds_configs carry both, full of "auto" ------------------
# HF Trainer fills them from TrainingArguments, which is what TuneForge's own AdamW and schedule take from training.*:
# such a section is accepted (and dropped, TuneForge's run instead) when each value is "auto" or agrees with
# training.*; one that asks for something else (another optimizer, schedule shape or value) is an error naming both.
_ANY = "any value"  # a setting of how DeepSpeed computes, not of what: TuneForge's own optimizer runs either way
_SCHEDULES = {"WarmupLR": "constant", "WarmupDecayLR": "linear", "WarmupCosineLR": "cosine"}


def _check_optimizer(section, t, path) -> None:
    kind = section.get("type") if isinstance(section, dict) else None
    if not isinstance(kind, str) or kind.lower() not in ("adam", "adamw"):
        _foreign_section(path, "optimizer", f"type {kind!r}; TuneForge runs AdamW")
    ours = {"lr": (t.lr, "training.lr"), "betas": (list(t.adam_betas), "training.adam_betas"),
            "eps": (1e-8, "torch AdamW's default eps"),
            "weight_decay": (t.weight_decay, "training.weight_decay"),
            "adam_w_mode": (True, "AdamW's decoupled weight decay"), "torch_adam": (None, _ANY)}
    _check_params(section, ours, path, "optimizer")


def _check_scheduler(section, t, path) -> None:
    kind = section.get("type") if isinstance(section, dict) else None
    if kind not in _SCHEDULES:
        _foreign_section(path, "scheduler", f"type {kind!r}; TuneForge runs training.scheduler linear, cosine or "
                                            f"constant, as WarmupDecayLR, WarmupCosineLR or WarmupLR")
    if _SCHEDULES[kind] != t.scheduler:
        raise UserError(f"training.deepspeed: {path} has a scheduler of type {kind} ({_SCHEDULES[kind]} after "
                        f"warmup), but training.scheduler is {t.scheduler}. Set `training.scheduler="
                        f"{_SCHEDULES[kind]}` to run the file's schedule, or remove its `scheduler` section "
                        f"(training.scheduler and training.warmup_* then decide, as they do without a file).")
    warmup = (t.warmup_steps, "training.warmup_steps") if t.warmup_steps > 0 or t.warmup_ratio == 0 else \
        (None, "training.warmup_ratio")  # a ratio's steps depend on the run's length: only "auto" agrees
    total = (t.max_steps, "training.max_steps") if t.max_steps > 0 else (None, "training.epochs")
    ours = {"warmup_min_lr": (0, "a warmup that starts from 0"), "warmup_max_lr": (t.lr, "training.lr"),
            "warmup_num_steps": warmup, "total_num_steps": total,
            "warmup_type": ("linear", "TuneForge's linear warmup"),
            "warmup_min_ratio": (0, "a warmup that starts from 0"),
            "cos_min_ratio": (0, "training.scheduler cosine, which ends at 0")}
    _check_params(section, ours, path, "scheduler")


def warmup_note(path: str, t) -> str | None:
    """A scheduler section without `warmup_type` would make DeepSpeed warm up log-shaped (its default); TuneForge
    runs its own linear warmup. Said when the run warms up at all (Hugging Face's example files leave it out)."""
    section = json.loads(Path(path).read_text(encoding="utf-8")).get("scheduler")  # read and checked already
    if not isinstance(section, dict) or "warmup_type" in section.get("params", {}):
        return None
    if t.warmup_steps <= 0 and t.warmup_ratio <= 0:
        return None
    return (f"note: training.deepspeed: {path}'s {section.get('type')} sets no warmup_type, so DeepSpeed alone "
            f"would warm up log-shaped (its default); TuneForge runs its own linear warmup (training.warmup_*) "
            f"instead. Add \"warmup_type\": \"linear\" to the file's scheduler params to make it say what runs.")


def _check_params(section: dict, ours: dict, path, name: str) -> None:
    params = section.get("params", {})
    if not isinstance(params, dict):
        _foreign_section(path, name, "its `params` is not an object")
    for key, given in params.items():
        if key not in ours:
            _foreign_section(path, name, f"params.{key}, which TuneForge's own {name} has no setting for")
        value, source = ours[key]
        if given == "auto" or source == _ANY or _same(given, value):
            continue
        if source.startswith("training.") and value is not None:
            _mismatch(path, f"{name}.params.{key}", given, value, source)
        runs = f"{source}" if value is None else f"{value!r} ({source})"
        raise UserError(f"training.deepspeed: {path} sets {name}.params.{key} to {given!r}, but this run "
                        f"{'derives it from' if value is None else 'runs'} {runs}. Set it to \"auto\" (or remove "
                        f"it) so the file follows the config.")


def _same(given, value) -> bool:
    if isinstance(value, list):
        return isinstance(given, list) and len(given) == len(value) and all(map(_same, given, value))
    if isinstance(value, bool) or isinstance(value, str):
        return given == value
    return isinstance(given, (int, float)) and not isinstance(given, bool) and float(given) == float(value)


def _foreign_section(path, section: str, why: str):
    raise UserError(f"training.deepspeed: {path} has an `{section}` section that TuneForge cannot run ({why}). "
                    f"TuneForge builds the optimizer and learning-rate schedule itself from training.lr, "
                    f"adam_betas, weight_decay, scheduler and warmup_* (and the method's parameter groups): remove "
                    f"`{section}` from the file and set those keys instead. (A Hugging Face-style section of "
                    f"\"auto\" values is read as those keys.)")


# what HF Trainer puts for these "auto" bucket sizes (transformers.integrations.deepspeed)
def _bucket_sizes(hidden: int) -> dict:
    return {"reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            "stage3_param_persistence_threshold": 10 * hidden}


def fill_auto(user: dict, ours: dict, hidden_size: int, path: str) -> dict:
    """Fill "auto" and missing loop values from `ours`; a value that differs from what the loop does is an error
    (the loop draws training.batch_size examples per micro-batch whatever the file says)."""
    out = copy.deepcopy(user)
    for key, value in ours.items():
        if isinstance(value, dict):  # bf16 / fp16: {"enabled": ...}
            section = out.setdefault(key, {})
            given = section.get("enabled", False)
            if given == "auto":
                section["enabled"] = value["enabled"]
            elif bool(given) != value["enabled"]:
                _mismatch(path, f"{key}.enabled", given, value["enabled"], "training.precision")
        elif out.get(key, "auto") == "auto":
            out[key] = value
        elif out[key] != value:
            _mismatch(path, key, out[key], value, _SOURCE[key])
    zero = out.setdefault("zero_optimization", {})
    for key, value in _bucket_sizes(hidden_size).items():
        if zero.get(key) == "auto":
            zero[key] = value
    left = _autos(out)
    if left:
        raise UserError(f"training.deepspeed: {path} sets {left[0]} to \"auto\", which TuneForge does not know how to "
                        f"fill. Give it a value.")
    return out


_SOURCE = {"train_micro_batch_size_per_gpu": "training.batch_size", "gradient_accumulation_steps":
           "training.grad_accum", "train_batch_size": "training.batch_size x grad_accum x processes",
           "gradient_clipping": "training.max_grad_norm"}


def _mismatch(path, key, given, ours, source):
    raise UserError(f"training.deepspeed: {path} sets {key} to {given!r}, but this run has {ours!r} "
                    f"({source}). Set it to \"auto\" (or remove it) so the file follows the config, or change "
                    f"{source}.")


def _autos(tree, prefix="") -> list[str]:
    if isinstance(tree, dict):
        return [k for key, v in tree.items() for k in _autos(v, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if tree == "auto" else []


def check_same_process_count(path: Path, world_size: int) -> None:
    """ZeRO's optimizer shards are cut per process: a checkpoint resumes with the process count that wrote it."""
    state = json.loads((path / "trainer_state.json").read_text())
    written_by = state.get("world_size")
    if written_by != world_size:
        micro = state.get("run", {}).get(GLOBAL_MICRO_BATCH)
        batch = f" and training.batch_size={micro // written_by}" if isinstance(micro, int) and written_by else ""
        raise UserError(f"{path} was written by {written_by} DeepSpeed processes and this run has {world_size}; its "
                        f"ZeRO optimizer shards resume with that same number of processes. Start torchrun with "
                        f"--nproc-per-node {written_by}{batch} (or use fsdp, whose checkpoints reshard).")


# ---- the strategy --------------------------------------------------------------------------------------------------
class DeepSpeedStrategy(Strategy):
    """The engine owns backward, clipping and the optimizer step; `prepare` hands it our model and optimizer."""

    name = "deepspeed"
    sharded_checkpoints = True
    shard_dir = SHARD_DIR

    def __init__(self, cfg):
        self.cfg = cfg

    @property
    def is_user_file(self) -> bool:
        return not zero_setting(self.cfg.training).isdigit()

    def wrap(self, model, runtime):
        return model  # deepspeed.initialize needs the optimizer too: `prepare` wraps, once the Trainer built it

    def ds_config(self, model, runtime: Runtime) -> dict:
        t = self.cfg.training
        if self.is_user_file:
            hidden = getattr(unwrap(model).config, "hidden_size", 1024)
            config = load_user_config(t.deepspeed, t, runtime.world_size, hidden)
        else:
            config = build_config(t, runtime.world_size)
        # our optimizer is torch's AdamW (DeepSpeed warns about "untested" client optimizers and, with offload,
        # would insist on its own compiled CPU Adam)
        config.setdefault("zero_allow_untested_optimizer", True)
        config.setdefault("zero_force_ds_cpu_optimizer", False)
        config.setdefault("steps_per_print", 10**9)  # TuneForge logs the metrics itself
        return config

    def prepare(self, model, optimizer, runtime: Runtime):
        deepspeed = import_deepspeed(runtime.device)
        # DeepSpeed reads these even when the process group exists (one process started without torchrun has none)
        for key, value in (("LOCAL_RANK", runtime.local_rank), ("RANK", runtime.rank),
                           ("WORLD_SIZE", runtime.world_size)):
            os.environ.setdefault(key, str(value))
        try:
            engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                              config=self.ds_config(model, runtime))
        except (AssertionError, ValueError, KeyError) as e:
            source = self.cfg.training.deepspeed if self.is_user_file else "the config built from training.*"
            raise UserError(f"training.deepspeed: DeepSpeed refused {source}: {e}. Check it against DeepSpeed's "
                            f"config reference (deepspeed.ai/docs/config-json).") from None
        return engine, ds_optimizer

    def no_sync(self, model, last):
        model.set_gradient_accumulation_boundary(last)  # reduce (and later step) only on the last micro-batch
        return contextlib.nullcontext()

    def backward(self, model, loss):
        # our loss is already divided by the global batch's target count: no further division by grad_accum
        model.backward(loss, scale_wrt_gas=False)

    def step(self, model, optimizer, max_norm: float) -> float:
        model.step()  # clips to gradient_clipping, steps the optimizer, zeroes the gradients
        norm = model.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def save_shards(self, tmp: Path, model, optimizer) -> None:
        model.save_checkpoint(str(tmp / SHARD_DIR), tag=TAG, save_latest=False, exclude_frozen_parameters=True)

    def load_shards(self, path: Path, model, optimizer) -> None:
        check_same_process_count(path, torch.distributed.get_world_size())
        loaded, _ = model.load_checkpoint(str(path / SHARD_DIR), tag=TAG, load_module_strict=False,
                                          load_optimizer_states=True, load_lr_scheduler_states=False)
        if loaded is None:
            raise UserError(f"Checkpoint {path}: DeepSpeed found no state in {path / SHARD_DIR}. Resume from "
                            f"another checkpoint or start again.")

    def export_model(self, model, build_plain):
        """Gather the fp32 master copy of each trained tensor (a collective under ZeRO-3: every rank, same order)
        to rank 0 and load it into a plain copy of the model, so each method's `save` writes its usual folder."""
        from deepspeed.utils import safe_get_full_fp32_param

        rank0 = torch.distributed.get_rank() == 0
        trained = {}
        for name, p in unwrap(model).named_parameters():
            if not p.requires_grad:
                continue
            full = safe_get_full_fp32_param(p)
            if rank0:
                trained[name] = (full if full is not None else p.detach()).float().cpu().clone()
        return load_into_plain(trained, build_plain) if rank0 else None
