"""bench/bench_lora_sft.py's own parts (its LLaMA-Factory side needs bench/.venv-llamafactory, which CI lacks): the
own-defaults config is a valid TuneForge run of the README example, and the adapter count it adds to LLaMA-Factory's
MFU is PEFT's own."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.scripts import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_lora_sft")


def test_all_linear_adapter_weights_are_what_peft_trains(bench, tiny_qwen2_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir),
                           LoraConfig(r=4, target_modules="all-linear"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert bench.all_linear_adapter_weights(Path(tiny_qwen2_dir), 4) == trainable


def test_own_defaults_is_the_quickstart_on_the_benchmark_model_and_data(bench, tiny_qwen2_dir, tmp_path):
    import argparse

    from tuneforge.configs.schema import load_train_config

    args = argparse.Namespace(steps=3, seed=1, batch_size=8, max_length=128, rank=8, alpha=16.0, lr=1e-4,
                              precision="fp32", group_by_length=False)
    cfg = load_train_config(None, [], base=bench.tuneforge_own_defaults(Path(tiny_qwen2_dir), tmp_path / "out", args))
    quickstart = load_train_config(Path(bench.ROOT / "examples" / "quickstart.yaml"), [])
    assert cfg.model.name_or_path == str(tiny_qwen2_dir) and cfg.training.max_steps == 3
    assert (cfg.options("lora").rank, cfg.training.batch_size, cfg.training.lr, cfg.training.precision) == (
        quickstart.options("lora").rank, quickstart.training.batch_size, quickstart.training.lr,
        quickstart.training.precision)
    lf = bench.llamafactory_own_defaults(Path(tiny_qwen2_dir), "qwen", None, tmp_path, tmp_path / "lf", args)
    assert lf["per_device_train_batch_size"] == 1 and lf["gradient_accumulation_steps"] == 8 and lf["bf16"]
    assert "disable_gradient_checkpointing" not in lf and lf["max_steps"] == 3  # LLaMA-Factory's own default: on


def test_the_bench_probes_both_peaks_before_it_runs(bench, tmp_path, capsys):
    """Both sides' MFU is read against the peaks probed as the bench starts, not a figure cached on a busier day."""
    import json
    import os
    import sys

    bench.refresh_peaks(sys.executable, {**os.environ, "TUNEFORGE_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"})
    printed = capsys.readouterr().out
    cached = json.loads((tmp_path / "cpu_probes.json").read_text(encoding="utf-8"))
    peaks = {key.split("|")[3]: value for key, value in cached.items() if key != "probed_at"}
    assert set(peaks) == {"torch.float32", "torch.bfloat16"} and all(v > 0 for v in peaks.values())
    assert set(cached["probed_at"]) == set(cached) - {"probed_at"}
    assert f"torch.float32: {peaks['torch.float32'] / 1e9:.0f}" in printed, printed
