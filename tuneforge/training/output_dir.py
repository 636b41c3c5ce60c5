"""The output folder of a run: checked before any work starts, created (or cleared) only once training begins.

    check_output_dir(cfg)              before the model loads: a file in the way, or an earlier run in the folder
    prepare_output_dir(cfg, rt, log)   right before the first step: clear (overwrite_output_dir), create, remove
                                       temp folders of killed saves, write tuneforge_config.yaml

A new run never mixes with an earlier one: a folder that holds anything (other than this run's own input data and
hidden files) is refused unless `training.resume` continues it or `overwrite_output_dir: true` clears it. Clearing
deletes only from a folder that looks like a TuneForge output folder (tuneforge_config.yaml or a checkpoint), so a
mistyped `output_dir=~` never deletes someone's files.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from tuneforge.errors import UserError, cannot_write

TEMP_RE = re.compile(r"^(?P<final>.+)\.tmp-(?P<pid>\d+)$")  # what atomic_dir / write_atomic leave when killed
OLD_RE = re.compile(r"^(?P<final>checkpoint-\d+)\.old$")  # checkpoint.commit's backup while replacing a checkpoint


def _kept_inputs(cfg, out: Path) -> set[str]:
    """Top-level entries of `out` that this run reads (data files, the model): never counted, never deleted."""
    paths = [s.path for s in [*cfg.data.train, *cfg.data.eval]] + [cfg.model.name_or_path]
    if cfg.data.registry:
        paths.append(cfg.data.registry)
    kept = set()
    for p in paths:
        try:
            rel = Path(p).resolve().relative_to(out.resolve())
        except (ValueError, OSError):
            continue
        if rel.parts:
            kept.add(rel.parts[0])
    return kept


def existing_entries(cfg, out: Path) -> list[Path]:
    """What an earlier run (or anyone) left in `out`, less hidden files and this run's own inputs."""
    if not out.is_dir():
        return []
    kept = _kept_inputs(cfg, out)
    return sorted(p for p in out.iterdir() if not p.name.startswith(".") and p.name not in kept)


def looks_like_run_folder(out: Path) -> bool:
    return (out / "tuneforge_config.yaml").is_file() or any(out.glob("checkpoint-*/trainer_state.json"))


def _holds_final_model(out: Path) -> bool:
    """A finished run's export (save_final writes these; a run stopped before its end leaves checkpoints instead)."""
    return any((out / name).is_file() for name in ("adapter_config.json", "config.json"))


def _shown(entries: list[Path], n: int = 8) -> str:
    names = [p.name + ("/" if p.is_dir() else "") for p in entries[:n]]
    return ", ".join(names) + (f" and {len(entries) - n} more" if len(entries) > n else "")


def check_output_dir(cfg) -> None:
    """Refuse, before any work, an output_dir that cannot or should not take this run. Writes nothing."""
    out = Path(cfg.output_dir)
    for p in [out, *out.parents]:
        if p.exists() and not p.is_dir():
            raise UserError(f"output_dir {out}: {p} is a file, not a folder. Pick another `output_dir` (or move "
                            f"the file away).")
    if not out.exists():
        _check_creatable(out)
    entries = existing_entries(cfg, out)
    checkpoints = any(out.glob("checkpoint-*/trainer_state.json"))
    if entries and cfg.training.resume == "auto" and not checkpoints and _holds_final_model(out):
        raise UserError(f"`training.resume=auto` found no checkpoint in {out}, which holds a finished run's model: "
                        f"this run would start from step 0 and replace it. To train that model further, give it as "
                        f"`model.name_or_path` with another `output_dir`; to start over, `overwrite_output_dir=true`.")
    if not entries or cfg.training.resume is not None:
        return
    if not cfg.overwrite_output_dir:
        resume = "Continue the earlier run with `training.resume=auto`, " if checkpoints else ""
        raise UserError(
            f"output_dir {out} is not empty (it holds {_shown(entries)}). A new run there would mix its "
            f"checkpoints with the old ones. {resume}Start over with `overwrite_output_dir=true` (deletes what is "
            f"there), or pick another `output_dir`.")
    if not looks_like_run_folder(out):
        raise UserError(
            f"output_dir {out} is not empty and does not look like a TuneForge output folder (no "
            f"tuneforge_config.yaml, no checkpoint-*), so `overwrite_output_dir` will not delete it: it holds "
            f"{_shown(entries)}. Empty it yourself or pick another `output_dir`.")
    model = Path(cfg.model.name_or_path)
    if model.exists() and model.resolve() == out.resolve():
        raise UserError(f"`model.name_or_path` is the output_dir {out} itself: `overwrite_output_dir` would delete "
                        f"the model this run starts from. Pick another `output_dir`.")


def _check_creatable(out: Path) -> None:
    """The folder `out` could be created: its nearest existing parent takes a new folder (a probe, removed at once).
    Otherwise the run would fail after loading the model, in a traceback of the first mkdir."""
    parent = next((p for p in out.parents if p.exists()), Path("."))
    try:  # a unique name: ranks on other nodes of a shared file system may have the same pid
        Path(tempfile.mkdtemp(prefix=".tuneforge-probe-", dir=parent)).rmdir()
    except OSError as e:
        raise cannot_write(out, e, "output_dir") from None


def prepare_output_dir(cfg, log=print) -> Path:
    """On the main process, right before training: clear (overwrite_output_dir), create, sweep temp folders of
    killed saves. The caller then writes tuneforge_config.yaml."""
    out = Path(cfg.output_dir)
    if cfg.overwrite_output_dir and cfg.training.resume is None:
        entries = existing_entries(cfg, out)
        if entries:
            log(f"overwrite_output_dir: deleting {_shown(entries, 20)} from {out}")
        for p in entries:
            _remove(p)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out, log)
    return out


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():  # a link is removed, never followed into what it points at
        shutil.rmtree(p)
    else:
        p.unlink()


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours cannot be in progress yet: this process has not saved anything
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def remove_stale_temps(out: Path, log=print) -> None:
    """Temp folders/files of saves killed mid-write (`<name>.tmp-<pid>`) are removed when that pid is gone; a
    `checkpoint-N.old` left between the two renames of a replaced checkpoint is put back or removed. The pid is
    looked up on this machine: only rank 0 of one job writes a folder, so a live writer elsewhere is not expected."""
    for p in sorted(out.iterdir()):
        m = TEMP_RE.match(p.name)
        if m and not pid_alive(int(m.group("pid"))):
            log(f"removing {p.name}: an unfinished save of process {m.group('pid')}, which is no longer running")
            _remove(p)
        elif (m := OLD_RE.match(p.name)) and p.is_dir():
            final = out / m.group("final")
            if final.exists():
                shutil.rmtree(p)
            else:
                p.rename(final)
