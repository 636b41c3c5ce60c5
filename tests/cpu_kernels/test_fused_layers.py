"""RMSNorm and LoRA layers as one autograd node each (tuneforge/kernels/rms_norm.py, lora_linear.py): the same
outputs and gradients as transformers' and PEFT's op-by-op versions, switched only where they mean the same."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.profiler import profile
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from tests.test_training import config, losses, train
from tuneforge.kernels import onednn_linear
from tuneforge.kernels.lora_linear import LoRALinearFunction, fuse_lora_linears
from tuneforge.kernels.rms_norm import fuse_rms_norms, is_llama_rms_norm
from tuneforge.train import run_config


def forward_backward(module, x, *params):
    """Output and the gradients of x and `params` for sum(out * g), g fixed."""
    x = x.detach().clone().requires_grad_(True)
    for p in params:
        p.grad = None
    out = module(x)
    g = torch.linspace(-2, 3, out.numel(), dtype=out.dtype).view_as(out)
    (out * g).sum().backward()
    return [out.detach(), x.grad] + [p.grad for p in params]


# ---- RMSNorm -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("frozen", [False, True])
def test_rms_norm_matches_the_autograd_version(dtype, frozen):
    torch.manual_seed(0)
    norm = LlamaRMSNorm(48, eps=1e-6).to(dtype)
    norm.weight.data.normal_(1.0, 0.3)
    norm.weight.requires_grad_(not frozen)
    x = (torch.randn(2, 7, 48) * 4).to(dtype)
    params = [] if frozen else [norm.weight]
    want = forward_backward(norm, x, *params)
    assert fuse_rms_norms(norm) == 1
    got = forward_backward(norm, x, *params)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for name, a, b in zip(("out", "x", "weight"), got, want):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance, msg=name)


def test_only_the_llama_formula_is_switched():
    """Qwen2's norm is Llama's formula; Gemma's scales by (1 + weight) and keeps its own forward, whatever its
    weights happen to be at the time of the check."""
    gemma = GemmaRMSNorm(16)
    assert is_llama_rms_norm(LlamaRMSNorm(16)) and is_llama_rms_norm(Qwen2RMSNorm(16))
    assert not is_llama_rms_norm(gemma)
    assert not is_llama_rms_norm(torch.nn.LayerNorm(16))
    model = torch.nn.ModuleList([LlamaRMSNorm(16), gemma, torch.nn.Linear(16, 16)])
    assert fuse_rms_norms(model) == 1
    assert "forward" in vars(model[0]) and "forward" not in vars(gemma)
    assert torch.count_nonzero(gemma.weight) == 0  # the check never wrote to the model's weight


def test_a_deep_copy_runs_its_own_weights():
    """The DPO reference model is a deep copy of the policy: its norms must read the copy's weights."""
    norm = LlamaRMSNorm(8)
    fuse_rms_norms(norm)
    twin = copy.deepcopy(norm)
    twin.weight.data.fill_(2.0)
    x = torch.randn(3, 8)
    torch.testing.assert_close(twin(x), 2 * norm(x))


# ---- LoRA ----------------------------------------------------------------------------------------------------------
def lora_model(bias: bool, dropout: float = 0.0, **extra):
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(40, 24, bias=bias), torch.nn.ReLU(), torch.nn.Linear(24, 8))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["0", "2"],
                                            **extra))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)  # B starts at zero: make the adapter count
    return model


def lora_params(model):
    return [p for n, p in model.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_lora_matches_pefts_forward_and_gradients(onednn, bias):
    model = lora_model(bias)
    x = torch.randn(2, 5, 40)
    params = lora_params(model)
    with onednn_linear.onednn_linears("cpu", enabled=onednn):
        want = forward_backward(model, x, *params)
        assert fuse_lora_linears(model) == 2
        calls = []
        real = LoRALinearFunction.apply
        LoRALinearFunction.apply = lambda *a: calls.append(a) or real(*a)
        try:
            got = forward_backward(model, x, *params)
        finally:
            LoRALinearFunction.apply = real
    assert len(calls) == 2  # both layers took the fused path
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"tensor {i}")


def test_trainable_base_weights_get_their_gradients():
    model = lora_model(bias=True)
    base = model.base_model.model[0]
    base.base_layer.weight.requires_grad_(True)
    base.base_layer.bias.requires_grad_(True)
    x = torch.randn(6, 40)
    params = [base.base_layer.weight, base.base_layer.bias, base.lora_A["default"].weight]
    want = forward_backward(model, x, *params)
    fuse_lora_linears(model)
    got = forward_backward(model, x, *params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["dropout", "dora", "disabled", "merged", "bf16"])
