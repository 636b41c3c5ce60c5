"""Choosing the next token of every row of a batch at once, on tensors.

The order follows transformers' logits processors: repetition penalty on the raw logits, then temperature, top-k,
top-p and min-p, then one draw from what is left. Greedy rows (temperature 0) take the argmax of the penalised
logits. Each sampling row draws its uniform number from its own `torch.Generator` (one draw per token), so a seeded
request picks the same tokens whatever else shares the batch: the draw is an inverse-CDF lookup, not
`torch.multinomial` over the whole batch, whose random stream would depend on the batch's composition.
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

    @classmethod
    def of(cls, params: list[SamplingParams], device) -> BatchParams:
        def tensor(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=device)

        temperature = [p.temperature for p in params]
        return cls(temperature=tensor(temperature), top_p=tensor([p.top_p for p in params]),
                   top_k=tensor([p.top_k for p in params], torch.long), min_p=tensor([p.min_p for p in params]),
                   penalty=tensor([p.repetition_penalty for p in params]),
                   sample_rows=tensor([i for i, t in enumerate(temperature) if t > 0], torch.long),
                   any_penalty=any(p.repetition_penalty != 1.0 for p in params),
                   top_logprobs=max((p.top_logprobs for p in params), default=0))


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL's penalty (Keskar et al., 2019, https://arxiv.org/abs/1909.05858) as transformers applies it: a seen
    token's logit is divided by the penalty when positive, multiplied when negative. seen: [B, V] bool."""
    p = penalty[:, None]
    penalised = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen, penalised, logits)


def filtered_probs(logits: torch.Tensor, temperature, top_k, top_p, min_p) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities sorted high to low with filtered tokens zeroed, the token id of each sorted column)."""
    sorted_logits, order = (logits / temperature[:, None]).sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    ranks = torch.arange(probs.shape[-1], device=probs.device)
    keep = (top_k[:, None] == 0) | (ranks[None, :] < top_k[:, None])
    keep &= (probs.cumsum(dim=-1) - probs) < top_p[:, None]  # the mass before a token is still short of top_p
    keep &= probs >= min_p[:, None] * probs[:, :1]
    keep[:, 0] = True  # the most likely token always survives
    return probs * keep, order


def choose_tokens(logits: torch.Tensor, params: BatchParams, generators: list[torch.Generator],
                  seen: torch.Tensor | None = None) -> torch.Tensor:
    """The next token of each row. logits: [B, V] float32; generators: one per row (used by sampling rows only)."""
    if params.any_penalty and seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.penalty)
    tokens = logits.argmax(dim=-1)
    rows = params.sample_rows
    if rows.numel() == 0:
        return tokens
    probs, order = filtered_probs(logits[rows], params.temperature[rows], params.top_k[rows], params.top_p[rows],
                                  params.min_p[rows])
    cdf = probs.cumsum(dim=-1)
    draws = torch.cat([torch.rand(1, generator=generators[i]) for i in rows.tolist()]).to(cdf.device)
    picked = torch.searchsorted(cdf, (draws * cdf[:, -1])[:, None], right=True).clamp(max=cdf.shape[-1] - 1)
    tokens[rows] = order.gather(1, picked).squeeze(1)
    return tokens


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, tuple | None]:
    """Log-probabilities (of the model's own distribution, before any sampling filter) of the chosen tokens [B],
    and the k most likely (values, ids) per row when k > 0."""
    logp = torch.log_softmax(logits, dim=-1)
    chosen = logp.gather(1, tokens[:, None]).squeeze(1)
    return chosen, (logp.topk(k, dim=-1) if k > 0 else None)
