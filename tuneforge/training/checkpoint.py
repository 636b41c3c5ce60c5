"""Resumable checkpoints, written atomically.

    output_dir/checkpoint-<step>/
        trainable.safetensors   the trainable tensors (all weights for `full`, the adapter for LoRA, ...)
        optimizer.pt            optimizer state (tensors + numbers; loaded with weights_only=True)
        scheduler.pt            LR scheduler state
        rng.pt                  Python, NumPy, torch (and CUDA) RNG states
        trainer_state.json      step, data position, metrics so far, and the run's fingerprint (what must not
                                change on resume: model, method and options, batch geometry, data)
        dcp/                    instead of trainable.safetensors + optimizer.pt with training.distributed=fsdp:
                                the trainable tensors and optimizer state sharded by torch.distributed.checkpoint,
                                one file per writing rank (loads into any number of processes)

A checkpoint is first written to `checkpoint-<step>.tmp-<pid>` and then renamed, so a crash never leaves a
half-written checkpoint that `resume: auto` would pick up; the next run in the folder removes such leftovers
(`output_dir.remove_stale_temps`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tuneforge.errors import UserError
from tuneforge.training.runtime import rng_state, set_rng_state

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def atomic_dir(final: Path, tmp: Path | None = None):
    """A temp folder next to `final`; call `commit(tmp, final)` once it is complete."""
    tmp = tmp or final.with_name(f"{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, final: Path) -> None:
    if final.exists():
        old = final.with_name(final.name + ".old")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)


def save_checkpoint(output_dir: Path, step: int, trainable: dict[str, torch.Tensor], optimizer, scheduler,
                    trainer_state: dict, keep: int, extra_save=None) -> Path:
    final = output_dir / f"checkpoint-{step}"
    tmp = atomic_dir(final)
    save_file({k: v.contiguous().cpu() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    if extra_save is not None:
        extra_save(tmp)
    commit(tmp, final)
    prune(output_dir, keep)
    return final


def prune(output_dir: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints (all when keep <= 0)."""
    for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def find_resume(resume: str | None, output_dir: Path) -> Path | None:
    if resume is None:
        return None
    if resume == "auto":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise UserError(f"{path} is not a TuneForge checkpoint (no trainer_state.json). Pass a folder like "
                        f"{output_dir}/checkpoint-10, or `training.resume=auto`.")
    return path


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore trainable tensors, optimizer, scheduler and RNG; return the trainer state (step, data position)."""
    tensors = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [k for k in tensors if k not in params]
    if missing:
        raise UserError(f"Checkpoint {path} does not match this model/method: it has tensors the model lacks "
                        f"(first: {missing[0]}). Resume with the same model, method and options.")
    wrong = [k for k in tensors if tensors[k].shape != params[k].shape]
    if wrong:
        raise UserError(f"Checkpoint {path} does not match this model/method: tensor {wrong[0]} has shape "
                        f"{tuple(tensors[wrong[0]].shape)} there and {tuple(params[wrong[0]].shape)} here. Resume "
                        f"with the same model, method and options.")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return json.loads((path / "trainer_state.json").read_text())


def run_fingerprint(cfg, world_size: int, train_items: list | None) -> dict:
    """What a resumed run must share with the run that wrote the checkpoint. Batch geometry is the global
    micro-batch (batch_size x processes: 2 x 2 may resume as 1 x 4, the batches are the same) and grad_accum.
    Without `train_items` (before the data is encoded) only the settings part."""
    from tuneforge.configs.typed import to_dict
    from tuneforge.methods import METHODS

    method = METHODS[cfg.method]
    sections = getattr(method, "uses_sections", None) or ((method.section,) if method.section else ())
    found = {"stage": cfg.stage, "model.name_or_path": cfg.model.name_or_path, "method": cfg.method,
             "method options": {s: to_dict(cfg.options(s)) for s in sections},
             GLOBAL_MICRO_BATCH: cfg.training.batch_size * world_size,
             "training.grad_accum": cfg.training.grad_accum, "data.seed": cfg.data.seed}
    if cfg.training.distributed == "deepspeed":  # ZeRO-2 optimizer shards do not load into ZeRO-3 (or another file)
        found["training.deepspeed"] = cfg.training.deepspeed
    if train_items is not None:
        found.update({"training examples": len(train_items), "training data hash": data_hash(train_items)})
    return json.loads(json.dumps(found))  # as it reads back from trainer_state.json (tuples become lists)


def _tokens(item) -> list:
    if hasattr(item, "chosen"):  # a preference pair (EncodedPair): both sides
        return [_tokens(item.chosen), _tokens(item.rejected)]
    if hasattr(item, "label"):  # a KTO row: whether it is desirable is part of the data
        return [item.input_ids, item.labels, item.label]
    return [item.input_ids, getattr(item, "labels", None)]  # prompts (ppo, grpo) have no labels


def data_hash(items: list) -> str:
    """A digest of the encoded training data (so it covers files, template, max_length, packing): every length,
    and the tokens of up to 2000 evenly spaced examples (hashing all tokens of a big set would take minutes)."""
    h = hashlib.sha256(json.dumps([len(x) for x in items]).encode())
    stride = max(1, len(items) // 2000)
    for item in items[::stride]:
        h.update(json.dumps(_tokens(item)).encode())
    return h.hexdigest()[:16]


def check_same_run(path: Path, current: dict, world_size: int | None = None) -> bool:
    """Raise naming every difference between the run that wrote checkpoint `path` and this one (the keys of
    `current` only). False when the checkpoint predates fingerprints (nothing to compare). `world_size`: this run's
    process count, to say which training.batch_size resumes with it."""
    state = json.loads((path / "trainer_state.json").read_text())
    saved = state.get("run")
    if saved is None:
        return False
    diffs = fingerprint_differences(saved, current)
    if diffs:
        hint = process_count_hint(state, current, world_size)
        raise UserError(
            f"Cannot resume from {path}: it was written by a different run ({'; '.join(diffs)}). {hint}Resume with "
            f"the settings of that run (its output_dir holds them in tuneforge_config.yaml), or start a new run in "
            f"another output_dir (or with `overwrite_output_dir=true` and without `training.resume`).")
    return True


GLOBAL_MICRO_BATCH = "global micro-batch (training.batch_size x processes)"


def process_count_hint(state: dict, current: dict, world_size: int | None) -> str:
    """When only the process count moved the global micro-batch: the training.batch_size that keeps it (a run
    resumes with another number of processes when batch_size x processes stays the same), or why none does."""
    saved_global, now_global = state["run"].get(GLOBAL_MICRO_BATCH), current.get(GLOBAL_MICRO_BATCH)
    written_by = state.get("world_size")
    if not world_size or saved_global == now_global or not isinstance(saved_global, int) or not written_by:
        return ""
    if world_size == written_by:
        return (f"The checkpoint's micro-batch is training.batch_size={saved_global // written_by} per process "
                f"({written_by} process(es)). ")
    if "training.deepspeed" in current:  # ZeRO's optimizer shards are cut per process
        return (f"A DeepSpeed checkpoint resumes with the number of processes that wrote it: start torchrun with "
                f"--nproc-per-node {written_by} and training.batch_size={saved_global // written_by}. ")
    if saved_global % world_size:
        return (f"{world_size} process(es) cannot keep its global micro-batch of {saved_global} examples (training."
                f"batch_size x processes): start a process count that divides {saved_global} (it was written by "
                f"{written_by}). ")
    return (f"To resume with {world_size} process(es) instead of {written_by}, set `training.batch_size="
            f"{saved_global // world_size}`: the global micro-batch (batch_size x processes, {saved_global} "
            f"examples) must stay the same, and with it the batches and the loss curve. ")


def fingerprint_differences(saved: dict, current: dict) -> list[str]:
    """'key: A in the checkpoint, B now' for each key of `current` that differs (method options field by field). A
    changed method comes first, and the options then are not compared: the two methods read different sections, so
    every option of either would read as 'None now'."""
    out = []
    method_changed = saved.get("method") != current.get("method")
    for key in current:
        a, b = saved.get(key), current.get(key)
        if key == "method options" and method_changed:
            continue
        if key == "method options" and isinstance(a, dict) and isinstance(b, dict):
            flat_a, flat_b = _flatten(a), _flatten(b)
            out += [f"{k}: {flat_a.get(k)!r} in the checkpoint, {flat_b.get(k)!r} now"
                    for k in sorted(flat_a.keys() | flat_b.keys()) if flat_a.get(k) != flat_b.get(k)]
        elif a != b:
            out.append(f"{key}: {a!r} in the checkpoint, {b!r} now")
    return sorted(out, key=lambda line: (not line.startswith("method:"), line))


def _flatten(sections: dict) -> dict:
    return {f"{s}.{k}": v for s, opts in sections.items() for k, v in opts.items()}
