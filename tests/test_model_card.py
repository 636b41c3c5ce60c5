"""What a saved model or adapter says about itself: the base as the user named it, and a model card (README.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneforge import __version__
from tuneforge.configs.schema import load_train_config
from tuneforge.train import run_config
from tuneforge.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent


def _run(example: str, model: str, out: Path, monkeypatch, *extra: str) -> Path:
    monkeypatch.chdir(ROOT)  # examples name their data relative to the repository root
    cfg = load_train_config(f"examples/{example}", [
        f"model.name_or_path={model}", f"output_dir={out}", "training.max_steps=2", "training.batch_size=2",
        "training.save_steps=0", "training.eval_steps=0", "training.progress_bar=false", "training.plot_loss=false",
        "data.max_length=64", *extra])
    run_config(cfg, log=lambda _: None)
    return out


def test_adapter_records_builtin_name_and_card_says_what_was_trained(tiny_qwen2_dir, tmp_path, monkeypatch):
    from peft import PeftConfig

    from tuneforge.models import builtin

    monkeypatch.setitem(builtin.BUILTIN_MODELS, "tiny", lambda: tiny_qwen2_dir)  # a builtin that resolves to a cache
    out = _run("sft_lora_tiny.yaml", "builtin:tiny", tmp_path / "run", monkeypatch, "lora.rank=4",
               "data.eval_ratio=0.05")
    assert PeftConfig.from_pretrained(str(out)).base_model_name_or_path == "builtin:tiny"  # plain PEFT reads it
    card = (out / "README.md").read_text(encoding="utf-8")
    rows = read_metrics(out / "metrics.jsonl")
    last_loss = [r["loss"] for r in rows if "loss" in r][-1]
    eval_loss = [r["eval_loss"] for r in rows if "eval_loss" in r][-1]
    assert "[More Information Needed]" not in card  # not PEFT's empty template
    assert "library_name: peft" in card and "| base model | `builtin:tiny` |" in card
    assert "`lora`" in card and "lora.rank=4" in card and "lora.target_modules=['q_proj', 'k_proj'" in card
    assert "`tuneforge/assets/example_task/train.jsonl`" in card
    assert "| optimizer steps | 2 |" in card
    assert f"| final training loss | {last_loss:.4g} (step 2) |" in card
    assert f"| final eval loss | {eval_loss:.4g} (step 2) |" in card
    assert f"| TuneForge version | {__version__} |" in card and f"tuneforge chat --adapter {out}" in card
    assert "NEFTune" not in card and "R-Drop" not in card  # named only when the run used them


def test_card_names_neftune_and_rdrop_with_their_settings(tiny_qwen2_dir, tmp_path, monkeypatch):
    """NEFTune and R-Drop change what was learned: the card says so with their settings, and so does the card of
    an export made from the adapter (it starts from the training card)."""
    from tuneforge.inference.export.cli import write_export_card

    out = _run("sft_lora_tiny.yaml", str(tiny_qwen2_dir), tmp_path / "run", monkeypatch, "lora.rank=4",
               "lora.dropout=0.1", "training.neftune_alpha=5", "training.rdrop_alpha=0.5")
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "| NEFTune | training.neftune_alpha=5 (uniform noise on the input embeddings" in card
    assert "| R-Drop | training.rdrop_alpha=0.5 (two dropout passes per batch" in card
    export = tmp_path / "export"
    export.mkdir()
    write_export_card(export, out, "Load it with X.")
    exported = (export / "README.md").read_text(encoding="utf-8")
    assert "| NEFTune | training.neftune_alpha=5 " in exported and "| R-Drop | training.rdrop_alpha=0.5 " in exported


@pytest.mark.parametrize("example", ["sft_full_tiny.yaml", "sft_freeze_tiny.yaml"])
def test_full_model_folders_get_a_card_too(example, tiny_llama_dir, tmp_path, monkeypatch):
    out = _run(example, str(tiny_llama_dir), tmp_path / "run", monkeypatch)
    card = (out / "README.md").read_text(encoding="utf-8")
    method = example.split("_")[1]
    assert "library_name: transformers" in card and f"`{method}`" in card and f"`{tiny_llama_dir}`" in card
    assert f"tuneforge chat --model {out}" in card and "| optimizer steps | 2 |" in card
    assert not (out / "adapter_config.json").exists()
    assert json.loads((out / "config.json").read_text(encoding="utf-8"))["model_type"] == "llama"
