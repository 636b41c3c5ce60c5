"""Reward-model training: the Bradley-Terry pairwise loss and where a sequence's score is read.

    idx = last_token_index(batch["attention_mask"])          # left or right padding
    scores = head(hidden)[torch.arange(B), idx].squeeze(-1)   # one scalar per sequence
    losses, metrics = reward_pairwise_loss(*scores.chunk(2))  # batch = [chosen; rejected]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reward_pairwise_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor,
                         margin: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Bradley-Terry pairwise loss (Bradley & Terry, 1952; as the reward-model loss of Ouyang et al., 2022, "Training
    language models to follow instructions with human feedback", https://arxiv.org/abs/2203.02155, eq. 1):

        -log sigmoid(r_chosen - r_rejected - margin)

    with the optional per-pair margin of Llama 2 (Touvron et al., 2023, section 3.2.2: larger for clearly better
    responses). Inputs: scalar rewards [B] (and margin [B]). Returns (losses [B], metrics) with per-pair detached
    rewards/chosen, rewards/rejected, rewards/margins and rewards/accuracies (1.0 where r_chosen > r_rejected).
    """
    diff = r_chosen - r_rejected
    losses = -F.logsigmoid(diff if margin is None else diff - margin)
    chosen, rejected = r_chosen.detach(), r_rejected.detach()
    return losses, {"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
                    "rewards/accuracies": (chosen > rejected).float()}


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token (the last 1 in the attention mask), for left or right padding alike.

    Why the mask and not the token ids: many tokenizers use their eos token as the pad token (SmolLM2, Llama 3
    fine-tunes, GPT-2): searching the ids for the first pad, or for the last non-pad (what transformers' sequence
    classifiers do), lands before the sequence's own final eos and misplaces the score.
    attention_mask: [B, T] of 0/1 -> [B] long. A row without any real token is an error.
    """
    mask = attention_mask.bool()
    if not mask.any(dim=-1).all():
        raise ValueError("attention_mask has a row without any real token; every sequence needs at least one")
    last_from_end = mask.flip(-1).int().argmax(dim=-1)  # argmax returns the first maximum: the last 1 in the row
    return (mask.shape[-1] - 1 - last_from_end).long()
