"""`model.attn_implementation: auto`: the model's own eager attention for short bf16 batches on CPU, SDPA for
everything else, chosen per call, with the same numbers as the kernel it picks."""

from __future__ import annotations

import json

import pytest
import torch

from tuneforge.configs.schema import ModelConfig
from tuneforge.models import attention
from tuneforge.models.attention import AUTO_ATTENTION, EAGER_MAX_KEYS, resolve_attention
from tuneforge.models.loading import load_model_and_tokenizer

ADDITIVE = attention.additive_mask  # the real one, which the spy below calls through


@pytest.fixture(scope="module")
def models(tiny_llama_dir):
    """The tiny Llama (grouped-query attention) loaded three ways, fp32 weights as training keeps them."""
    return {a: load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_llama_dir), attn_implementation=a))[0]
            for a in ("auto", "eager", "sdpa")}


def batch(length: int):
    gen = torch.Generator().manual_seed(length)
    ids = torch.randint(5, 200, (3, length), generator=gen)
    mask = torch.ones(3, length, dtype=torch.long)
    mask[1, length // 2:] = 0  # a padded row
    return ids, mask


def logits_and_grads(model, ids, mask, dtype):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    (logits[mask.bool()] ** 2).mean().backward()
    return logits[mask.bool()].detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("length, dtype, same_as", [
    (40, torch.bfloat16, "eager"),                    # short bf16 rows: eager, the fast kernel there
    (EAGER_MAX_KEYS + 20, torch.bfloat16, "sdpa"),    # longer rows: SDPA
    (40, torch.float32, "sdpa"),                      # fp32: SDPA at every length
])
def test_auto_computes_exactly_what_the_kernel_it_picks_computes(models, monkeypatch, length, dtype, same_as):
    made = []
    monkeypatch.setattr(attention, "additive_mask", lambda *a: made.append(1) or ADDITIVE(*a))
    ids, mask = batch(length)
    got, got_grads = logits_and_grads(models["auto"], ids, mask, dtype)
    assert bool(made) == (same_as == "eager")  # the eager path ran (2 layers) or it did not
    want, want_grads = logits_and_grads(models[same_as], ids, mask, dtype)
    other, _ = logits_and_grads(models["sdpa" if same_as == "eager" else "eager"], ids, mask, dtype)
    assert torch.equal(got, want) and all(torch.equal(got_grads[n], g) for n, g in want_grads.items())
    if dtype == torch.bfloat16:
        assert not torch.equal(got, other)  # the two kernels round differently, so the test can tell them apart


def test_decoding_with_a_cache_matches_the_full_forward(models):
    """One new token against cached keys (no mask: it sees all of them) and a prefill without padding (no mask:
    causal) give the full forward's last logits, through the eager path."""
    model, (ids, _) = models["auto"], batch(30)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(input_ids=ids).logits[:, -1].float()
        prefill = model(input_ids=ids[:, :-1], use_cache=True)
        step = model(input_ids=ids[:, -1:], past_key_values=prefill.past_key_values).logits[:, -1].float()
        eager = models["eager"](input_ids=ids).logits[:, -1].float()
    assert torch.allclose(step, full, atol=0.05) and torch.equal(full, eager)


def test_auto_is_sdpa_on_gpus_and_other_settings_pass_through():
    assert resolve_attention("auto", "cuda") == resolve_attention("auto", torch.device("cuda:1")) == "sdpa"
    assert resolve_attention("auto", "cpu") == resolve_attention("auto", None) == AUTO_ATTENTION
    assert resolve_attention("eager", "cpu") == "eager" and resolve_attention("sdpa", "cpu") == "sdpa"


def test_saved_config_does_not_name_the_auto_kernel(models, tmp_path):
    """An exported folder must load in plain transformers, where `tuneforge_auto` is not registered."""
    models["auto"].save_pretrained(tmp_path)
    assert AUTO_ATTENTION not in (tmp_path / "config.json").read_text()
    assert "attn_implementation" not in json.loads((tmp_path / "config.json").read_text())
