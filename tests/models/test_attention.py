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


def test_auto_is_sdpa_off_the_cpu_and_other_settings_pass_through(models, monkeypatch):
    """On a GPU every call but a padding-free row's goes to transformers' own SDPA function, even a short bf16 one
    that the CPU would give to eager (meta tensors stand in for a device that is not the CPU)."""
    from transformers.integrations import sdpa_attention

    assert resolve_attention("auto") == AUTO_ATTENTION
    assert resolve_attention("eager") == "eager" and resolve_attention("sdpa") == "sdpa"
    called = []
    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", lambda *a, **k: called.append(a[1].device.type))
    module = models["auto"].model.layers[0].self_attn  # its model file has an eager_attention_forward
    for device in ("meta", "cpu"):
        q = torch.zeros(1, module.config.num_attention_heads, 8, module.head_dim, dtype=torch.bfloat16, device=device)
        kv = q[:, :module.config.num_key_value_heads]
        attention.auto_attention(module, q, kv, kv, None, scaling=0.5, dropout=0.0)
    assert called == ["meta"]  # the CPU's short bf16 call went to eager


def test_saved_config_does_not_name_the_auto_kernel(models, tmp_path):
    """An exported folder must load in plain transformers, where `tuneforge_auto` is not registered."""
    models["auto"].save_pretrained(tmp_path)
    assert AUTO_ATTENTION not in (tmp_path / "config.json").read_text()
    assert "attn_implementation" not in json.loads((tmp_path / "config.json").read_text())


