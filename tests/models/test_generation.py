"""generate_replies (the engine's greedy helper): batched equals one-by-one, stop tokens, PEFT models, state restored."""

from __future__ import annotations

import pytest
import torch

from tuneforge.configs.schema import ModelConfig
from tuneforge.inference import generate_replies, stop_token_ids
from tuneforge.models.loading import load_model_and_tokenizer

PROMPTS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Convert 3 km to meters."}],
    [{"role": "user", "content": "把字符串“hello”反转。这是一个比较长的问题，用来让左填充更明显。"}],
    [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "42"},
     {"role": "user", "content": "And 42 + 1?"}],
    [{"role": "user", "content": "Reverse 'forge'."}],
]


@pytest.fixture(params=["tiny-llama", "tiny-qwen2"])
def loaded(request, tiny_llama_dir, tiny_qwen2_dir):
    folder = {"tiny-llama": tiny_llama_dir, "tiny-qwen2": tiny_qwen2_dir}[request.param]
    return load_model_and_tokenizer(ModelConfig(name_or_path=str(folder)))


def test_batched_equals_one_by_one(loaded):
    model, tok = loaded
    batched = generate_replies(model, tok, PROMPTS, max_new_tokens=12, batch_size=3)
    single = [generate_replies(model, tok, [p], max_new_tokens=12, batch_size=1)[0] for p in PROMPTS]
    assert batched == single
    assert len(batched) == len(PROMPTS) and any(batched)  # a random model still says something
    assert tok.padding_side == "right" and not model.training


def test_training_mode_is_restored(loaded):
    model, tok = loaded
    model.train()
    generate_replies(model, tok, PROMPTS[:1], max_new_tokens=2)
    assert model.training


def test_stop_tokens_cover_end_of_turn(tiny_llama_dir, tiny_qwen2_dir):
    for folder, token in ((tiny_llama_dir, "<|eot_id|>"), (tiny_qwen2_dir, "<|im_end|>")):
        model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=str(folder)))
        ids = stop_token_ids(model, tok)
        assert tok.convert_tokens_to_ids(token) in ids and tok.eos_token_id in ids
        assert tok.pad_token_id not in ids or folder == tiny_qwen2_dir  # Qwen's pad <|endoftext|> also ends text


def test_generation_stops_at_end_of_turn(tiny_qwen2_dir):
    """Make <|im_end|> the most likely next token everywhere: the reply must be empty, not max_new_tokens long."""
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_qwen2_dir)))
    end = tok.convert_tokens_to_ids("<|im_end|>")
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[end] = 10.0
    model.lm_head = head
    assert generate_replies(model, tok, PROMPTS[:2], max_new_tokens=20) == ["", ""]


def test_peft_wrapped_model(tiny_llama_dir):
    from peft import LoraConfig, get_peft_model

    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_llama_dir)))
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    batched = generate_replies(peft_model, tok, PROMPTS, max_new_tokens=8, batch_size=5)
    single = [generate_replies(peft_model, tok, [p], max_new_tokens=8)[0] for p in PROMPTS]
    assert batched == single and any(batched)


def test_tokenizer_without_template_uses_the_training_fallback(tiny_llama_dir):
    from tuneforge.data.templates import BUILTIN_TEMPLATES

    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_llama_dir)))
    tok.chat_template = None
    fallback = generate_replies(model, tok, PROMPTS[:2], max_new_tokens=8)
    tok.chat_template = BUILTIN_TEMPLATES["llama3"]  # what the data path picks for <|start_header_id|> vocabularies
    assert fallback == generate_replies(model, tok, PROMPTS[:2], max_new_tokens=8) and any(fallback)


def test_repetition_penalty_is_applied(tiny_llama_dir):
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_llama_dir)))
    plain = generate_replies(model, tok, PROMPTS, max_new_tokens=16)
    penalized = generate_replies(model, tok, PROMPTS, max_new_tokens=16, repetition_penalty=5.0)
    assert plain != penalized
