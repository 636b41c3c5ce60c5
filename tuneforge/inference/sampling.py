"""Choosing the next token of every row of a batch at once, on tensors.

The order follows transformers' logits processors: repetition penalty on the raw logits, then OpenAI's presence and
frequency penalties and logit_bias (additive, as OpenAI and vLLM apply them), then temperature, top-k, top-p and
min-p, then one draw from what is left. Filtering sorts only the few hundred most likely tokens when that
provably covers every kept token (see `filtered_probs`): a whole-vocabulary sort per row costs more than a model
step on CPU. Greedy rows (temperature 0) take the argmax of the penalised
logits. Each sampling row draws its random numbers from its own `torch.Generator` (the same amount every token), so
a seeded request's random stream never depends on what else shares the batch (`torch.multinomial` over the batch
would). The draw is an exponential race (Gumbel-max): the token with the largest p / E, E ~ Exp(1) drawn per
vocabulary token. It picks each token with probability p, like an inverse-CDF lookup, but tolerates the float
rounding by which a batch of another shape changes the logits: a cumulative sum over the vocabulary moves every
boundary a little, so a draw near any of thousands of boundaries flips, while the race only flips when the two best
p / E are equal to within the rounding, far more rarely (test_sampling.py: no flip in 3000 perturbed steps, where
the cumulative sum flipped 9 times).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tuneforge.inference.types import SamplingParams


@dataclass
class BatchParams:
    """The sampling parameters of a batch's rows as tensors (rebuilt when rows join or leave, not every step)."""

    temperature: torch.Tensor  # [B] float
    top_p: torch.Tensor  # [B] float
    top_k: torch.Tensor  # [B] long (0: off)
    min_p: torch.Tensor  # [B] float
    penalty: torch.Tensor  # [B] float
    sample_rows: torch.Tensor  # indices of rows with temperature > 0
    any_penalty: bool
    top_logprobs: int  # the most any row asked for
    presence: torch.Tensor | None = None  # [B] float, when a row has a presence or frequency penalty
    frequency: torch.Tensor | None = None  # [B] float
    bias: torch.Tensor | None = None  # [B, V] float, when a row has a logit_bias

    @classmethod
    def of(cls, params: list[SamplingParams], device, vocab_size: int | None = None) -> BatchParams:
        def tensor(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=device)

        temperature = [p.temperature for p in params]
        counted = any(counts_reply_tokens(p) for p in params)
        return cls(temperature=tensor(temperature), top_p=tensor([p.top_p for p in params]),
                   top_k=tensor([p.top_k for p in params], torch.long), min_p=tensor([p.min_p for p in params]),
                   penalty=tensor([p.repetition_penalty for p in params]),
                   sample_rows=tensor([i for i, t in enumerate(temperature) if t > 0], torch.long),
                   any_penalty=any(p.repetition_penalty != 1.0 for p in params),
                   top_logprobs=max((p.top_logprobs for p in params), default=0),
                   presence=tensor([p.presence_penalty for p in params]) if counted else None,
                   frequency=tensor([p.frequency_penalty for p in params]) if counted else None,
                   bias=_bias_rows(params, vocab_size, device))


def counts_reply_tokens(params: SamplingParams) -> bool:
    """Whether a row needs the count of each token in its reply so far (presence or frequency penalty)."""
    return params.presence_penalty != 0 or params.frequency_penalty != 0


def _bias_rows(params: list[SamplingParams], vocab_size: int | None, device) -> torch.Tensor | None:
    """Each row's logit_bias as a dense [B, V] row (a token id past the vocabulary is refused before this)."""
    if vocab_size is None or not any(p.logit_bias for p in params):
        return None
    bias = torch.zeros((len(params), vocab_size), device=device)
    for i, p in enumerate(params):
        for token, value in p.logit_bias.items():
            bias[i, token] = value
    return bias


def apply_openai_penalties(logits: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor,
                           frequency: torch.Tensor) -> torch.Tensor:
    """OpenAI's presence and frequency penalties (its API reference, "Parameter details"; as vLLM applies them):
    logit - frequency x count - presence x [count > 0], counted over the reply's tokens so far. counts: [B, V]."""
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL's penalty (Keskar et al., 2019, https://arxiv.org/abs/1909.05858) as transformers applies it: a seen
    token's logit is divided by the penalty when positive, multiplied when negative. seen: [B, V] bool."""
    p = penalty[:, None]
    penalised = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen, penalised, logits)


CANDIDATES = (256, 2048, 8192)  # filtered rows look at this many most likely tokens, more only when needed


