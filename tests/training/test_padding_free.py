"""Padding-free batches (training/padding_free.py): a flat micro-batch and packed rows give the unpacked loss, the
varlen kwargs reach the attention call and mark every sequence, and `training.padding_free` resolves as documented.

FlashAttention itself needs a GPU: on CPU a reference varlen attention (sdpa per segment, registered in transformers'
AttentionInterface) reads the `cu_seq_lens_q` the hook passes down, exactly where FlashAttention's varlen kernel
would. The `gpu` test at the end runs the real kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.data.test_packing import QUESTIONS, mean_loss
from tuneforge.data import Encoded, collate, collate_padding_free, encode_chat, pack
from tuneforge.data.types import IGNORE_INDEX
from tuneforge.errors import ConfigError
from tuneforge.models.loading import load_tokenizer
from tuneforge.training.padding_free import install_varlen_hook, use_padding_free, varlen_kwargs

REFERENCE = "tuneforge_test_varlen"


def reference_varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """What flash_attn_varlen_func computes: causal attention inside each [cu[i], cu[i+1]) span of the flattened
    batch. Fails loudly without the kwargs (transformers alone would not pass them for this batch)."""
    cu = kwargs["cu_seq_lens_q"].tolist()
    assert attention_mask is None and kwargs["max_length_q"] == max(b - a for a, b in zip(cu, cu[1:]))
    batch, heads, seq, dim = query.shape
    key = key.repeat_interleave(heads // key.shape[1], dim=1)
    value = value.repeat_interleave(heads // value.shape[1], dim=1)
    q, k, v = (x.transpose(1, 2).reshape(batch * seq, heads, dim).transpose(0, 1) for x in (query, key, value))
    out = torch.empty_like(q)
    for start, end in zip(cu, cu[1:]):
        out[:, start:end] = F.scaled_dot_product_attention(q[:, start:end], k[:, start:end], v[:, start:end],
                                                           is_causal=True, scale=scaling)
    return out.transpose(0, 1).reshape(batch, seq, heads, dim), None


@pytest.fixture(scope="module")
def examples():
    from tests.data.chat_fixtures import make_tokenizer

    tokenizer = make_tokenizer(None)
    out = []
    for question, answer in QUESTIONS:
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        out.append(encode_chat(tokenizer, messages, chat_template="chatml"))
    return tokenizer, out


def tiny_llama(attn: str, vocab_size: int, device: str = "cpu", dtype: torch.dtype = torch.float32):
    from transformers import AttentionInterface, AutoModelForCausalLM, LlamaConfig

    AttentionInterface.register(REFERENCE, reference_varlen_attention)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=vocab_size, max_position_embeddings=256,
                         initializer_range=0.1, use_cache=False)  # 0.1: a leak moves the loss by ~1e-2
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype).eval()


def test_collate_padding_free_is_one_row_without_padding():
    rows = [Encoded([5, 6, 7], [5, 6, 7]), Encoded([8, 9], [IGNORE_INDEX, 9])]
    batch = collate_padding_free(rows)
    assert set(batch) == {"input_ids", "position_ids", "labels"}
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]]  # never predicted across examples
    packed = pack([Encoded([1, 2], [1, 2]), Encoded([3, 4, 5], [3, 4, 5])], max_length=8)
    assert collate_padding_free(packed + rows[1:])["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1]]


def test_varlen_kwargs_mark_every_sequence_and_padding_block():
    positions = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]])  # two packed rows; the last 0 is padding
    kwargs = varlen_kwargs(positions)
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 3, 5, 9, 10]
    assert kwargs["cu_seq_lens_q"].dtype == torch.int32 and kwargs["cu_seq_lens_k"] is kwargs["cu_seq_lens_q"]
    assert kwargs["max_length_q"] == kwargs["max_length_k"] == 4
    with pytest.raises(ValueError, match="start at 0"):
        varlen_kwargs(torch.tensor([[1, 2, 3]]))


@pytest.mark.parametrize("layout", ["flat", "packed"])
def test_varlen_batches_give_the_unpacked_loss(examples, layout):
    tokenizer, encoded = examples
    expected, n_expected = mean_loss(tiny_llama("sdpa", len(tokenizer)), collate(encoded, tokenizer.pad_token_id))
    model = tiny_llama(REFERENCE, len(tokenizer))
    if layout == "flat":
        batch = collate_padding_free(encoded)
    else:  # several packed rows with padding: transformers' own FlashAttention path would leak across examples
        batch = collate(pack(encoded, max_length=48), tokenizer.pad_token_id)
        assert batch["input_ids"].shape[0] > 1 and (batch["position_ids"][:, 1:] == 0).any()
    with pytest.raises(KeyError, match="cu_seq_lens_q"):  # without the hook nothing tells the kernel the spans
        mean_loss(model, batch)
    handle = install_varlen_hook(model)
    loss, n = mean_loss(model, batch)
    handle.remove()
    assert n == n_expected
    assert abs(loss - expected) < 1e-5


def test_flat_batch_with_sdpa_gives_the_unpacked_loss(examples):
    tokenizer, encoded = examples
    model = tiny_llama("sdpa", len(tokenizer))
    expected, _ = mean_loss(model, collate(encoded, tokenizer.pad_token_id))
    flat = collate_padding_free(encoded)
    assert abs(mean_loss(model, flat)[0] - expected) < 1e-5
    leaky = {**flat, "position_ids": torch.arange(flat["input_ids"].shape[1])[None]}  # one long sequence
    assert abs(mean_loss(model, leaky)[0] - expected) > 1e-4


def test_padding_free_setting_resolves():
    assert use_padding_free("auto", "sft", "lora", "flash_attention_2")
    assert use_padding_free("auto", "pt", "full", "flash_attention_3")
    assert use_padding_free("auto", "sft", "lora", "kernels-community/flash-attn2")  # a hub kernel transformers knows
    assert not use_padding_free("auto", "sft", "lora", "sdpa")  # sdpa's mask over a joined row costs more
    assert use_padding_free("auto", "dpo", "lora", "flash_attention_2")  # per-sequence sums (sequence_ids)
    assert not use_padding_free("auto", "dpo", "lora", "auto")  # auto attention on a GPU: sdpa
    assert use_padding_free("auto", "sft", "lora", "auto", cpu_auto_attention=True)  # on CPU: per sequence
    assert not use_padding_free("auto", "grpo", "lora", "auto", cpu_auto_attention=True)
    assert use_padding_free("auto", "kto", "lora", "flash_attention_2")
    assert use_padding_free("auto", "rm", "lora", "flash_attention_2")
    assert not use_padding_free("auto", "ppo", "lora", "flash_attention_2")
    assert not use_padding_free("auto", "sft", "prompt_tuning", "flash_attention_2")
    assert not use_padding_free("never", "sft", "lora", "flash_attention_2")
    assert use_padding_free("always", "sft", "lora", "eager") and use_padding_free("always", "dpo", "full", "sdpa")
    for stage in ("ppo", "grpo"):
        with pytest.raises(ConfigError, match=f"stage {stage}"):
            use_padding_free("always", stage, "lora", "sdpa")


def test_padding_free_always_is_checked_with_the_config():
    from tuneforge.configs.schema import load_train_config

    with pytest.raises(ConfigError, match="padding_free"):
        load_train_config(None, ["training.padding_free=always"], base={"stage": "grpo", "data": {"train": ["x"]}})


@pytest.mark.parametrize("checkpointing", [False, True])
def test_train_padding_free_equals_padded(tiny_llama_dir, tmp_path, monkeypatch, checkpointing):
    """The whole `tuneforge train` path: the same run, padded and padding-free, logs the same losses (also with
    gradient checkpointing, whose recomputed blocks get the row's deferred mask again)."""
    import importlib

    from tests.test_training import TASK

    flat_rows = []

    def spy(batch, pad_token_id=None):
        out = collate_padding_free(batch, pad_token_id)
        flat_rows.append(out["input_ids"].shape[0])
        return out

    # the module, not the function `tuneforge.data.collate` that the package's namespace holds under that name
    monkeypatch.setattr(importlib.import_module("tuneforge.data.collate"), "collate_padding_free", spy)
    from tuneforge.configs.schema import load_train_config
    from tuneforge.train import run_config

    data = tmp_path / "train.jsonl"
    data.write_text("".join(TASK.read_text(encoding="utf-8").splitlines(keepends=True)[:8]), encoding="utf-8")
    losses = {}
    for setting in ("never", "always"):
        cfg = load_train_config(None, [f"training.padding_free={setting}",
                                       f"training.gradient_checkpointing={str(checkpointing).lower()}"], base={
            "stage": "sft", "method": "lora", "output_dir": str(tmp_path / setting),
            "model": {"name_or_path": str(tiny_llama_dir)}, "data": {"train": [str(data)], "max_length": 96},
            "training": {"batch_size": 4, "max_steps": 2, "lr": 1e-3, "device": "cpu", "progress_bar": False,
                         "plot_loss": False}})
        losses[setting] = [h["loss"] for h in run_config(cfg, log=lambda _: None).history]
    assert len(losses["always"]) == 2 and flat_rows == [1, 1]  # only the `always` run, one row per step
    assert losses["always"] == pytest.approx(losses["never"], abs=1e-5)


@pytest.mark.parametrize("overrides, flat", [
    ([], True),                                       # CPU defaults: auto attention attends the row per sequence
    (["model.attn_implementation=sdpa"], False),      # a dense mask over the row would cost more than padding
    (["training.neftune_alpha=5"], False),            # NEFTune's noise scales with the row's length
    (["training.rdrop_alpha=1"], False),              # R-Drop doubles the row
    (["training.batch_size=86"], True),               # 86 x 96 positions: no row x row mask is built, any length
])
def test_cpu_runs_are_padding_free_by_default(tiny_llama_dir, tmp_path, overrides, flat):
    from tests.test_training import config
    from tuneforge.training.runtime import setup_runtime
    from tuneforge.training.setup import setup_data

    cfg = config(tiny_llama_dir, tmp_path / "out", *overrides)
    runtime = setup_runtime("cpu", "fp32", "none")
    train, _, collate_fn = setup_data(cfg, load_tokenizer(cfg.model), "sft", runtime, log=lambda _: None)
    batch = collate_fn(train[:4])
    assert (batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch) == flat


def test_pairs_padding_free_is_one_row_of_both_sides_with_their_sequence_ids():
    from tuneforge.data import EncodedPair, collate_pairs_padding_free

    pairs = [EncodedPair(Encoded([1, 2, 3], [-100, 2, 3]), Encoded([1, 4], [-100, 4]), margin=0.5),
             EncodedPair(Encoded([5, 6], [-100, 6]), Encoded([5, 7, 8, 9], [-100, 7, 8, 9]))]
    out = collate_pairs_padding_free(pairs)
    assert out["input_ids"].tolist() == [[1, 2, 3, 5, 6, 1, 4, 5, 7, 8, 9]]  # chosen sides, then rejected
    assert out["sequence_ids"].tolist() == [[0, 0, 0, 1, 1, 2, 2, 3, 3, 3, 3]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 0, 1, 2, 3]]
    assert out["margin"].tolist() == [0.5, 0.0] and "attention_mask" not in out


