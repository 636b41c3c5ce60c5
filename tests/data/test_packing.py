"""Packing and collate: rows are filled deterministically, and a packed batch gives the same loss as the same
examples unpacked (tiny random Llama and Qwen2, sdpa and eager), with no attention across examples."""

from __future__ import annotations

import pytest
import torch

from tests.data.chat_fixtures import make_tokenizer
from tuneforge.data import IGNORE_INDEX, Encoded, PackedRow, collate, encode_chat, pack
from tuneforge.losses import causal_lm_loss

QUESTIONS = [("Hi", "Hello! How can I help?"), ("What is two plus two?", "Four."),
             ("Name a colour.", "Red is a colour, and so is blue."), ("Convert 7 km to meters.", "7000 m"),
             ("Say hello in Chinese.", "你好"), ("Who are you?", "I am a small test model.")]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(None)


@pytest.fixture(scope="module")
def examples(tokenizer):
    out = []
    for question, answer in QUESTIONS:
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        encoded = encode_chat(tokenizer, messages, chat_template="chatml")
        encoded.source = question
        out.append(encoded)
    return out


def synthetic(lengths: list[int]) -> list[Encoded]:
    return [Encoded(list(range(1, n + 1)), list(range(1, n + 1)), source=f"ex{i}") for i, n in enumerate(lengths)]


def test_pack_best_fit_decreasing_is_deterministic_and_complete():
    rows = pack(synthetic([6, 5, 4, 3, 2]), max_length=10)
    assert [r.sources for r in rows] == [["ex0", "ex2"], ["ex1", "ex3", "ex4"]]
    assert rows == pack(synthetic([6, 5, 4, 3, 2]), max_length=10)
    row = rows[1]
    assert row.position_ids == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1]
    assert row.example_lengths() == [5, 3, 2] and rows[0].example_lengths() == [6, 4]
    # the first label of every packed example is ignored: it would be predicted from the previous example
    assert [row.labels[i] for i in (0, 5, 8)] == [IGNORE_INDEX] * 3
    assert row.labels[1:5] == [2, 3, 4, 5]
    assert len(row) == 10


def test_pack_refuses_examples_longer_than_a_row():
    with pytest.raises(ValueError, match="exceed max_length"):
        pack(synthetic([11]), max_length=10)


def test_collate_plain_and_packed():
    plain = collate(synthetic([3, 1]), pad_token_id=0)
    assert set(plain) == {"input_ids", "attention_mask", "labels"}
    assert plain["input_ids"].tolist() == [[1, 2, 3], [1, 0, 0]]
    assert plain["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert plain["labels"].tolist() == [[1, 2, 3], [1, IGNORE_INDEX, IGNORE_INDEX]]
    packed = collate(pack(synthetic([3, 2, 4]), max_length=5), pad_token_id=0)  # rows: [4 + padding], [3, 2]
    assert set(packed) == {"input_ids", "position_ids", "labels"}  # no attention_mask: see collate.py
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]  # padding is a block of its own
    assert packed["input_ids"].tolist() == [[1, 2, 3, 4, 0], [1, 2, 3, 1, 2]]
    assert packed["labels"].tolist() == [[IGNORE_INDEX, 2, 3, 4, IGNORE_INDEX], [IGNORE_INDEX, 2, 3, IGNORE_INDEX, 2]]


def tiny_model(kind: str, attn: str, vocab_size: int):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    # initializer_range 0.1 (not 0.02) makes logits far from uniform, so a leak between examples moves the loss by
    # ~1e-2, far outside the 1e-5 tolerance; packed and unpacked agree to ~1e-6.
    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config}[kind]
    config = config_class(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=128, vocab_size=vocab_size, max_position_embeddings=256,
                          initializer_range=0.1)
    config.use_cache = False  # as in training; with a KV cache transformers does not detect packed sequences
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32).eval()


def mean_loss(model, batch: dict) -> tuple[float, int]:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        total, count = causal_lm_loss(model(**inputs).logits, batch["labels"])
    return float(total / count), int(count)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_packed_loss_equals_unpacked_loss(kind, attn, tokenizer, examples):
    model = tiny_model(kind, attn, len(tokenizer))
    rows = pack(examples, max_length=64)
    assert len(rows) < len(examples) and any(len(r.sources) >= 2 for r in rows)  # really packed
    unpacked, n_unpacked = mean_loss(model, collate(examples, tokenizer.pad_token_id))
    packed_batch = collate(rows, tokenizer.pad_token_id)
    packed, n_packed = mean_loss(model, packed_batch)
    assert n_packed == n_unpacked
    assert abs(packed - unpacked) < 1e-5
    # The check has teeth: the same packed rows with a plain 2D mask (attention crossing examples) differ.
    leaky = {**packed_batch, "attention_mask": torch.ones_like(packed_batch["input_ids"])}
    assert abs(mean_loss(model, leaky)[0] - unpacked) > 1e-4


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_example_does_not_see_its_neighbour(attn, tokenizer, examples):
    model = tiny_model("llama", attn, len(tokenizer))
    first, second = examples[0], examples[2]
    changed = Encoded([(t + 7) % len(tokenizer) for t in first.input_ids], first.labels, "changed")

    def logits_of(row: PackedRow) -> torch.Tensor:
        batch = collate([row], tokenizer.pad_token_id)
        with torch.no_grad():
            return model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]

    original, edited = logits_of(pack([first, second], 100)[0]), logits_of(pack([changed, second], 100)[0])
    order = pack([first, second], 100)[0].sources  # best-fit-decreasing puts the longer one first
    n_first = len(first) if order[0] == first.source else len(second)
    second_slice = slice(n_first, None) if order[0] == first.source else slice(0, n_first)
    first_slice = slice(0, n_first) if order[0] == first.source else slice(len(second), None)
    assert torch.allclose(original[second_slice], edited[second_slice], atol=1e-6)
    assert not torch.allclose(original[first_slice], edited[first_slice], atol=1e-3)
