"""Bradley-Terry loss and the last-real-token index (left and right padding, pad == eos)."""

from __future__ import annotations

import math

import pytest
import torch

from tuneforge.losses import last_token_index, reward_pairwise_loss


def test_bradley_terry_matches_hand_values_with_and_without_margin():
    rc, rr = [2.0, -1.0, 0.5, 300.0], [1.0, 1.0, 0.5, -300.0]
    losses, m = reward_pairwise_loss(torch.tensor(rc, dtype=torch.float64), torch.tensor(rr, dtype=torch.float64))
    want = [math.log1p(math.exp(-(a - b))) for a, b in zip(rc[:3], rr[:3])] + [0.0]
    assert losses.tolist() == pytest.approx(want, abs=1e-12)
    assert losses[2].item() == pytest.approx(math.log(2))  # a tie
    assert m["rewards/accuracies"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert m["rewards/margins"].tolist() == pytest.approx([1.0, -2.0, 0.0, 600.0])
    margin = torch.tensor([0.5, 0.0, 1.0, 0.0], dtype=torch.float64)
    with_margin, _ = reward_pairwise_loss(torch.tensor(rc, dtype=torch.float64),
                                          torch.tensor(rr, dtype=torch.float64), margin)
    want = [math.log1p(math.exp(-(a - b - mg))) for a, b, mg in zip(rc[:3], rr[:3], margin.tolist())]
    assert with_margin[:3].tolist() == pytest.approx(want, abs=1e-12)


def test_huge_reward_gaps_stay_finite_with_finite_gradients():
    rc = torch.tensor([1e4, -1e4], requires_grad=True)
    losses, _ = reward_pairwise_loss(rc, torch.zeros(2))
    losses.sum().backward()
    assert losses[0].item() == 0.0 and losses[1].item() == pytest.approx(1e4)
    assert rc.grad.tolist() == pytest.approx([0.0, -1.0])


def test_last_token_index_left_right_padding_and_pad_equal_to_eos():
    eos = 2  # the tokenizer's pad id is its eos id: searching the ids cannot tell them apart
    ids = torch.tensor([[5, 6, 7, eos, eos, eos],    # right-padded: real eos at 3
                        [eos, eos, 5, 6, 7, eos],    # left-padded: real eos at 5
                        [5, eos, 6, 7, 8, eos],      # no padding, an eos mid-sequence too
                        [eos, eos, eos, eos, 9, eos]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]])
    assert last_token_index(mask).tolist() == [3, 5, 5, 5]
    assert ids[torch.arange(4), last_token_index(mask)].tolist() == [eos] * 4
    assert last_token_index(torch.tensor([[1]])).tolist() == [0]  # a single-token sequence


def test_empty_row_is_an_error():
    with pytest.raises(ValueError, match="without any real token"):
        last_token_index(torch.tensor([[1, 1], [0, 0]]))
