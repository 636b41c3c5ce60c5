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
