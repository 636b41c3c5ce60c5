"""training.compile: torch.compile of the decoder blocks gives the loss of the eager model."""

from __future__ import annotations

import pytest

from tests.test_training import losses, train


@pytest.mark.slow  # compiling on 2 shared CPU cores takes a minute or more
def test_compiled_blocks_train_like_eager(tiny_llama_dir, tmp_path):
    train(tiny_llama_dir, tmp_path / "eager", "training.max_steps=3")
    train(tiny_llama_dir, tmp_path / "compiled", "training.max_steps=3", "training.compile=true")
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), abs=1e-4)


def test_compile_finds_the_decoder_blocks(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from tuneforge.training.setup import compile_blocks

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    compile_blocks(model)  # wraps lazily: nothing compiles until the first forward
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
    assert model.model.embed_tokens._compiled_call_impl is None


def _measured_compile_ratio() -> str:
    """The figure bench/RESULTS.md gives for compile against the CPU defaults ("**No gain: 0.96x.**")."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "bench" / "RESULTS.md").read_text(encoding="utf-8")
    section = text[text.index("## `training.compile`"):]
    return re.search(r"\*\*[^*]*?(\d+\.\d+x)[^*]*\*\*", section).group(1)


def test_compile_on_cpu_says_which_defaults_it_turns_off(tiny_llama_dir, tmp_path):
    """On CPU, compile turns the oneDNN linears, fused layers and per-sequence attention off; the start-up notes say
    so with the measured figure, and nothing is said when compile is off."""
    from tests.test_training import config
    from tuneforge.training.setup import setup_run

    said = {}
    for compile_ in ("true", "false"):
        lines = []
        setup_run(config(tiny_llama_dir, tmp_path / compile_, f"training.compile={compile_}",
                         "training.device=cpu"), log=lines.append)
        said[compile_] = [line for line in lines if "training.compile" in line]
    (note,) = said["true"]
    assert "fused layers" in note and "per sequence" in note and _measured_compile_ratio() in note
    assert said["false"] == []
