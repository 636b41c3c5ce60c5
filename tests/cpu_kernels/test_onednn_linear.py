"""fp32 CPU linears through oneDNN, forward and backward (tuneforge/kernels/onednn_linear.py)."""

from __future__ import annotations

import json
import time

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

from tests.test_training import losses, train
from tuneforge.kernels import onednn_linear
from tuneforge.kernels.onednn_linear import onednn_linears

pytestmark = pytest.mark.skipif(not onednn_linear.available(), reason="this torch build has no oneDNN linear")
ONEDNN = "mkldnn::_linear_pointwise"


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
    assert ONEDNN in names
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def grads(x, layer, frozen: bool, use: bool):
    """Output and the gradients of x, weight and bias of sum(out * g) with fixed g, through the mode or not."""
    x = x.clone().requires_grad_(True)
    layer.weight.requires_grad_(not frozen)
    layer.weight.grad = layer.bias.grad = None
    with onednn_linears("cpu", enabled=use):
        out = layer(x)
        names = ops_called(lambda: (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward())
    return out.detach(), x.grad, layer.weight.grad, layer.bias.grad, names


@pytest.mark.parametrize("shape", [(7, 40), (2, 5, 40), (3, 4, 2, 40)])
@pytest.mark.parametrize("frozen", [False, True])
def test_gradients_equal_torchs_linear(shape, frozen):
    torch.manual_seed(0)
    layer = torch.nn.Linear(40, 96)
    x = torch.randn(shape)
    want = grads(x, layer, frozen, use=False)
    got = grads(x, layer, frozen, use=True)
    assert ONEDNN not in want[4]
    assert "mkldnn::_linear_pointwise" in got[4] and "aten::mm" not in got[4]  # backward products went to oneDNN
    for name, a, b in zip(("out", "x", "weight", "bias"), got[:4], want[:4]):
        if b is None:
            assert a is None, name  # a frozen weight gets no gradient, none computed
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    assert (got[2] is None) == frozen


def test_only_needed_gradients_are_computed():
    """Frozen weight and an input that needs no gradient (a LoRA base layer over frozen embeddings): no backward
    product at all, only the bias's sum."""
    layer = torch.nn.Linear(16, 8)
    layer.weight.requires_grad_(False)
    calls = []
    real = onednn_linear._onednn
    with onednn_linears("cpu"):
        out = layer(torch.randn(4, 16))
        onednn_linear._onednn = lambda *a: calls.append(a) or real(*a)
        try:
            out.sum().backward()
        finally:
            onednn_linear._onednn = real
    assert calls == [] and layer.bias.grad is not None and layer.weight.grad is None


def test_a_frozen_layer_keeps_no_copy_of_its_input_for_the_backward():
    """Only the weight's gradient reads the input: a frozen layer saves the weight alone (an activation per frozen
    layer was kept for nothing: LoRA on q/v leaves o_proj, the MLP and lm_head frozen)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(4, 16, requires_grad=True)
    for frozen in (True, False):
        layer = torch.nn.Linear(16, 8, bias=False)
        layer.weight.requires_grad_(not frozen)
        saved.clear()
        with onednn_linears("cpu"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x).sum().backward()
        assert any(t.data_ptr() == x.data_ptr() for t in saved) == (not frozen)
        assert x.grad is not None


def test_leaves_other_dtypes_subclasses_and_autocast_alone():
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(2, 8)
    with onednn_linears("cpu"), torch.no_grad():
        bf16 = ops_called(lambda: layer.to(torch.bfloat16)(x.bfloat16()))
        layer.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = ops_called(lambda: layer(x))
        noncontiguous = ops_called(lambda: F.linear(x, torch.randn(8, 4).t()))
    assert ONEDNN not in bf16 | autocast | noncontiguous
    assert onednn_linear.takes(x, layer.weight, None)
    assert not onednn_linear.takes(x, torch.nn.Parameter(torch.randn(4, 8)).as_subclass(_Sub), None)


class _Sub(torch.Tensor):
    pass


def test_the_environment_turns_it_off(monkeypatch):
    monkeypatch.setenv("TUNEFORGE_ONEDNN_LINEAR", "0")
    with onednn_linears("cpu"), torch.inference_mode():
        names = ops_called(lambda: F.linear(torch.randn(2, 8), torch.randn(4, 8)))
    assert ONEDNN not in names


@pytest.mark.parametrize("faster", [True, False])
def test_the_engine_decodes_through_it_where_it_is_faster(tiny_llama_dir, monkeypatch, faster):
    from tuneforge.configs.schema import ModelConfig
    from tuneforge.inference import Engine, SamplingParams
    from tuneforge.models.loading import load_model_and_tokenizer

    monkeypatch.setattr(onednn_linear, "faster_here", lambda: faster)
    model, tokenizer = load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_llama_dir)))
    engine = Engine(model.eval(), tokenizer)
    hi = [{"role": "user", "content": "Hi"}]
    names = ops_called(lambda: engine.generate([hi, hi], SamplingParams(max_new_tokens=2)))
    if faster:
        assert ONEDNN in names
        assert "aten::addmm" not in names and "aten::mm" not in names  # every projection and lm_head went to oneDNN
    else:
        assert ONEDNN not in names


# ---- which library auto picks: measured per machine ----------------------------------------------------------------
def test_the_probe_measures_a_real_difference(monkeypatch):
    """measure_speedup times both paths on the same products: oneDNN made 5 ms slower per product reads as slower
    (a probe that returned a constant, or timed one path twice, would not see it)."""
    assert 0.1 < onednn_linear.measure_speedup(rows=64, size=128, rounds=2) < 10
    with torch.inference_mode():  # where the engine first asks: autograd must still run for the probe
        assert 0.1 < onednn_linear.measure_speedup(rows=64, size=128, rounds=2) < 10
    real = onednn_linear._onednn

    def slow(*args):
        time.sleep(0.005)
        return real(*args)

    monkeypatch.setattr(onednn_linear, "_onednn", slow)
    assert onednn_linear.measure_speedup(rows=64, size=128, rounds=2) < 0.5


def test_auto_probes_once_per_machine_and_keeps_the_figure(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path))
    monkeypatch.setattr(onednn_linear, "_FASTER", {})
    measured = []
    monkeypatch.setattr(onednn_linear, "measure_speedup", lambda: measured.append(1) or 0.86)  # an Intel Xeon's
    assert not onednn_linear.faster_here() and not onednn_linear.faster_here()
    monkeypatch.setattr(onednn_linear, "_FASTER", {})  # a new process: the cached figure, no second probe
    assert not onednn_linear.faster_here() and len(measured) == 1
    assert list(json.loads((tmp_path / "cpu_probes.json").read_text(encoding="utf-8")).values()) == [0.86]

    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "amd"))  # another machine, where oneDNN measured 1.7x
    monkeypatch.setattr(onednn_linear, "_FASTER", {})
    monkeypatch.setattr(onednn_linear, "measure_speedup", lambda: 1.7)
    assert onednn_linear.faster_here()


# ---- the training loop (training.cpu_matmul) ----------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "full"])
def test_training_losses_match_the_default_path(tiny_llama_dir, tmp_path, method):
    # fused_layers=never: the fused LoRA layer adds its rank-r update with addmm (tests/cpu_kernels/test_fused_layers.py)
    common = ("training.max_steps=4", f"method={method}", "training.lr=1e-3", "training.fused_layers=never")
    train(tiny_llama_dir, tmp_path / "default", *common, "training.cpu_matmul=default")
    with profile() as prof:
        train(tiny_llama_dir, tmp_path / "onednn", *common, "training.cpu_matmul=onednn")
    names = {e.name for e in prof.events()}
    assert ONEDNN in names and "aten::addmm" not in names and "aten::mm" not in names
    want, got = losses(tmp_path / "default"), losses(tmp_path / "onednn")
    assert len(got) == 4 and got == pytest.approx(want, abs=1e-5)
    assert got[-1] != got[0]  # the steps really trained (a loss that never moves would match trivially)


def test_the_switch_turns_it_off(tiny_llama_dir, tmp_path):
    with profile() as prof:
        train(tiny_llama_dir, tmp_path / "off", "training.max_steps=1", "training.cpu_matmul=default")
    assert ONEDNN not in {e.name for e in prof.events()}


def test_auto_and_onednn_resolve_per_run(monkeypatch):
    from tuneforge.errors import UserError
    from tuneforge.training.loop import use_onednn_matmul
    from tuneforge.training.runtime import Runtime

    cpu = Runtime(device=torch.device("cpu"), dtype=torch.float32, rank=0, world_size=1, local_rank=0)
    bf16 = Runtime(device=torch.device("cpu"), dtype=torch.bfloat16, rank=0, world_size=1, local_rank=0)
    monkeypatch.setattr(onednn_linear, "faster_here", lambda: False)  # where torch's own path measured as fast
    assert not use_onednn_matmul("auto", cpu, compile_blocks=False)
    assert use_onednn_matmul("onednn", cpu, compile_blocks=False)  # asked for: used whatever the probe said
    monkeypatch.setattr(onednn_linear, "faster_here", lambda: True)
    assert use_onednn_matmul("auto", cpu, compile_blocks=False)
    assert not use_onednn_matmul("auto", cpu, compile_blocks=True)
    assert not use_onednn_matmul("auto", bf16, compile_blocks=False)
    assert not use_onednn_matmul("default", cpu, compile_blocks=False)
    with pytest.raises(UserError, match="cpu_matmul"):
        use_onednn_matmul("onednn", bf16, compile_blocks=False)


def test_gradient_checkpointing_recomputes_under_the_mode():
    """The autograd engine drops Python function modes in the backward pass; `checkpoint_contexts` puts the mode
    back around the recomputation, so it saves the same tensors as the forward (else checkpoint raises)."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
    x = torch.randn(2, 5, 16, requires_grad=True)
    (block(x) ** 2).sum().backward()
    want = [p.grad.clone() for p in block.parameters()] + [x.grad.clone()]
    block.zero_grad()
    x.grad = None
    modes_in_recompute = []

    def run(inp):
        modes_in_recompute.append(onednn_linear.active())
        return block(inp)

    with onednn_linears("cpu"):
        out = checkpoint(run, x, **onednn_linear.checkpointing_kwargs())
        (out ** 2).sum().backward()
    assert modes_in_recompute == [True, True]
    for got, expected in zip([p.grad for p in block.parameters()] + [x.grad], want):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
