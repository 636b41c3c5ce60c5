"""Every config under examples/ runs, shortened (2 steps, short rows) and on a tiny model instead of the one it names.

Each run must finish, log finite losses, write its result in the format its method promises, and write a resolved
config that loads back to the same settings (so `tuneforge train OUTPUT/tuneforge_config.yaml` reproduces the run).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from tuneforge.configs.schema import load_train_config
from tuneforge.configs.typed import to_dict
from tuneforge.train import run_config
from tuneforge.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
CUDA_ONLY = {"loftq": "PEFT computes the LoftQ initialisation on CUDA/XPU only"}
# examples that need an earlier stage's output folder: run by the pipeline test, after that stage
RUN_ELSEWHERE = {"ppo_rm_tiny": "needs examples/rm_tiny.yaml's output; tests/training/test_rl_stages.py "
                                "test_pipeline_sft_rm_ppo_and_dpo runs it after rm"}


def method_of(example: Path) -> str:
    return yaml.safe_load(example.read_text(encoding="utf-8"))["method"]


def test_every_method_has_an_example():
    from tuneforge.methods import METHODS

    named = {method_of(p) for p in EXAMPLES}
    assert set(METHODS) <= named, f"methods without an example config: {sorted(set(METHODS) - named)}"


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_config_runs(example, tiny_llama_dir, tiny_qwen2_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # examples name their data relative to the repository root
    if example.stem in RUN_ELSEWHERE:
        pytest.skip(RUN_ELSEWHERE[example.stem])
    method = method_of(example)
    if method in CUDA_ONLY and not torch.cuda.is_available():
        pytest.skip(f"{example.name}: {CUDA_ONLY[method]}")
    model_dir = tiny_qwen2_dir if "qwen2" in example.read_text() else tiny_llama_dir
    out = tmp_path / "out"
    cfg = load_train_config(str(example), [
        f"model.name_or_path={model_dir}", f"output_dir={out}", "training.max_steps=2", "training.batch_size=2",
        "training.grad_accum=1", "training.logging_steps=1", "training.save_steps=0", "training.eval_steps=0", "training.warmup_steps=0",
        "training.progress_bar=false", "training.plot_loss=false", "data.max_length=64"])
    run_config(cfg, log=lambda _: None)

    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), losses
    adapter = (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    full_model = (out / "config.json").is_file() and any(out.glob("*.safetensors"))
    assert adapter or full_model, sorted(p.name for p in out.iterdir())
    reloaded = load_train_config(str(out / "tuneforge_config.yaml"))
    assert to_dict(reloaded) == to_dict(cfg)
