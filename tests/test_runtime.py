"""Runtime choices: `precision: auto` picks bf16 only where the hardware computes it natively."""

from __future__ import annotations

import torch

from tuneforge.training import runtime


def test_auto_precision_follows_the_cpu_flags(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    assert runtime.resolve_precision("auto", cpu) == "fp32"
    assert runtime.resolve_precision("bf16", cpu) == "bf16"  # an explicit choice is kept
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    assert runtime.resolve_precision("auto", cpu) == "bf16"
    assert runtime.setup_runtime("cpu", "auto").dtype == torch.bfloat16


def test_native_bf16_detection_reads_cpuinfo_flags(monkeypatch, tmp_path):
    real_read = runtime.Path.read_text

    def fake(flags):
        def read_text(self, *a, **k):
            return f"processor : 0\nflags : fpu sse2 {flags}\n" if str(self) == "/proc/cpuinfo" else real_read(self)
        return read_text

    monkeypatch.setattr(runtime.Path, "read_text", fake("avx2 avx512f"))
    assert not runtime.cpu_has_native_bf16()
    monkeypatch.setattr(runtime.Path, "read_text", fake("avx2 avx512f avx512_bf16"))
    assert runtime.cpu_has_native_bf16()