def flat_and_padded(lengths: list[int]):
    gen = torch.Generator().manual_seed(sum(lengths))
    seqs = [torch.randint(5, 200, (n,), generator=gen) for n in lengths]
    flat = {"input_ids": torch.cat(seqs)[None], "position_ids": torch.cat([torch.arange(n) for n in lengths])[None]}
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
    return flat, {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("one_by_one", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_padding_free_row_attends_per_sequence_like_the_padded_batch(models, monkeypatch, dtype, one_by_one):
    """A padding-free row (training.padding_free) on CPU: attention runs within each sequence, gathered into a padded
    batch of its own (the same kernel and shapes as the padded batch: the same logits, bit for bit) or, in fp32, one
    call per sequence (no padding at all: the same to rounding), with the padded batch's gradients. bf16 always
    gathers."""
    calls = []
    real = attention.segment_attention
    monkeypatch.setattr(attention, "segment_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(attention, "attend_one_by_one", lambda lengths: one_by_one)
    worked_out = []
    real_rows = attention.row_segments
    monkeypatch.setattr(attention, "row_segments", lambda p: worked_out.append(1) or real_rows(p))
    model = models["auto"]
    flat, padded = flat_and_padded([5, 17, 9, 30])
    grads = []
    for batch in (flat, padded):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            logits = model(**batch, use_cache=False).logits.float()
        logits = logits[0] if batch is flat else logits[padded["attention_mask"].bool()]
        (logits ** 2).mean().backward()
        grads.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
    assert len(calls) == 2  # both layers of the flat row, none of the padded batch
    assert len(worked_out) == 1  # the row's sequences: once per forward, not per layer
    if one_by_one and dtype == torch.float32:
        assert torch.allclose(grads[0][0], grads[1][0], atol=1e-5) and not torch.equal(grads[0][0], grads[1][0])
    else:
        assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(grads[0][1], grads[1][1]))


def test_only_a_row_of_several_sequences_is_split():
    q = k = torch.zeros(1, 2, 6, 4)
    two = torch.tensor([[0, 1, 2, 0, 1, 2]])
    segments = attention.flat_segments(q, k, two)
    assert segments.index.tolist() == [[0, 1, 2], [3, 4, 5]] and segments.valid.all()
    assert segments.bounds == [(0, 3), (3, 6)] and segments.one_by_one
    assert attention.flat_segments(q, k, torch.arange(6)[None]) is None  # one sequence
    assert attention.flat_segments(torch.zeros(2, 2, 6, 4), torch.zeros(2, 2, 6, 4), two) is None  # two rows
    assert attention.flat_segments(q, k, None) is None


def test_a_padding_free_row_never_builds_the_row_by_row_mask(models, monkeypatch):
    """transformers would build a dense (row x row) boolean mask for a padding-free row; `auto` defers it and the
    per-sequence attention never asks for it. A padded batch still gets its mask, as SDPA does."""
    from transformers import masking_utils

    built = []
    real = masking_utils.sdpa_mask
    monkeypatch.setattr(masking_utils, "sdpa_mask", lambda **kw: built.append(kw["q_length"]) or real(**kw))
    flat, padded = flat_and_padded([5, 17, 9])
    with torch.no_grad():
        models["auto"](**flat, use_cache=False)
        assert built == []
        models["auto"](**padded, use_cache=False)
    assert built == [17]


def test_a_deferred_mask_is_built_where_a_layer_cannot_attend_per_sequence():
    """A one-row batch whose mask could not be skipped but whose positions do not restart (one sequence under a
    custom mask): the deferred mask becomes exactly transformers' own, once."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    args = dict(batch_size=1, q_length=6, kv_length=6, mask_function=causal_mask_function, attention_mask=None,
                allow_is_causal_skip=False, device="cpu")
    deferred = attention.auto_mask(**args)
    assert isinstance(deferred, attention.DeferredMask) and deferred.window is None
    assert torch.equal(deferred.dense(), sdpa_mask(**args)) and deferred.dense() is deferred.dense()
    assert attention.auto_mask(**{**args, "allow_is_causal_skip": True}) is None  # plain causal: SDPA's is_causal


def test_rows_of_many_uneven_sequences_are_gathered_and_rows_of_few_looped():
    assert attention.attend_one_by_one([60, 40, 80, 50, 70, 45, 55, 65])  # up to 8: always one call each
    assert attention.attend_one_by_one([500, 300, 200, 400] * 4)  # 16: the padded batch would add > 1.5x scores
    assert not attention.attend_one_by_one([120, 130, 110, 140] * 4)  # 16 of similar lengths: about even
    assert not attention.attend_one_by_one([20, 35, 28, 40] * 8)  # 32 short: each call's fixed cost dominates


@pytest.mark.parametrize("one_by_one", [False, True])
@pytest.mark.parametrize("window", [4, 64])
def test_a_sliding_window_layer_attends_per_sequence_within_its_window(window, one_by_one, monkeypatch):
    """Qwen2 with sliding-window layers: a padding-free row's sequences longer than the window attend to the last
    `window` keys only, exactly as the padded batch's sliding mask does (and a wide window changes nothing)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                         sliding_window=window, max_window_layers=0, attn_implementation=attention.resolve_attention("auto"))
    monkeypatch.setattr(attention, "attend_one_by_one", lambda lengths: one_by_one)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    assert all(layer.self_attn.sliding_window == window for layer in model.model.layers)
    flat, padded = flat_and_padded([5, 17, 9])
    with torch.no_grad():
        row = model(**flat, use_cache=False).logits[0]
        rows = model(**padded, use_cache=False).logits[padded["attention_mask"].bool()]
        plain = model(input_ids=flat["input_ids"][:, 5:22], use_cache=False).logits[0]  # the 17-token sequence alone
    assert torch.allclose(row, rows, atol=1e-5)
    assert torch.allclose(row[5:22], plain, atol=1e-5)


def test_auto_gives_a_model_that_cannot_run_sdpa_its_eager_attention(models):
    """Gemma2 softcaps its attention logits, which SDPA refuses: `auto` settles on the model's own eager attention
    (transformers' own default for such a class), and computes what an eager model computes."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=8)
    torch.manual_seed(0)
    auto = attention.settle_attention(Gemma2ForCausalLM._from_config(config, attn_implementation=resolve_attention(
        "auto")).eval())
    eager = Gemma2ForCausalLM._from_config(config, attn_implementation="eager").eval()
    eager.load_state_dict(auto.state_dict())
    ids = torch.randint(5, 290, (2, 12))
    assert auto.config._attn_implementation == "eager"
    with torch.no_grad():
        assert torch.equal(auto(input_ids=ids).logits, eager(input_ids=ids).logits)
    assert models["auto"].config._attn_implementation == AUTO_ATTENTION  # Llama runs SDPA: it keeps `auto`


ARCHITECTURES = {  # config class prefix: extra config; Mistral and Gemma3 with windows shorter than a sequence
    "Qwen3": {"head_dim": 8}, "Mistral": {"sliding_window": 8}, "Gemma3Text": {"head_dim": 8, "sliding_window": 8},
    "Phi3": {}, "Olmo2": {}, "Qwen3Moe": {"head_dim": 8}, "Gemma2": {"head_dim": 8, "sliding_window": 8},
}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_every_architecture_gives_a_padding_free_row_the_padded_batch_logits(name):
    """`auto` is every model's default: for each family a padding-free row (of sequences longer than any sliding
    window) computes the padded batch's logits, per sequence where the model runs SDPA, through its own eager
    attention where it cannot (Gemma2)."""
    import transformers

    config = getattr(transformers, f"{name}Config")(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        **ARCHITECTURES[name])
    torch.manual_seed(0)
    model_class = getattr(transformers, f"{name.removesuffix('Text')}ForCausalLM")
    model = attention.settle_attention(model_class._from_config(config, attn_implementation=resolve_attention(
        "auto"))).eval()
    flat, padded = flat_and_padded([5, 17, 9, 12])
    with torch.no_grad():
        row = model(**flat, use_cache=False).logits[0]
        rows = model(**padded, use_cache=False).logits[padded["attention_mask"].bool()]
    assert torch.allclose(row, rows, atol=1e-5)
    assert model.config._attn_implementation == ("eager" if name == "Gemma2" else AUTO_ATTENTION)
