"""Loss functions against independent references."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tuneforge.data.types import IGNORE_INDEX
from tuneforge.losses import causal_lm_loss, label_positions, selected_positions_loss


def masked_labels() -> torch.Tensor:
    torch.manual_seed(0)
    labels = torch.randint(0, 50, (3, 12))
    labels[:, :7] = IGNORE_INDEX  # prompts
    labels[1, 7:9] = IGNORE_INDEX
    labels[2, 10:] = IGNORE_INDEX  # padding
    return labels


def test_causal_lm_loss_is_shifted_cross_entropy():
    labels = masked_labels()
    logits = torch.randn(3, 12, 50)
    total, count = causal_lm_loss(logits, labels)
    terms = [F.cross_entropy(logits[b, t], labels[b, t + 1], reduction="sum")
             for b in range(3) for t in range(11) if labels[b, t + 1] != IGNORE_INDEX]
    assert count == len(terms) and torch.allclose(total, torch.stack(terms).sum())


def test_loss_at_label_positions_equals_full_loss_with_same_gradients():
    labels = masked_labels()
    positions = label_positions(labels)
    assert positions.tolist() == [6, 7, 8, 9, 10]  # t predicts t+1: labels start at 7
    hidden = torch.randn(3, 12, 8, requires_grad=True)
    head = torch.nn.Linear(8, 50)
    full, n_full = causal_lm_loss(head(hidden), labels)
    grad_full = torch.autograd.grad(full, hidden)[0]
    part, n_part = selected_positions_loss(head(hidden[:, positions]), labels, positions)
    grad_part = torch.autograd.grad(part, hidden)[0]
    assert n_full == n_part and torch.allclose(full, part, atol=1e-5)
    assert torch.allclose(grad_full, grad_part, atol=1e-6)


def test_no_selection_when_most_positions_have_labels():
    labels = torch.randint(0, 50, (2, 10))  # pre-training: every token is a target
    assert label_positions(labels) is None