def test_other_lora_calls_run_pefts_forward(case):
    model = lora_model(bias=False, dropout=0.1 if case == "dropout" else 0.0, use_dora=case == "dora")
    x = torch.randn(3, 40)
    if case == "bf16":
        model.to(torch.bfloat16)
        x = x.bfloat16()
    model.eval()  # dropout off: both paths give the same numbers

    def run():
        if case == "disabled":
            with model.disable_adapter():
                return model(x)
        return model(x)

    if case == "merged":
        model.merge_adapter()
    want = run()
    fuse_lora_linears(model)
    calls = []
    real = LoRALinearFunction.apply
    LoRALinearFunction.apply = lambda *a: calls.append(a) or real(*a)
    try:
        got = run()
    finally:
        LoRALinearFunction.apply = real
    assert calls == []
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if case == "disabled":
        assert not torch.allclose(got, model(x))  # the adapter was really off inside the context only


# ---- the training loop (training.fused_layers) ---------------------------------------------------------------------
def test_training_losses_match_with_and_without(tiny_llama_dir, tmp_path):
    common = ("training.max_steps=4", "training.lr=1e-3")
    said = {"never": [], "auto": []}
    run_config(config(tiny_llama_dir, tmp_path / "never", *common, "training.fused_layers=never"),
               log=said["never"].append)
    with profile() as prof:
        run_config(config(tiny_llama_dir, tmp_path / "auto", *common), log=said["auto"].append)
    assert {"RMSNormFunction", "LoRALinearFunction"} <= {e.name for e in prof.events()}  # both took the fused path
    # the run says what it switched: the tiny Llama's 2 layers x 2 norms + the final one; LoRA on 4 projections x 2 layers
    assert "fused layers (training.fused_layers): 5 RMSNorm, 8 LoRA" in said["auto"], said["auto"]
    assert not any(line.startswith("fused layers") for line in said["never"])
    dropout = []  # LoRA with dropout runs PEFT's forward: only the norms are counted as fused
    run_config(config(tiny_llama_dir, tmp_path / "dropout", "training.max_steps=1", "lora.dropout=0.1"),
               log=dropout.append)
    assert "fused layers (training.fused_layers): 5 RMSNorm" in dropout, dropout
    want, got = losses(tmp_path / "never"), losses(tmp_path / "auto")
    assert len(got) == 4 and got == pytest.approx(want, abs=1e-5)
    assert got[-1] != got[0]


def test_gradient_checkpointing_recomputes_the_fused_layers(tiny_llama_dir, tmp_path):
    """Checkpointed blocks run the fused norm and LoRA layers again in the backward pass: same losses as the
    op-by-op layers without checkpointing."""
    common = ("training.max_steps=3", "training.lr=1e-3")
    train(tiny_llama_dir, tmp_path / "plain", *common, "training.fused_layers=never")
    train(tiny_llama_dir, tmp_path / "ckpt", *common, "training.gradient_checkpointing=true")
    assert losses(tmp_path / "ckpt") == pytest.approx(losses(tmp_path / "plain"), abs=1e-5)


def test_auto_resolves_per_device_and_engine():
    from tuneforge.configs.schema import TrainingConfig
    from tuneforge.training.setup import use_fused_layers

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert use_fused_layers(TrainingConfig(), cpu) and not use_fused_layers(TrainingConfig(), gpu)
    assert not use_fused_layers(TrainingConfig(compile=True), cpu)
    assert not use_fused_layers(TrainingConfig(distributed="fsdp"), cpu)
    assert use_fused_layers(TrainingConfig(fused_layers="always"), gpu)
    assert not use_fused_layers(TrainingConfig(fused_layers="never"), cpu)


@pytest.mark.parametrize("name, fused_norms", [("Qwen3", 2 * 4 + 1), ("Mistral", 2 * 2 + 1), ("Phi3", 2 * 2 + 1),
                                               ("Olmo2", 2 * 4 + 1), ("Gemma3Text", 0), ("Gemma2", 0)])
def test_model_families_train_the_same_fused(name, fused_norms):
    """Across families: the norms of the Llama formula are switched (Qwen3's per-head q/k norms too), Gemma's
    `1 + weight` norms are not, and a LoRA model's loss and adapter gradients are unchanged."""
    import transformers

    from tests.models.test_attention import ARCHITECTURES

    config = getattr(transformers, f"{name}Config")(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, **ARCHITECTURES[name])
    torch.manual_seed(0)
    base = getattr(transformers, f"{name.removesuffix('Text')}ForCausalLM")._from_config(config)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["o_proj"], init_lora_weights=False))
    ids = torch.randint(3, 300, (2, 11), generator=torch.Generator().manual_seed(1))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        with onednn_linear.onednn_linears("cpu"):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        return [loss.detach()] + [p.grad for p in lora_params(model)]

    want = loss_and_grads()
    assert fuse_rms_norms(model) == fused_norms
    assert fuse_lora_linears(model) == 2
    for a, b in zip(loss_and_grads(), want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
