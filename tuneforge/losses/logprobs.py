"""Log-probabilities of label tokens from a model's logits, without a full-vocabulary fp32 copy of the whole batch.

    logits = model(**inputs, logits_to_keep=positions).logits          # positions = label_positions(labels), or all
    seq = sequence_logps(logits, labels, positions)                     # seq.sum, seq.mean, seq.length: [B]
    tok, mask = token_logps(logits, labels, positions)                  # per token, for PPO / GRPO ratios

Why hand-written: `log_softmax(logits.float())` over [B, T, V] is the line where DPO runs out of memory in other
toolkits (a batch of 8 x 2048 tokens x 128k vocab is 8 GiB in fp32, kept again for the backward pass). Here only the
rows that have a label are touched, `chunk_size` rows at a time, and the backward pass recomputes each chunk's softmax
from the logits instead of keeping fp32 copies, so the largest temporary is chunk_size x V fp32 and the only
full-size tensor created is the gradient of the logits itself (in their dtype, as autograd would anyway). Measured in
tests/losses/test_logprobs.py (bf16 logits 2 x 64 x 32000, chunk 16, forward + backward): peak 12.7 MiB of new
tensors here (7.8 of them the gradient) against 46.1 MiB for log_softmax(logits.float()) + gather, same gradients.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from tuneforge.data.types import IGNORE_INDEX

DEFAULT_CHUNK = 1024  # rows of [chunk, V] fp32 at a time: 128 MiB at V = 32k, 512 MiB at V = 128k


class SequenceLogps(NamedTuple):
    """Per-sequence log-probability of the label tokens: `sum` (DPO, KTO), `mean` = sum / length (SimPO, ORPO, IPO
    as TRL normalises it) and `length` (label tokens per sequence, as float). All [B]."""

    sum: torch.Tensor
    mean: torch.Tensor
    length: torch.Tensor


def shifted_targets(labels: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """The label each logit row predicts: labels[:, t + 1] for logit position t (all positions but the last, or the
    `positions` the model computed logits at, from `label_positions`). [B, T-1] or [B, K]."""
    return labels[:, 1:] if positions is None else labels[:, positions + 1]


class _LabelLogps(torch.autograd.Function):
    """log p(target) for selected rows of `logits`, chunked over rows in both passes (see the module docstring)."""

    @staticmethod
    def forward(ctx, logits, rows, cols, targets, chunk_size):
        out = torch.empty(rows.numel(), dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(out)
        for start in range(0, rows.numel(), chunk_size):
            sl = slice(start, start + chunk_size)
            x = logits[rows[sl], cols[sl]].float()  # [chunk, V]
            lse[sl] = torch.logsumexp(x, dim=-1)
            out[sl] = x.gather(-1, targets[sl, None]).squeeze(-1) - lse[sl]
        ctx.save_for_backward(logits, rows, cols, targets, lse)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, rows, cols, targets, lse = ctx.saved_tensors
        grad = torch.zeros_like(logits)
        for start in range(0, rows.numel(), ctx.chunk_size):
            sl = slice(start, start + ctx.chunk_size)
            g = grad_out[sl, None]
            # d log_softmax(x)[y] / dx = onehot(y) - softmax(x), in place on one fp32 copy of the chunk
            d = logits[rows[sl], cols[sl]].float().sub_(lse[sl, None]).exp_().mul_(-g)
            d.scatter_add_(-1, targets[sl, None], g)
            grad[rows[sl], cols[sl]] = d.to(grad.dtype)  # each (row, col) appears once: a plain write suffices
        return grad, None, None, None, None


def token_logps(logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None,
                chunk_size: int = DEFAULT_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of the labels, chunked (memory: see the module docstring).

    logits: [B, T, V] for the whole sequence (the last position predicts nothing and is ignored), or [B, K, V] at the
    `positions` from `label_positions` (whole-sequence logits may be longer at the front: virtual tokens of
    prompt-learning methods are skipped); labels: [B, T] aligned with the inputs (IGNORE_INDEX where no loss).
    Returns (logps, mask), both [B, T-1] (or [B, K]): logps is float32 with 0 where mask is False. Differentiable."""
    targets = shifted_targets(labels, positions)
    mask = targets != IGNORE_INDEX
    rows, cols = mask.nonzero(as_tuple=True)
    # index the logits as given (no slice: its backward would allocate a second full-size gradient); prompt-learning
    # methods prepend virtual-token positions to whole-sequence logits, hence the offset
    offset = logits.shape[1] - labels.shape[1] if positions is None else 0
    values = _LabelLogps.apply(logits, rows, cols + offset, targets[rows, cols], max(1, chunk_size))
    out = torch.zeros(targets.shape, dtype=torch.float32, device=logits.device)
    return out.index_put((rows, cols), values), mask


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None,
                   chunk_size: int = DEFAULT_CHUNK, sequence_ids: torch.Tensor | None = None) -> SequenceLogps:
    """Summed and length-normalised log-probability of each sequence's label tokens (the response of a preference
    pair, when the prompt is masked with IGNORE_INDEX). Arguments as `token_logps`. A sequence without label tokens
    gets sum 0, mean 0, length 0.

    `sequence_ids` (shaped like labels, 0..S-1 in order) for padding-free batches, where one row holds several
    sequences end to end: the sums are then per sequence id, [S], not per row."""
    logps, mask = token_logps(logits, labels, positions, chunk_size)
    if sequence_ids is None:
        total, length = logps.sum(-1), mask.sum(-1).float()
    else:
        owner = shifted_targets(sequence_ids, positions)[mask]  # the sequence of each label token
        n = int(sequence_ids.max()) + 1
        total = logps.new_zeros(n).index_add(0, owner, logps[mask])
        length = logps.new_zeros(n).index_add(0, owner, torch.ones_like(logps[mask]))
    return SequenceLogps(total, total / length.clamp(min=1), length)


def token_entropy(logits: torch.Tensor, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Entropy of the next-token distribution at every position, H = logsumexp(x) - sum softmax(x) * x, computed
    `chunk_size` rows at a time in fp32. logits: [B, T, V] -> [B, T] float32. Meant for logging (PPO/GRPO report
    it); call it under torch.no_grad() unless an entropy bonus needs its gradient (then chunks are kept for backward).
    """
    flat = logits.reshape(-1, logits.shape[-1])
    parts = []
    for start in range(0, flat.shape[0], max(1, chunk_size)):
        x = flat[start: start + chunk_size].float()
        log_p = torch.log_softmax(x, dim=-1)
        parts.append(-(log_p.exp() * log_p).sum(-1))
    if not parts:
        return torch.zeros(logits.shape[:-1], dtype=torch.float32, device=logits.device)
    return torch.cat(parts).reshape(logits.shape[:-1])
