"""Loss functions: small pure functions of tensors, one per objective, each with its paper in the docstring.

- `causal`: next-token cross-entropy (whole sequence or selected label positions) and R-Drop.
- `logprobs`: per-token / per-sequence log-probs of the labels and entropy, chunked over the vocabulary.
- `preference`: DPO family (sigmoid, IPO, hinge, robust, cDPO), SimPO, ORPO, KTO.
- `reward`: Bradley-Terry pairwise loss and the last-real-token index for scoring.
- `rl`: PPO (GAE, clipped policy/value losses, KL-shaped rewards, whitening) and GRPO (group advantages, loss types).

The names below are importable from `tuneforge.losses` directly.
"""

from tuneforge.losses.causal import causal_lm_loss, label_positions, rdrop_loss, selected_positions_loss
from tuneforge.losses.logprobs import SequenceLogps, sequence_logps, token_entropy, token_logps
from tuneforge.losses.preference import (
    dpo_loss,
    kto_loss,
    kto_reference_point,
    mismatched_completions,
    orpo_loss,
    simpo_loss,
)
from tuneforge.losses.reward import last_token_index, reward_pairwise_loss
from tuneforge.losses.rl import (
    aggregate_token_loss,
    constant_reward_groups,
    gae,
    group_advantages,
    grpo_loss,
    kl_penalty,
    kl_shaped_rewards,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
    whiten,
)

__all__ = [
    "SequenceLogps", "aggregate_token_loss", "causal_lm_loss", "constant_reward_groups", "dpo_loss", "gae",
    "group_advantages", "grpo_loss", "kl_penalty", "kl_shaped_rewards", "kto_loss", "kto_reference_point",
    "label_positions", "last_token_index", "masked_mean", "mismatched_completions", "orpo_loss", "ppo_policy_loss",
    "ppo_value_loss", "rdrop_loss", "reward_pairwise_loss", "selected_positions_loss", "sequence_logps",
    "simpo_loss", "token_entropy", "token_logps", "whiten",
]
