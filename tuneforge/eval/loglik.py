"""Log-likelihood of continuations after a context: the scoring behind multiple-choice benchmarks.

    scores = continuation_logprobs(model, tokenizer, [("...Answer:", [" A", " B", " C", " D"])])

The context is run through the model once per question, never once per option. When every option is one token
(" A" ... " D", the harness convention), the logits at the context's last position score all of them, and
questions are batched. Longer options (full option text) reuse the context's KV cache: the cache is repeated
across the options and only the option tokens are run.
Tokenization follows lm-evaluation-harness: context+option is encoded as a whole and the option's tokens are
what follows the context's tokens, so a merge across the boundary is scored as the model would see it.
"""

from __future__ import annotations

import torch


def split_tokens(tokenizer, context: str | list[int], continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as the harness encodes them; a context given as ids (a chat-template
    prompt from the engine's encoder) is kept as it is and the continuation is encoded alone."""
    if not isinstance(context, str):
        return list(context), tokenizer(continuation, add_special_tokens=False).input_ids
    ctx = tokenizer(context).input_ids
    whole = tokenizer(context + continuation).input_ids
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx):]
    return ctx, tokenizer(continuation, add_special_tokens=False).input_ids


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _single_token_batch(model, rows: list[tuple[list[int], list[int]]]) -> list[list[float]]:
    """rows: (context ids, one token id per option); one right-padded forward for the whole batch."""
    longest = max(len(ctx) for ctx, _ in rows)
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, (ctx, _) in enumerate(rows):
        ids[i, : len(ctx)] = torch.tensor(ctx)
        mask[i, : len(ctx)] = 1
    device = _device(model)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    last = torch.tensor([len(ctx) - 1 for ctx, _ in rows], device=device)
    logprobs = torch.log_softmax(logits[torch.arange(len(rows), device=device), last].float(), dim=-1)
    return [[logprobs[i, t].item() for t in options] for i, (_, options) in enumerate(rows)]


@torch.no_grad()
def _shared_prefix(model, ctx: list[int], options: list[list[int]]) -> list[float]:
    """Run the context once, repeat its KV cache across the options, then run only the option tokens."""
    device = _device(model)
    out = model(input_ids=torch.tensor([ctx], device=device), use_cache=True)
    first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
    cache = out.past_key_values
    cache.batch_repeat_interleave(len(options))
    longest = max(len(o) for o in options)
    ids = torch.zeros(len(options), longest, dtype=torch.long)
    for i, o in enumerate(options):
        ids[i, : len(o)] = torch.tensor(o)
    # right padding: a real token never attends to a later pad, so the mask over real tokens is all ones
    mask = torch.ones(len(options), len(ctx) + longest, dtype=torch.long, device=device)
    logits = model(input_ids=ids.to(device), attention_mask=mask, past_key_values=cache).logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    scores = []
    for i, o in enumerate(options):
        total = first[o[0]].item()
        total += sum(logprobs[i, j - 1, o[j]].item() for j in range(1, len(o)))
        scores.append(total)
    return scores


def continuation_logprobs(model, tokenizer, requests: list[tuple[str | list[int], list[str]]],
                          batch_size: int = 8) -> list[list[float]]:
    """For each (context, options): the summed log-probability of each option after the context."""
    encoded = []
    for context, options in requests:
        pairs = [split_tokens(tokenizer, context, o) for o in options]
        ctx = pairs[0][0]
        if any(p[0] != ctx for p in pairs):
            raise ValueError("the context tokenizes differently across options")  # cannot happen with split_tokens
        encoded.append((ctx, [p[1] for p in pairs]))
    results: list[list[float] | None] = [None] * len(encoded)
    single = [i for i, (_, opts) in enumerate(encoded) if all(len(o) == 1 for o in opts)]
    for start in range(0, len(single), batch_size):
        chunk = single[start: start + batch_size]
        scores = _single_token_batch(model, [(encoded[i][0], [o[0] for o in encoded[i][1]]) for i in chunk])
        for i, s in zip(chunk, scores):
            results[i] = s
    for i, (ctx, opts) in enumerate(encoded):
        if results[i] is None:
            results[i] = _shared_prefix(model, ctx, opts)
    return results  # type: ignore[return-value]


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], max_length: int = 1024) -> dict[str, float]:
    """Token-level perplexity over held-out texts, exp(mean NLL), every token of a text scored. A text longer than
    `max_length` tokens is read in windows of that length, each window after the first scoring only its last half
    with the half before as context: the strided evaluation of Hugging Face's "Perplexity of fixed-length models"
    (a text cut at max_length would leave the rest unscored; disjoint windows would score tokens without context)."""
    return perplexity_of([text_nll(model, tokenizer, text, max_length) for text in texts])


def text_nll(model, tokenizer, text: str, max_length: int = 1024) -> tuple[float, int]:
    """(summed NLL, tokens scored) of one text, as `perplexity` scores it."""
    return _text_nll(model, tokenizer(text).input_ids, max_length, _device(model))


def perplexity_of(nlls: list[tuple[float, int]]) -> dict[str, float]:
    """exp(mean NLL per token) of texts' (summed NLL, tokens scored)."""
    import math

    total_nll, total_tokens = sum(n for n, _ in nlls), sum(t for _, t in nlls)
    if total_tokens == 0:
        return {"perplexity": float("nan"), "tokens": 0}
    return {"perplexity": math.exp(total_nll / total_tokens), "nll_per_token": total_nll / total_tokens,
            "tokens": total_tokens}


def _text_nll(model, ids: list[int], max_length: int, device) -> tuple[float, int]:
    """Summed NLL of ids[1:] and how many tokens it covers, in windows of max_length with a stride of half."""
    stride = max(1, max_length // 2)
    nll, scored_up_to = 0.0, 1  # the first token has no prediction
    for begin in range(0, max(len(ids) - 1, 1), stride):
        window = ids[begin:begin + max_length]
        new = begin + len(window) - scored_up_to  # tokens this window scores for the first time
        if len(window) < 2 or new <= 0:
            break
        x = torch.tensor([window], device=device)
        logits = model(input_ids=x).logits[0, -new - 1:-1].float()
        nll += torch.nn.functional.cross_entropy(logits, x[0, -new:], reduction="sum").item()
        scored_up_to += new
        if scored_up_to >= len(ids):
            break
    return nll, scored_up_to - 1
