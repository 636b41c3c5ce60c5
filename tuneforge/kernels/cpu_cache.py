"""What short probes measured about this machine's CPU (its matmul peak, which library multiplies faster), kept as
JSON under the TuneForge cache folder ($TUNEFORGE_CACHE, default ~/.cache/tuneforge) so that each is measured once
per machine and thread count, not at every run. Written to a temp file, then renamed: two processes probing at once
never leave a torn file (the later write wins)."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch


def cache_file() -> Path:
    return Path(os.environ.get("TUNEFORGE_CACHE") or "~/.cache/tuneforge").expanduser() / "cpu_probes.json"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def machine_key() -> str:
    """This CPU and this process's thread count: what a probe's figure holds for."""
    return f"{platform.processor() or platform.machine()}|{cpu_model()}|threads={torch.get_num_threads()}"


def read() -> dict:
    try:
        cached = json.loads(cache_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return cached if isinstance(cached, dict) else {}


def update(entries: dict) -> None:
    """Merge `entries` into the cache; a read-only home only means measuring again next time."""
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({**read(), **entries}, indent=1), encoding="utf-8")
        tmp.replace(path)
    except OSError:
        pass
