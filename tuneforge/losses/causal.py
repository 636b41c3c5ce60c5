"""Causal language-model losses: next-token cross-entropy (whole sequence or selected positions) and R-Drop."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tuneforge.data.types import IGNORE_INDEX


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy, summed over the tokens that have labels (Radford et al., 2018, "Improving Language
    Understanding by Generative Pre-Training").

    Returns (sum of token losses, number of label tokens). Callers divide by the token count of the whole global
    batch, so gradient accumulation and data parallelism give the same result as one big batch.
    logits: [B, T, V]; labels: [B, T] aligned with the inputs (shifted here: position t predicts label t+1).
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (shift_labels != IGNORE_INDEX).sum()


def label_positions(labels: torch.Tensor, max_share: float = 0.75) -> torch.Tensor | None:
    """Sequence positions t whose next token has a label in at least one row (position t predicts label t+1), or
    None when that is most of the sequence (pre-training, loss on all turns) and selecting would save little.

    Why: the output layer and the cross-entropy over the whole vocabulary are a large share of a small model's
    compute (SmolLM2-135M: 28M of 135M parameters sit in lm_head, vocab 49152), and SFT labels only the assistant
    replies. Computing logits only at these positions (transformers' `logits_to_keep` with an index tensor) gives
    exactly the same loss and gradients for a fraction of that cost."""
    has_label = (labels[:, 1:] != IGNORE_INDEX).any(dim=0)
    if has_label.sum() > max_share * has_label.numel():
        return None
    return has_label.nonzero().squeeze(-1)


def selected_positions_loss(logits: torch.Tensor, labels: torch.Tensor,
                            positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`causal_lm_loss` when the model computed logits only at `positions` (from `label_positions`).

    logits: [B, K, V] at those positions; labels: [B, T] aligned with the inputs. Returns (sum, label-token count)."""
    targets = labels[:, positions + 1]
    keep = targets != IGNORE_INDEX  # rows differ: softmax only where this row has a label (vocab-wide work)
    loss = F.cross_entropy(logits[keep].float(), targets[keep], reduction="sum")
    return loss, keep.sum()


def rdrop_loss(logits_a: torch.Tensor, logits_b: torch.Tensor, labels: torch.Tensor,
               alpha: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """R-Drop regulariser (Liang et al., 2021, "R-Drop: Regularized Dropout for Neural Networks",
    https://arxiv.org/abs/2106.14448): the same batch goes through the model twice with different dropout masks and
    the two next-token distributions are pulled together by their symmetric KL divergence,

        alpha / 2 * (KL(P_a || P_b) + KL(P_b || P_a))      per label token (the paper's L_KL, eq. 2).

    Only positions that have a label count (labels != IGNORE_INDEX after the causal shift, the same positions as
    `causal_lm_loss`). Returns (sum over those tokens, number of tokens), so callers normalise it exactly like the
    cross-entropy. logits_a, logits_b: [B, T, V] from the two passes; labels: [B, T] aligned with the inputs.
    Gradients flow through both passes, as in the paper.
    """
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    log_p = F.log_softmax(logits_a[:, :-1, :].float()[mask], dim=-1)  # [N, V]
    log_q = F.log_softmax(logits_b[:, :-1, :].float()[mask], dim=-1)
    kl_pq = (log_p.exp() * (log_p - log_q)).sum(-1)
    kl_qp = (log_q.exp() * (log_q - log_p)).sum(-1)
    return alpha * 0.5 * (kl_pq + kl_qp).sum(), mask.sum()
