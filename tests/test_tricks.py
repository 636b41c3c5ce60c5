"""NEFTune noise and the R-Drop loss: exact values on tiny tensors and behaviour on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from tests.methods.harness import fixed_batch, tiny_config, tiny_model, train_steps
from tuneforge.errors import ConfigError
from tuneforge.losses import causal_lm_loss, rdrop_loss
from tuneforge.tricks import (
    check_rdrop_applicable,
    has_active_dropout,
    neftune_hook,
    neftune_noise_bound,
    rdrop_forward,
    rdrop_stage_loss,
)

# ---------------------------------------------------------------- NEFTune


def _embed(model, ids):
    return model.get_input_embeddings()(ids)


def test_neftune_noise_has_the_paper_magnitude_in_training_only():
    model = tiny_model("llama")
    ids = fixed_batch()["input_ids"]  # [2, 16], hidden 64
    clean = _embed(model, ids).detach()
    alpha = 5.0
    bound = alpha / math.sqrt(16 * 64)
    assert neftune_noise_bound(alpha, 16, 64) == pytest.approx(bound)
    handle = neftune_hook(model, alpha)
    model.train()
    noise = _embed(model, ids).detach() - clean
    assert noise.abs().max() <= bound * (1 + 1e-5)
    assert noise.abs().max() > 0.95 * bound  # 2048 uniform draws reach close to the bound
    assert noise.abs().mean().item() == pytest.approx(bound / 2, rel=0.1)  # E|U(-b, b)| = b/2
    assert not torch.equal(_embed(model, ids), _embed(model, ids))  # fresh noise every call
    model.eval()
    assert torch.equal(_embed(model, ids), clean)  # evaluation and generation see clean embeddings
    model.train()
    handle.remove()
    assert torch.equal(_embed(model, ids), clean)  # removing the hook restores the model


def test_neftune_noise_scales_with_sequence_length():
    model = tiny_model("llama").train()
    ids = fixed_batch(seq_len=64)["input_ids"]
    clean = _embed(model, ids).detach()
    with torch.no_grad():
        handle = neftune_hook(model, 5.0)
        noise = _embed(model, ids) - clean
    handle.remove()
    bound = 5.0 / math.sqrt(64 * 64)
    assert 0.95 * bound < noise.abs().max() <= bound * (1 + 1e-5)


def test_neftune_refuses_non_positive_alpha():
    with pytest.raises(ConfigError, match="neftune_alpha"):
        neftune_hook(tiny_model("llama"), 0.0)


def test_neftune_still_trains():
    model = tiny_model("qwen2")
    handle = neftune_hook(model, 5.0)
    losses = train_steps(model, fixed_batch(), steps=4, lr=1e-2)
    handle.remove()
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------- R-Drop loss


def test_rdrop_loss_matches_a_hand_computed_value():
    # B=1, T=3, V=2. labels after the shift: position 0 -> -100 (masked), position 1 -> label 1 (counts);
    # the last position predicts nothing. Only logits at t=1 matter, so t=0 and t=2 differ wildly on purpose.
    logits_a = torch.tensor([[[9.0, -9.0], [math.log(3.0), 0.0], [5.0, 0.0]]])
    logits_b = torch.tensor([[[-9.0, 9.0], [0.0, 0.0], [0.0, 5.0]]])
    labels = torch.tensor([[0, -100, 1]])
    p, q = (0.75, 0.25), (0.5, 0.5)
    kl_pq = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    kl_qp = sum(qi * math.log(qi / pi) for pi, qi in zip(p, q))
    total, n = rdrop_loss(logits_a, logits_b, labels, alpha=2.0)
    assert n.item() == 1
    assert total.item() == pytest.approx(2.0 / 2 * (kl_pq + kl_qp), rel=1e-5)


def test_rdrop_loss_is_zero_for_identical_logits_symmetric_and_sums_tokens():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    labels[0, :2] = -100
    zero, n = rdrop_loss(a, a.clone(), labels, alpha=1.0)
    assert zero.item() == pytest.approx(0.0, abs=1e-6)
    ab, _ = rdrop_loss(a, b, labels, alpha=1.0)
    ba, _ = rdrop_loss(b, a, labels, alpha=1.0)
    assert ab.item() > 0
    assert ab.item() == pytest.approx(ba.item(), rel=1e-6)
    assert n == causal_lm_loss(a, labels)[1] == 7  # same normaliser as the cross-entropy: 2*4 shifted - 1 masked
    ab3, _ = rdrop_loss(a, b, labels, alpha=3.0)
    assert ab3.item() == pytest.approx(3 * ab.item(), rel=1e-6)


def test_rdrop_loss_has_gradients_through_both_passes():
    a = torch.randn(1, 4, 5, requires_grad=True)
    b = torch.randn(1, 4, 5, requires_grad=True)
    rdrop_loss(a, b, torch.tensor([[1, 2, 3, 4]]))[0].backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


# ---------------------------------------------------------------- R-Drop on a model


def _dropout_model(p: float = 0.3):
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.attention_dropout = p
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager")


def test_rdrop_needs_dropout():
    assert not has_active_dropout(tiny_model("llama"))
    with pytest.raises(ConfigError, match="rdrop_alpha"):
        check_rdrop_applicable(tiny_model("llama"))
    assert has_active_dropout(_dropout_model())
    check_rdrop_applicable(_dropout_model())


def test_rdrop_forward_without_dropout_is_the_plain_loss_and_with_dropout_adds_kl():
    model, batch = _dropout_model(), fixed_batch()
    model.eval()  # dropout off: both copies identical
    out = rdrop_forward(model, batch, alpha=1.0)
    plain, n = causal_lm_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"])
    assert out.kl_sum.item() == pytest.approx(0.0, abs=1e-4)
    assert out.ce_sum.item() == pytest.approx(plain.item(), rel=1e-5)
    assert out.n_tokens == n
    model.train()  # dropout on: the two copies differ
    torch.manual_seed(0)
    out = rdrop_forward(model, batch, alpha=1.0)
    assert out.kl_sum.item() > 0
    assert out.loss_sum.item() == pytest.approx(out.ce_sum.item() + 0.5 * out.kl_sum.item(), rel=1e-5)
    loss_sum, extra = rdrop_stage_loss(model, batch, alpha=1.0)
    assert loss_sum.requires_grad and set(extra) == {"ce", "rdrop_kl"}


def test_training_with_rdrop_lowers_the_loss():
    model, batch = _dropout_model(), fixed_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    first = None
    for _ in range(5):
        out = rdrop_forward(model, batch, alpha=1.0)
        (out.loss_sum / out.n_tokens).backward()
        opt.step()
        opt.zero_grad()
        first = first if first is not None else out.ce_sum.item() / out.n_tokens.item()
    model.eval()
    with torch.no_grad():
        total, n = causal_lm_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"])
    assert total.item() / n.item() < first


def test_a_run_says_which_tricks_are_on(tiny_qwen2_dir, tmp_path):
    """NEFTune and R-Drop showed only in the loss: nothing in the log confirmed the config had turned them on."""
    from tests.test_training import config
    from tuneforge.train import run_config

    lines = []
    run_config(config(tiny_qwen2_dir, tmp_path / "on", "training.max_steps=1", "training.neftune_alpha=5",
                      "training.rdrop_alpha=1", "lora.dropout=0.1"), log=lines.append)
    said = [line for line in lines if line.startswith("training tricks:")]
    assert said == ["training tricks: NEFTune (noise alpha 5 on the input embeddings while training); R-Drop (alpha "
                    "1: two dropout passes per batch, their KL as `rdrop_kl`)"]
    lines.clear()
    run_config(config(tiny_qwen2_dir, tmp_path / "off", "training.max_steps=1"), log=lines.append)
    assert not [line for line in lines if "training tricks" in line]
