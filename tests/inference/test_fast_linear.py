"""fp32 CPU linears through oneDNN while the engine decodes (tuneforge/inference/fast_linear.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

from tuneforge.inference import fast_linear
from tuneforge.inference.fast_linear import onednn_linears

pytestmark = pytest.mark.skipif(not fast_linear.available(), reason="this torch build has no oneDNN linear")


def ops_called(fn) -> set[str]:
    with profile() as prof:
        fn()
    return {e.name for e in prof.events()}


@pytest.mark.parametrize("shape", [(3, 40), (2, 5, 40), (1, 40)])
@pytest.mark.parametrize("bias", [True, False])
def test_takes_fp32_inference_linears_with_the_same_result(shape, bias):
    torch.manual_seed(0)
    layer = torch.nn.Linear(40, 24, bias=bias)
    x = torch.randn(shape)
    with torch.inference_mode():
        want = layer(x)
        with onednn_linears("cpu"):
            got = layer(x)
            names = ops_called(lambda: layer(x))
    assert "mkldnn::_linear_pointwise" in names
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_leaves_training_and_other_dtypes_alone():
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(2, 8)
    with onednn_linears("cpu"):
        names = ops_called(lambda: layer(x).sum().backward())  # autograd needs aten's linear
        assert layer.weight.grad is not None
        with torch.no_grad():
            bf16 = ops_called(lambda: layer.to(torch.bfloat16)(x.bfloat16()))
    assert "mkldnn::_linear_pointwise" not in names | bf16


def test_the_environment_turns_it_off(monkeypatch):
    monkeypatch.setenv("TUNEFORGE_ONEDNN_LINEAR", "0")
    with onednn_linears("cpu"), torch.inference_mode():
        names = ops_called(lambda: F.linear(torch.randn(2, 8), torch.randn(4, 8)))
    assert "mkldnn::_linear_pointwise" not in names


def test_the_engine_decodes_through_it(tiny_llama_dir):
    from tuneforge.configs.schema import ModelConfig
    from tuneforge.inference import Engine, SamplingParams
    from tuneforge.models.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_llama_dir)))
    engine = Engine(model.eval(), tokenizer)
    hi = [{"role": "user", "content": "Hi"}]
    names = ops_called(lambda: engine.generate([hi, hi], SamplingParams(max_new_tokens=2)))
    assert "mkldnn::_linear_pointwise" in names
    assert "aten::addmm" not in names and "aten::mm" not in names  # every projection and lm_head went to oneDNN
