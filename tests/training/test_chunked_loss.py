"""Chunked lm_head + cross-entropy: the same loss and gradients as full logits, in pieces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tuneforge.data.types import IGNORE_INDEX
from tuneforge.errors import UserError
from tuneforge.training.chunked_loss import linear_cross_entropy


def reference(hidden, weight, bias, targets):
    return F.cross_entropy(F.linear(hidden, weight, bias), targets, ignore_index=IGNORE_INDEX, reduction="sum")


@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_full_logits_in_value_and_gradients(with_bias):
    torch.manual_seed(0)
    hidden = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(50, dtype=torch.float64, requires_grad=True) if with_bias else None
    targets = torch.randint(0, 50, (10,))
    targets[[2, 7]] = IGNORE_INDEX
    want = reference(hidden, weight, bias, targets)
    want_grads = torch.autograd.grad(want, [t for t in (hidden, weight, bias) if t is not None])
    got = linear_cross_entropy(hidden, weight, targets, bias, chunk_size=3)  # 8 rows: chunks of 3, 3, 2
    got_grads = torch.autograd.grad(got, [t for t in (hidden, weight, bias) if t is not None])
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    for g, w in zip(got_grads, want_grads):
        assert torch.allclose(g, w, atol=1e-12), (g - w).abs().max()
    assert got_grads[0][2].abs().sum() == 0  # an ignored row gets no gradient


def test_frozen_output_layer_gets_no_gradient_work():
    hidden = torch.randn(4, 6, requires_grad=True)
    weight = torch.randn(20, 6)  # frozen lm_head (LoRA): only the hidden states need a gradient
    loss = linear_cross_entropy(hidden, weight, torch.tensor([1, 2, 3, 4]), chunk_size=2)
    loss.backward()
    assert weight.grad is None and hidden.grad is not None


def test_under_bf16_autocast_it_matches_the_autocast_logits():
    torch.manual_seed(0)
    hidden = torch.randn(8, 16, requires_grad=True)
    weight = torch.randn(64, 16, requires_grad=True)
    targets = torch.randint(0, 64, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")
        got = linear_cross_entropy(hidden, weight, targets, chunk_size=3)
    gw, = torch.autograd.grad(want, [weight])
    gg, = torch.autograd.grad(got, [weight])
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert torch.allclose(gg, gw, atol=3e-2, rtol=3e-2)



@pytest.mark.gpu
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])  # full fine-tune's fp32 head; LoRA's bf16
def test_liger_on_cuda_matches_the_full_logits(weight_dtype):
    """On CUDA with Liger Kernel installed, linear_cross_entropy takes Liger's fused kernel: under bf16 autocast, as
    the training step calls it, its loss and gradients equal full autocast logits (up to bf16 rounding)."""
    pytest.importorskip("liger_kernel")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from tuneforge.training.chunked_loss import _liger

    assert _liger() is not None
    torch.manual_seed(0)
    hidden = torch.randn(600, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(32000, 256, device="cuda") * 0.05).to(weight_dtype).requires_grad_()
    targets = torch.randint(0, 32000, (600,), device="cuda")
    targets[::7] = IGNORE_INDEX
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
        got = linear_cross_entropy(hidden, weight, targets)
    want_grads = torch.autograd.grad(want, [hidden, weight])
    got_grads = torch.autograd.grad(got, [hidden, weight])
    assert got.item() == pytest.approx(want.item(), rel=2e-3)
    for g, w in zip(got_grads, want_grads):
        assert g.dtype == w.dtype and (g.float() - w.float()).norm() <= 2e-2 * w.float().norm()
    assert got_grads[0][::7].abs().sum() == 0  # ignored rows get no gradient

@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_stage_loss_equals_the_full_logits_path(fixture, request):
    """On a real (tiny) model with LoRA: the Stage's chunked loss and its gradients equal today's path."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tuneforge.training.loop import Stage

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(request.getfixturevalue(fixture)),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ids = torch.randint(3, model.config.vocab_size, (2, 12))
    labels = ids.clone()
    labels[:, :5] = IGNORE_INDEX  # a prompt
    labels[1, 9:] = IGNORE_INDEX
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    results = []
    for chunked in (False, True):
        stage = Stage()
        stage.logits_at_labels, stage.chunked_loss = True, chunked
        model.zero_grad()
        loss, _ = stage.loss(model, batch)
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    assert all(torch.allclose(grads_a[n], grads_b[n], atol=1e-6, rtol=1e-4) for n in grads_a)


def test_true_where_it_cannot_apply_is_a_user_error(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from tuneforge.training.loop import Stage, use_chunked_loss
    from tuneforge.training.runtime import Runtime

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    stage = Stage()
    stage.logits_at_labels = True
    fsdp = Runtime(torch.device("cpu"), torch.float32, engine="fsdp")
    with pytest.raises(UserError, match="chunked_loss: always cannot apply.*fsdp"):
        use_chunked_loss("always", model, stage, fsdp)
    one = Runtime(torch.device("cpu"), torch.float32)
    assert use_chunked_loss("always", model, stage, one)
    assert not use_chunked_loss("auto", model, stage, one)  # a tiny vocabulary: nothing to save
    model.config.vocab_size = 151_936
    assert not use_chunked_loss("auto", model, stage, one)  # on CPU only when asked for
    gpu = Runtime(torch.device("cuda", 0), torch.float32)
    assert use_chunked_loss("auto", model, stage, gpu)
    assert not use_chunked_loss("never", model, stage, one)


def test_a_run_with_chunked_loss_logs_the_same_losses(tiny_qwen2_dir, tmp_path, monkeypatch):
    from tests.test_training import losses, train
    from tuneforge.training import loop

    calls = []
    real = loop.chunked_causal_loss
    monkeypatch.setattr(loop, "chunked_causal_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    train(tiny_qwen2_dir, tmp_path / "full", "training.max_steps=3", "training.chunked_loss=never")
    train(tiny_qwen2_dir, tmp_path / "chunked", "training.max_steps=3", "training.chunked_loss=always")
    assert losses(tmp_path / "chunked") == pytest.approx(losses(tmp_path / "full"), abs=1e-5)
    assert len(calls) == 3  # one micro-batch per step, all through the chunked path
