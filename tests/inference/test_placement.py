"""Where and in which precision chat and serve run a model (`--device`, `--dtype`)."""

from __future__ import annotations

import pytest
import torch

from tuneforge.errors import UserError
from tuneforge.inference import SamplingParams
from tuneforge.inference.chat import ChatArgs, load_for_chat
from tuneforge.inference.serve.main import ServeArgs, build_state
from tuneforge.models.loading import inference_placement

HI = [{"role": "user", "content": "Hello there"}]


def test_auto_is_fp32_on_the_cpu():
    if torch.cuda.is_available():
        pytest.skip("auto picks the GPU here")
    assert inference_placement("auto", "auto") == (torch.device("cpu"), torch.float32)
    assert inference_placement("cpu", "bf16") == (torch.device("cpu"), torch.bfloat16)


@pytest.mark.parametrize(("device", "dtype", "named"), [("cpu", "fp16", "fp16 needs a GPU"), ("tpu", "auto", "tpu"),
                                                        ("cpu", "int4", "int4")])
def test_bad_choices_are_named(device, dtype, named):
    with pytest.raises(UserError, match=named):
        inference_placement(device, dtype)


def test_a_gpu_asked_for_without_one_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError, match="torch sees none"):
        inference_placement("cuda", "auto")


def test_chat_loads_and_answers_in_bf16(tiny_llama_dir):
    model, tokenizer = load_for_chat(ChatArgs(model=str(tiny_llama_dir), device="cpu", dtype="bf16"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    fp32, _ = load_for_chat(ChatArgs(model=str(tiny_llama_dir), device="cpu"))
    assert {p.dtype for p in fp32.parameters()} == {torch.float32}
    from tuneforge.inference import Engine

    [reply] = Engine(model, tokenizer).generate([HI], SamplingParams(max_new_tokens=5, ignore_eos=True))
    assert reply.completion_tokens == 5


def test_serve_builds_its_engine_in_the_asked_precision(tiny_llama_dir):
    state = build_state(ServeArgs(model=str(tiny_llama_dir), device="cpu", dtype="bf16"))
    assert next(state.served.model.parameters()).dtype == torch.bfloat16
    [reply] = state.engine.generate([HI], SamplingParams(max_new_tokens=3, ignore_eos=True))
    assert reply.completion_tokens == 3