@pytest.mark.parametrize("method, loss, precompute", [("lora", "sigmoid", False), ("full", "ipo", False),
                                                      ("lora", "simpo", False), ("lora", "sigmoid", True)])
def test_dpo_padding_free_equals_padded(tiny_qwen2_dir, tmp_path, method, loss, precompute):
    """The whole dpo path, padded and padding-free: the same losses, rewards and gradient norms (sums, IPO's
    per-token means and SimPO's averages all come per sequence from `sequence_ids`; the precomputed reference
    pass takes flat batches of twice the size)."""
    padded_and_flat_agree("dpo", tiny_qwen2_dir, tmp_path, ("loss", "grad_norm", "rewards/margins"),
                          f"method={method}", f"dpo.loss={loss}",
                          f"dpo.precompute_reference={str(precompute).lower()}")


def padded_and_flat_agree(stage, model_dir, tmp_path, keys, *overrides):
    """Train `stage` 3 steps padded and padding-free; the logged `keys` agree step by step (and the last one moved),
    and so do the model FLOPs per token the MFU counts (tokens, attention lengths and lm_head positions)."""
    from tests.recipes.test_alignment import metric, train

    runs = {}
    for setting in ("never", "always"):
        out = tmp_path / setting
        train(stage, model_dir, out, "training.max_steps=3", "training.batch_size=4", "training.lr=5e-3",
              f"training.padding_free={setting}", *overrides)
        runs[setting] = {k: metric(out, k) for k in keys}
        runs[setting]["flops_per_token"] = [f * 1e12 / t for f, t in zip(metric(out, "model_tflops"),
                                                                           metric(out, "tokens_per_s"))]
    assert len(runs["always"]["loss"]) == 3 and runs["always"][keys[-1]][-1] != 0
    for key, values in runs["never"].items():
        assert runs["always"][key] == pytest.approx(values, rel=1e-4, abs=1e-5), key


