"""Greedy replies to chat prompts, batched: what evaluation, the quickstart and `tuneforge chat` share.

    replies = generate_replies(model, tokenizer, [[{"role": "user", "content": "What is 2+3?"}]])

Prompts are rendered with the tokenizer's own chat template (or the data path's built-in fallback when it has
none) with add_generation_prompt=True, and left-padded so a batch ends where every reply begins. Decoding stops
at eos or any end-of-turn token (<|im_end|>, <|eot_id|>, ...), and special tokens are stripped from the text.
Works for plain transformers models and PEFT-wrapped ones (both have `.generate`).
"""

from __future__ import annotations

import torch

# Tokens that end an assistant turn in common chat formats; only those the tokenizer knows are used.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                      "<|end_of_text|>", "<|user|>", "<|observation|>", "</s>", "<|EOT|>")


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def stop_token_ids(model, tokenizer) -> list[int]:
    """eos of the tokenizer and of the model's generation config, plus known end-of-turn tokens in the vocab."""
    ids = _as_list(tokenizer.eos_token_id)
    generation_config = getattr(model, "generation_config", None)
    ids += _as_list(getattr(generation_config, "eos_token_id", None))
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in END_OF_TURN_TOKENS if t in vocab]
    return sorted(set(ids))


def render_prompts(tokenizer, prompts: list[list[dict]]) -> list[str]:
    """Each message list as text ending with the assistant header. The template is the tokenizer's own, else the
    same built-in fallback the data path trains with, so generation always matches training."""
    from tuneforge.data.templates import resolve_chat_template

    template = resolve_chat_template(tokenizer)
    return [tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                          tokenize=False) for messages in prompts]


def _decode(tokenizer, new_tokens: torch.Tensor, stop_ids: set[int]) -> str:
    ids = new_tokens.tolist()
    end = next((i for i, t in enumerate(ids) if t in stop_ids), len(ids))
    return tokenizer.decode(ids[:end], skip_special_tokens=True).strip()


def _generate_batch(model, tokenizer, texts: list[str], generation_config, stop_ids: set[int]) -> list[str]:
    # The template already wrote bos (if any), so the tokenizer must not add specials a second time.
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    device = next(model.parameters()).device
    out = model.generate(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                         generation_config=generation_config)
    prompt_len = enc["input_ids"].shape[1]
    return [_decode(tokenizer, row[prompt_len:], stop_ids) for row in out.cpu()]


def generate_replies(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int = 64,
                     batch_size: int = 8, repetition_penalty: float = 1.0) -> list[str]:
    """Greedy replies (text, special tokens removed) to each message list in `prompts`, in order.

    `repetition_penalty` > 1 (still deterministic) keeps small models out of loops in free-form chat; evaluation
    keeps the default 1.0, plain greedy."""
    from transformers import GenerationConfig

    if not hasattr(model, "generate") and hasattr(model, "module"):  # DDP wrapper around the model
        model = model.module
    stop_ids = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop_ids or [0])[0]
    # A fresh config: greedy, our stop tokens, and none of the model's sampling defaults (temperature, top_p).
    generation_config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids,
                                         pad_token_id=pad_id, use_cache=True, repetition_penalty=repetition_penalty)
    texts = render_prompts(tokenizer, prompts)
    was_training, padding_side = model.training, tokenizer.padding_side
    model.eval()  # no dropout; training code may call this mid-run
    tokenizer.padding_side = "left"  # every row's prompt ends at the same position, where generation starts
    try:
        replies = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                batch = texts[start:start + batch_size]
                replies += _generate_batch(model, tokenizer, batch, generation_config, set(stop_ids))
        return replies
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
