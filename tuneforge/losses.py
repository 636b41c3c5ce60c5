"""Loss functions: small pure functions of tensors, one per objective."""

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