@pytest.mark.parametrize("method", ["lora", "full"])
def test_kto_padding_free_equals_padded(tiny_qwen2_dir, tmp_path, method):
    """kto's row holds the batch's conversations, then their mismatched ones (the KL reference point): the same
    losses, rewards and gradient norms as the padded batches."""
    padded_and_flat_agree("kto", tiny_qwen2_dir, tmp_path, ("loss", "grad_norm", "kl", "rewards/chosen"),
                          f"method={method}")


@pytest.mark.parametrize("method", ["lora", "full"])
def test_rm_padding_free_equals_padded(tiny_qwen2_dir, tmp_path, method):
    """rm scores each sequence of the row at its own last token: the same losses, accuracies, margins and gradient
    norms as the padded batches."""
    padded_and_flat_agree("rm", tiny_qwen2_dir, tmp_path, ("loss", "grad_norm", "accuracy", "reward_margin"),
                          f"method={method}")


def test_kto_padding_free_row_holds_the_mismatched_conversations_too():
    from tuneforge.data import EncodedKTO, collate_kto, collate_kto_padding_free

    batch = [EncodedKTO([1, 2, 3], [-100, -100, 3], label=True, prompt_length=2),
             EncodedKTO([4, 5, 6, 7], [-100, 5, 6, 7], label=False, prompt_length=1)]
    flat, padded = collate_kto_padding_free(batch), collate_kto(batch, 0)
    # row 0's prompt + row 1's reply, row 1's prompt + row 0's reply, cut to the longest row (4)
    assert flat["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 1, 2, 5, 6, 4, 3]]
    assert flat["sequence_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3]]
    assert padded["kl_input_ids"][0].tolist() == [1, 2, 5, 6] and flat["kto_label"].tolist() == [True, False]
    from tuneforge.recipes.kto import KTOStage

    # MFU: the reference over the 7 conversation tokens, policy and reference over the 6 mismatched ones
    assert KTOStage(None, None, None).forward_only_tokens(flat, 7) == 7 + 2 * 6
    assert KTOStage(None, None, None).forward_only_tokens(padded, 7) == 7 + 2 * 6


@pytest.mark.gpu
def test_flash_attention_varlen_on_gpu(examples):
    """The real kernel: packed rows and a flat batch under flash_attention_2 give the unpacked sdpa loss."""
    pytest.importorskip("flash_attn")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from tuneforge.training.padding_free import uses_flash_attention

    tokenizer, encoded = examples
    reference = tiny_llama("sdpa", len(tokenizer), "cuda", torch.bfloat16)
    expected, _ = mean_loss(reference, {k: v.cuda() for k, v in collate(encoded, tokenizer.pad_token_id).items()})
    model = tiny_llama("flash_attention_2", len(tokenizer), "cuda", torch.bfloat16)
    assert uses_flash_attention(model)
    packed = {k: v.cuda() for k, v in collate(pack(encoded, max_length=48), tokenizer.pad_token_id).items()}
    leaky, _ = mean_loss(model, packed)  # transformers alone: plain causal attention across a row's examples
    handle = install_varlen_hook(model)
    errors = [abs(mean_loss(model, batch)[0] - expected)
              for batch in (packed, {k: v.cuda() for k, v in collate_padding_free(encoded).items()})]
    handle.remove()
    assert max(errors) < 2e-2  # bf16 noise
    assert abs(leaky - expected) > 3 * max(errors)  # the leak is far outside it


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_attention_attends_a_flat_row_per_sequence_on_gpu(examples, dtype):
    """Without FlashAttention (the device image has none): `auto` attention on CUDA runs a padding-free row through
    SDPA one sequence per batch row, with no mask over the whole row, and gets the padded batch's loss."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from tuneforge.models import attention

    tokenizer, encoded = examples
    model = tiny_llama(attention.resolve_attention("auto"), len(tokenizer), "cuda", dtype)
    padded = {k: v.cuda() for k, v in collate(encoded, tokenizer.pad_token_id).items()}
    flat = {k: v.cuda() for k, v in collate_padding_free(encoded).items()}
    calls = []
    real = attention.segment_attention
    attention.segment_attention = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        expected, flat_loss = mean_loss(model, padded)[0], mean_loss(model, flat)[0]
    finally:
        attention.segment_attention = real
    assert calls == [1, 1]  # both layers of the flat row, none of the padded batch
    assert abs(flat_loss - expected) < (1e-5 if dtype == torch.float32 else 2e-2)


def test_the_varlen_hook_finds_the_decoder_under_the_reward_model(tiny_qwen2_dir):
    """rm trains a RewardModel around the causal LM: the padding-free hook and the FlashAttention check must reach
    its decoder stack, as they reach a causal LM's, and the hook must add the varlen kwargs there."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tuneforge.models.reward import RewardModel
    from tuneforge.training.padding_free import decoder_of

    lm = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir)
    for wrapped in (lm, get_peft_model(lm, LoraConfig(r=2, target_modules=["q_proj"]))):
        rm = RewardModel(wrapped)
        assert decoder_of(rm) is decoder_of(wrapped) and type(decoder_of(rm)).__name__ == "Qwen2Model"
    seen = []
    handle = install_varlen_hook(rm)  # then the spy, which sees what the hook passed on
    decoder_of(rm).register_forward_pre_hook(lambda m, a, kw: seen.append(sorted(kw)), with_kwargs=True)
    rm(torch.tensor([[5, 6, 7, 8, 9]]), position_ids=torch.tensor([[0, 1, 2, 0, 1]]),
       sequence_ids=torch.tensor([[0, 0, 0, 1, 1]]))
    handle.remove()
    assert "cu_seq_lens_q" in seen[0]


@pytest.mark.parametrize("padding_free", ["never", "always"])
def test_train_packed_sft_equals_unpacked(tiny_llama_dir, tmp_path, padding_free):
    """`tuneforge train` with `data.packing: true`: one step over every example, packed into rows, logs the loss of
    the same examples unpacked in one batch (the first label of each packed example is ignored and no example sees
    its neighbour), padded and padding-free, with the CPU default `auto` attention."""
    from tests.test_training import config, train
    from tuneforge.data.build import build_datasets

    cfg = config(tiny_llama_dir, tmp_path / "probe", "data.packing=true")
    rows, _, _ = build_datasets(cfg.data, load_tokenizer(cfg.model), "sft")
    n_examples = sum(len(row.sources) for row in rows)
    assert len(rows) < n_examples  # really packed
    runs = {}
    for packing, batch in (("true", len(rows)), ("false", n_examples)):
        result = train(tiny_llama_dir, tmp_path / packing, f"data.packing={packing}", f"training.batch_size={batch}",
                       "training.max_steps=1", "training.grad_accum=1", f"training.padding_free={padding_free}")
        runs[packing] = result.history[0]["loss"]
    assert runs["true"] == pytest.approx(runs["false"], abs=1e-5)