def filtered_probs(logits: torch.Tensor, temperature, top_k, top_p, min_p) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities sorted high to low with filtered tokens zeroed, the token id of each column).

    Sorting a whole vocabulary per row and step costs more than the model step on CPU, so only the most likely
    CANDIDATES tokens (or top_k) are sorted, as many as provably hold every token the filters keep: top_k within
    them, or their mass already reaching top_p, or the last of them below the min_p threshold. A flat distribution
    may need the full sort."""
    probs = (logits / temperature[:, None]).softmax(dim=-1)
    vocab = probs.shape[-1]
    for size in CANDIDATES:
        n = min(vocab, max(size, int(top_k.max())))
        values, order = probs.topk(n, dim=-1)
        covered = (((top_k > 0) & (top_k <= n)) | ((top_p < 1) & (values.sum(dim=-1) >= top_p))
                   | ((min_p > 0) & (values[:, -1] < min_p * values[:, 0])))
        if n == vocab or bool(covered.all()):
            break
    else:
        values, order = probs.sort(dim=-1, descending=True)
    ranks = torch.arange(values.shape[-1], device=values.device)
    keep = (top_k[:, None] == 0) | (ranks[None, :] < top_k[:, None])
    keep &= (values.cumsum(dim=-1) - values) < top_p[:, None]  # the mass before a token is still short of top_p
    keep &= values >= min_p[:, None] * values[:, :1]
    keep[:, 0] = True  # the most likely token always survives
    return values * keep, order


def _exponentials(generators: list[torch.Generator], vocab: int, device) -> torch.Tensor:
    """[rows, vocab] Exp(1) numbers, one per vocabulary token from each row's own generator, indexed by token id (so
    a token's number does not depend on where a sort put it). -log U of uniforms in [0, 1): four times cheaper than
    `exponential_`, and never 0 (U = 0 gives inf: that token cannot win), so p / E is never 0 / 0."""
    uniforms = torch.stack([torch.rand(vocab, generator=g, device=g.device) for g in generators])
    return uniforms.to(device).log_().neg_()


def _race(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Column index per row: the largest p / E (a token with probability 0 never wins)."""
    return (probs / noise).argmax(dim=-1, keepdim=True)


def choose_tokens(logits: torch.Tensor, params: BatchParams, generators: list[torch.Generator],
                  seen: torch.Tensor | None = None, counts: torch.Tensor | None = None) -> torch.Tensor:
    """The next token of each row. logits: [B, V] float32; generators: one per row (used by sampling rows only);
    seen: [B, V] bool, the prompt's and reply's tokens (repetition penalty); counts: [B, V], the reply's tokens
    (presence/frequency penalties). Rows without top-k/top-p/min-p draw from the whole distribution in vocabulary
    order (no sort needed)."""
    if params.any_penalty and seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.penalty)
    if params.presence is not None and counts is not None:
        logits = apply_openai_penalties(logits, counts, params.presence, params.frequency)
    if params.bias is not None:
        logits = logits + params.bias
    tokens = logits.argmax(dim=-1)
    rows = params.sample_rows
    if rows.numel() == 0:
        return tokens
    row_list = rows.tolist()
    filtered = ((params.top_k[rows] > 0) | (params.top_p[rows] < 1) | (params.min_p[rows] > 0)).tolist()
    with_filters = [r for r, f in zip(row_list, filtered) if f]
    plain = [r for r, f in zip(row_list, filtered) if not f]
    vocab = logits.shape[-1]
    if with_filters:
        index = torch.tensor(with_filters, device=logits.device)
        probs, order = filtered_probs(logits[index], params.temperature[index], params.top_k[index],
                                      params.top_p[index], params.min_p[index])
        noise = _exponentials([generators[i] for i in with_filters], vocab, logits.device).gather(1, order)
        tokens[index] = order.gather(1, _race(probs, noise)).squeeze(1)
    if plain:
        index = torch.tensor(plain, device=logits.device)
        probs = (logits[index] / params.temperature[index][:, None]).softmax(dim=-1)
        tokens[index] = _race(probs, _exponentials([generators[i] for i in plain], vocab, logits.device)).squeeze(1)
    return tokens


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, tuple | None]:
    """Log-probabilities (of the model's own distribution, before any sampling filter) of the chosen tokens [B],
    and the k most likely (values, ids) per row when k > 0."""
    logp = torch.log_softmax(logits, dim=-1)
    chosen = logp.gather(1, tokens[:, None]).squeeze(1)
    return chosen, (logp.topk(k, dim=-1) if k > 0 else None)
